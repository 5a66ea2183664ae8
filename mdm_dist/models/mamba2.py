"""The Mamba-2 mixer (Dao & Gu, 2024) as MDM's backbone uses it, in plain PyTorch.

    u (B, L, d_model)
      -> in_proj -> [z (d_inner) | xBC (d_inner + 2 * ngroups * d_state) | dt (nheads)]
      -> xBC: depthwise causal conv1d (kernel d_conv) -> SiLU -> split into x, B, C
      -> y = SSD scan (kernels.ssd.ssd_scan) of x with dt = softplus(dt + dt_bias),
             A = -exp(A_log), D skip per head
      -> RMSNormGated(y, z) = rmsnorm(y * silu(z)) * weight   (per group of d_inner / ngroups)
      -> out_proj -> (B, L, d_model)

Scan order: ``forward(u, scan_order=perm)`` runs the whole mixer along the permuted sequence
(the causal conv and the scan both see ``u[:, perm[0]], u[:, perm[1]], ...``) and returns the
output in the original positions. For now this gathers u once at entry and scatters the output
once at exit; the fused-kernel issue moves the ordering into the conv and scan kernels.

A_log, D and dt_bias stay float32 even in a bfloat16 model (as in Mamba-2): they carry the
attributes ``_mdm_keep_fp32`` and ``_no_weight_decay``; ``nn.Module.to(dtype)`` casts them like
any parameter, so call :func:`keep_fp32_` after such a cast.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from kernels.ssd import ssd_scan

if TYPE_CHECKING:
    from mdm_dist.config import ModelConfig

FP32_PARAM_NAMES = ("A_log", "D", "dt_bias")


def keep_fp32_(module: nn.Module) -> nn.Module:
    """Cast every parameter marked ``_mdm_keep_fp32`` (A_log, D, dt_bias) back to float32.

    Use after ``module.to(torch.bfloat16)``, which casts all floating parameters. Parameters
    are found by the mark and, in case a conversion replaced the Parameter objects, by name on
    every :class:`Mamba2Mixer`. Returns the module.
    """
    for sub in module.modules():
        names = FP32_PARAM_NAMES if isinstance(sub, Mamba2Mixer) else ()
        for name, param in list(sub.named_parameters(recurse=False)):
            if name in names or getattr(param, "_mdm_keep_fp32", False):
                if param.dtype != torch.float32:
                    param.data = param.data.float()
                _mark_fp32(param)
    return module


def _mark_fp32(param: nn.Parameter) -> None:
    param._mdm_keep_fp32 = True
    param._no_weight_decay = True


class RMSNormGated(nn.Module):
    """y = rmsnorm(x * silu(z)) * weight, normalized over groups of ``group_size`` channels.

    Mamba-2's gated norm with ``norm_before_gate=False``; computed in float32 (float64 for
    float64 inputs), returned in x's dtype. ``group_size = d_inner // ngroups`` keeps each group's statistics separate.
    """

    def __init__(self, hidden_size: int, group_size: int | None = None, eps: float = 1e-5,
                 device=None, dtype=None):
        super().__init__()
        self.hidden_size = hidden_size
        self.group_size = group_size or hidden_size
        if hidden_size % self.group_size:
            raise ValueError(
                f"RMSNormGated: hidden_size {hidden_size} is not a multiple of group_size {self.group_size}"
            )
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        dtype = x.dtype
        wdtype = torch.promote_types(dtype, torch.float32)
        h = x.to(wdtype)
        if z is not None:
            h = h * F.silu(z.to(wdtype))
        h = h.unflatten(-1, (-1, self.group_size))
        h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + self.eps)
        return (h.flatten(-2) * self.weight.to(wdtype)).to(dtype)


class Mamba2Mixer(nn.Module):
    """One Mamba-2 mixer: in_proj, causal depthwise conv, SSD scan, gated RMSNorm, out_proj."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        expand: float = 2.0,
        headdim: int = 64,
        ngroups: int = 1,
        chunk_size: int = 64,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        A_init_range: tuple[float, float] | list[float] = (1.0, 16.0),
        conv_bias: bool = True,
        proj_bias: bool = False,
        norm_eps: float = 1e-5,
        scan_backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = int(expand * d_model)
        self.headdim = headdim
        self.ngroups = ngroups
        if self.d_inner % headdim:
            raise ValueError(
                f"Mamba2Mixer: d_inner = int(expand * d_model) = {self.d_inner} must be divisible "
                f"by headdim = {headdim}"
            )
        self.nheads = self.d_inner // headdim
        if self.nheads % ngroups:
            raise ValueError(f"Mamba2Mixer: nheads = {self.nheads} must be divisible by ngroups = {ngroups}")
        if not (0 < A_init_range[0] <= A_init_range[1]):
            raise ValueError(f"Mamba2Mixer: A_init_range must satisfy 0 < low <= high, got {A_init_range}")
        self.chunk_size = chunk_size
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.A_init_range = tuple(A_init_range)
        self.scan_backend = scan_backend

        self.conv_dim = self.d_inner + 2 * ngroups * d_state
        d_in_proj = self.d_inner + self.conv_dim + self.nheads  # [z | xBC | dt]
        self.in_proj = nn.Linear(d_model, d_in_proj, bias=proj_bias, **factory)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim,
                                bias=conv_bias, **factory)
        fp32 = {"device": device, "dtype": torch.float32}
        self.dt_bias = nn.Parameter(torch.empty(self.nheads, **fp32))
        self.A_log = nn.Parameter(torch.empty(self.nheads, **fp32))
        self.D = nn.Parameter(torch.empty(self.nheads, **fp32))
        for name in FP32_PARAM_NAMES:
            _mark_fp32(getattr(self, name))
        self.norm = RMSNormGated(self.d_inner, self.d_inner // ngroups, eps=norm_eps, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=proj_bias, **factory)
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg: ModelConfig, **kw) -> Mamba2Mixer:
        """Build from ``ModelConfig``'s mixer fields; ``kw`` (device, dtype, overrides) wins."""
        args = dict(
            d_model=cfg.d_model, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand,
            headdim=cfg.headdim, ngroups=cfg.ngroups, chunk_size=cfg.chunk_size,
            dt_min=cfg.dt_min, dt_max=cfg.dt_max, dt_init_floor=cfg.dt_init_floor,
            A_init_range=tuple(cfg.A_init_range), conv_bias=cfg.conv_bias,
            proj_bias=cfg.proj_bias, norm_eps=cfg.norm_eps, scan_backend=cfg.scan_backend,
        )
        args.update(kw)
        return cls(**args)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)initialize every parameter as Mamba-2 does; works on meta (as a no-op there).

        dt is log-uniform in [dt_min, dt_max], floored at dt_init_floor, and dt_bias is its
        inverse softplus; A is uniform in A_init_range and A_log = log(A); D = 1. The linear
        layers and the conv keep PyTorch's default init.
        """
        self.in_proj.reset_parameters()
        self.conv1d.reset_parameters()
        self.out_proj.reset_parameters()
        self.norm.reset_parameters()
        lo, hi = math.log(self.dt_min), math.log(self.dt_max)
        dt = torch.exp(torch.rand_like(self.dt_bias) * (hi - lo) + lo).clamp(min=self.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(*self.A_init_range).log())
        self.D.fill_(1.0)

    def forward(self, u: Tensor, scan_order: Tensor | None = None, seq_idx: Tensor | None = None) -> Tensor:
        """u (B, L, d_model) -> (B, L, d_model), output in the original positions.

        scan_order: (L,) permutation; the conv and the scan run along u[:, scan_order].
        seq_idx: (B, L) ids of packed sequences (by original position); the conv and the scan
        do not reach across a change of id between consecutive scanned positions.
        """
        if u.dim() != 3 or u.shape[-1] != self.d_model:
            raise ValueError(
                f"Mamba2Mixer: u must have shape (batch, seqlen, {self.d_model}), got {tuple(u.shape)}"
            )
        batch, seqlen, _ = u.shape
        if scan_order is not None:
            if tuple(scan_order.shape) != (seqlen,):
                raise ValueError(
                    f"Mamba2Mixer: scan_order must have shape ({seqlen},), got {tuple(scan_order.shape)}"
                )
            u = u.index_select(1, scan_order)
            if seq_idx is not None:
                seq_idx = seq_idx.index_select(1, scan_order)

        zxbcdt = self.in_proj(u)
        z, xBC, dt = torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xBC = F.silu(self._causal_conv(xBC, seq_idx))
        gn = self.ngroups * self.d_state
        x, B, C = torch.split(xBC, [self.d_inner, gn, gn], dim=-1)
        y = ssd_scan(
            x.unflatten(-1, (self.nheads, self.headdim)),
            dt,
            -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32))),
            B.unflatten(-1, (self.ngroups, self.d_state)),
            C.unflatten(-1, (self.ngroups, self.d_state)),
            D=self.D,
            dt_bias=self.dt_bias,
            dt_softplus=True,
            seq_idx=seq_idx,
            chunk_size=self.chunk_size,
            backend=self.scan_backend,
        )
        y = self.norm(y.flatten(-2), z)
        out = self.out_proj(y)

        if scan_order is not None:
            inverse = torch.empty_like(scan_order)
            inverse[scan_order] = torch.arange(seqlen, device=scan_order.device)
            out = out.index_select(1, inverse)
        return out

    def _causal_conv(self, xBC: Tensor, seq_idx: Tensor | None) -> Tensor:
        """Depthwise causal conv over the sequence of xBC (B, L, conv_dim); bias, no activation.

        With seq_idx, taps that reach back into an earlier packed sequence are dropped.
        """
        seqlen, K = xBC.shape[1], self.d_conv
        weight = self.conv1d.weight.squeeze(1)  # (conv_dim, K); tap K-1 multiplies position t
        if seq_idx is None:
            out = F.conv1d(F.pad(xBC.transpose(1, 2), (K - 1, 0)), self.conv1d.weight,
                           self.conv1d.bias, groups=self.conv_dim)
            return out.transpose(1, 2)
        change = seq_idx[:, 1:] != seq_idx[:, :-1]
        seg = F.pad(change.long().cumsum(1), (1, 0))  # monotone ids: one per run of equal seq_idx
        xp = F.pad(xBC, (0, 0, K - 1, 0))
        segp = F.pad(seg, (K - 1, 0), value=-1)
        out = xBC.new_zeros(xBC.shape) if self.conv1d.bias is None else self.conv1d.bias.expand_as(xBC)
        for k in range(K):  # tap k reads position t - (K - 1) + k
            same = (segp[:, k:k + seqlen] == seg).to(xBC.dtype)[..., None]
            out = out + xp[:, k:k + seqlen] * weight[:, k] * same
        return out
