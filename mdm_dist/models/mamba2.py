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
output in the original positions. Two paths compute this same function:

* Triton (CUDA tensors with ``scan_backend`` auto, or ``scan_backend="triton"``): no permuted
  copies. in_proj, the gated norm and out_proj are per token and run in the original order; the
  conv (``kernels.conv1d``) and the scan (``kernels.ssd``) take ``scan_order`` and gather on load
  and scatter on store inside their kernels.
* torch / reference (the CPU path): u is gathered into scan order once at entry and the output
  scattered back once at exit, around plain PyTorch ops (copies are cheap on CPU).

:func:`mixers_forward_stacked` runs several directions (one mixer each, or one shared mixer) with
one in_proj GEMM, one conv launch, one scan launch and one out_proj GEMM; ``MambaBlock`` uses it.

A_log, D and dt_bias stay float32 even in a bfloat16 model (as in Mamba-2): they carry the
attributes ``_mdm_keep_fp32`` and ``_no_weight_decay``; ``nn.Module.to(dtype)`` casts them like
any parameter, so call :func:`keep_fp32_` after such a cast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from kernels.conv1d import causal_conv1d, causal_conv1d_multi
from kernels.conv1d import resolve_backend as resolve_conv_backend
from kernels.ssd import resolve_backend, ssd_scan, ssd_scan_multi

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
        return rms_norm_gated(x, z, self.weight, self.group_size, self.eps)


def rms_norm_gated(x: Tensor, z: Tensor | None, weight: Tensor, group_size: int, eps: float) -> Tensor:
    """rmsnorm(x * silu(z)) * weight over groups of ``group_size`` channels of the last dim;
    weight broadcasts against x (e.g. (K, 1, 1, C) for K stacked directions)."""
    dtype = x.dtype
    wdtype = torch.promote_types(dtype, torch.float32)
    h = x.to(wdtype)
    if z is not None:
        h = h * F.silu(z.to(wdtype))
    h = h.unflatten(-1, (-1, group_size))
    h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)
    return (h.flatten(-2) * weight.to(wdtype)).to(dtype)


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
        seqlen = u.shape[1]
        if scan_order is not None and tuple(scan_order.shape) != (seqlen,):
            raise ValueError(f"Mamba2Mixer: scan_order must have shape ({seqlen},), got {tuple(scan_order.shape)}")
        backend = self.resolve_backend(u)
        if backend == "triton":
            return self._forward_ordered(u, scan_order, seq_idx, backend)
        return self._forward_gathered(u, scan_order, seq_idx, backend)

    def resolve_backend(self, u: Tensor) -> str:
        """The backend this mixer's conv and scan run for input u: ``triton`` (CUDA tensors under
        ``auto``), else ``torch`` or ``reference``; raises NotImplementedError for an explicit
        ``triton`` where the kernels cannot run."""
        backend = resolve_backend(self.scan_backend, u, "Mamba2Mixer")
        if backend == "triton":
            resolve_conv_backend(backend, u, "Mamba2Mixer")
        return backend

    def _forward_ordered(self, u: Tensor, scan_order: Tensor | None, seq_idx: Tensor | None,
                         backend: str) -> Tensor:
        """Everything in the original order; the conv and scan kernels apply scan_order inside."""
        z, xBC, dt = torch.split(self.in_proj(u), [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        bias = self.conv1d.bias
        xBC = causal_conv1d(xBC, self.conv1d.weight.squeeze(1), bias, scan_order, seq_idx, "silu", backend)
        y = self._scan(xBC, dt, seq_idx, scan_order, backend)
        return self.out_proj(self.norm(y.flatten(-2), z))

    def _forward_gathered(self, u: Tensor, scan_order: Tensor | None, seq_idx: Tensor | None,
                          backend: str) -> Tensor:
        """The CPU path: gather u into scan order, run in that order, scatter the output back."""
        if scan_order is not None:
            u = u.index_select(1, scan_order)
            if seq_idx is not None:
                seq_idx = seq_idx.index_select(1, scan_order)
        z, xBC, dt = torch.split(self.in_proj(u), [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xBC = causal_conv1d(xBC, self.conv1d.weight.squeeze(1), self.conv1d.bias, None, seq_idx, "silu",
                            "reference" if backend == "reference" else "torch")
        y = self._scan(xBC, dt, seq_idx, None, backend)
        out = self.out_proj(self.norm(y.flatten(-2), z))
        if scan_order is not None:
            inverse = torch.empty_like(scan_order)
            inverse[scan_order] = torch.arange(scan_order.numel(), device=scan_order.device)
            out = out.index_select(1, inverse)
        return out

    def _scan(self, xBC: Tensor, dt: Tensor, seq_idx: Tensor | None, scan_order: Tensor | None,
              backend: str) -> Tensor:
        gn = self.ngroups * self.d_state
        x, B, C = torch.split(xBC, [self.d_inner, gn, gn], dim=-1)
        return ssd_scan(
            x.unflatten(-1, (self.nheads, self.headdim)),
            dt,
            -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32))),
            B.unflatten(-1, (self.ngroups, self.d_state)),
            C.unflatten(-1, (self.ngroups, self.d_state)),
            D=self.D,
            dt_bias=self.dt_bias,
            dt_softplus=True,
            seq_idx=seq_idx,
            scan_order=scan_order,
            chunk_size=self.chunk_size,
            backend=backend,
        )


def mixers_forward_stacked(
    mixers: Sequence[Mamba2Mixer],
    u: Tensor,
    scan_orders: Sequence[Tensor | None],
    seq_idx: Tensor | None = None,
    backend: str = "triton",
) -> Tensor:
    """``sum_k mixers[k](u, scan_orders[k], seq_idx)`` for K directions, computed all at once.

    ``mixers`` holds one mixer per direction, or one mixer shared by all K directions; they must
    have the same sizes (as built from one config). The K directions' in_proj outputs come from
    one GEMM (the weights concatenated) as K strided views of one tensor, then one conv launch
    (:func:`kernels.conv1d.causal_conv1d_multi`) and one scan launch
    (:func:`kernels.ssd.ssd_scan_multi`), each applying its direction's order inside the kernel,
    the K gated norms at once, and one out_proj GEMM that also sums the directions. Meant for the
    Triton path; other backends give the same result with per-direction loops inside.
    """
    K, shared = len(scan_orders), len(mixers) == 1
    m0 = mixers[0]
    if not shared and len(mixers) != K:
        raise ValueError(f"mixers_forward_stacked: {len(mixers)} mixers for {K} directions (give 1 or {K})")
    batch, seqlen, _ = u.shape
    di, cd, H = m0.d_inner, m0.conv_dim, m0.nheads
    cat = lambda ts, dim=0: None if ts[0] is None else torch.cat(ts, dim)  # noqa: E731
    stack = lambda ts: None if ts[0] is None else torch.stack(ts)  # noqa: E731
    if shared:
        zxbcdt = m0.in_proj(u).unsqueeze(0).expand(K, -1, -1, -1)
    else:  # one GEMM; (B, L, K * d_in_proj) viewed as (K, B, L, d_in_proj), no copy
        w = cat([m.in_proj.weight for m in mixers])
        zxbcdt = F.linear(u, w, cat([m.in_proj.bias for m in mixers]))
        zxbcdt = zxbcdt.view(batch, seqlen, K, -1).permute(2, 0, 1, 3)
    z, xBC, dt = torch.split(zxbcdt, [di, cd, H], dim=-1)
    one = (lambda get: get(m0)) if shared else (lambda get: stack([get(m) for m in mixers]))  # noqa: E731
    xBC = causal_conv1d_multi(xBC, one(lambda m: m.conv1d.weight.squeeze(1)), one(lambda m: m.conv1d.bias),
                              list(scan_orders), seq_idx, "silu", backend)
    gn = m0.ngroups * m0.d_state
    x, B, C = torch.split(xBC, [di, gn, gn], dim=-1)
    A_log = one(lambda m: m.A_log)
    y = ssd_scan_multi(
        x.unflatten(-1, (H, m0.headdim)), dt, -torch.exp(A_log.to(torch.promote_types(A_log.dtype, torch.float32))),
        B.unflatten(-1, (m0.ngroups, m0.d_state)), C.unflatten(-1, (m0.ngroups, m0.d_state)),
        D=one(lambda m: m.D), dt_bias=one(lambda m: m.dt_bias), dt_softplus=True, seq_idx=seq_idx,
        scan_order=list(scan_orders), chunk_size=m0.chunk_size, backend=backend,
    ).flatten(-2)  # (K, B, L, d_inner)
    norm_w = one(lambda m: m.norm.weight)
    y = rms_norm_gated(y, z, norm_w if shared else norm_w[:, None, None, :], m0.norm.group_size, m0.norm.eps)
    if shared:  # out_proj is linear: project the sum of the directions once
        out = F.linear(y.sum(0), m0.out_proj.weight)
        return out if m0.out_proj.bias is None else out + K * m0.out_proj.bias
    # (B, L, K * d_inner) @ (d_model, K * d_inner)^T: the GEMM sums over the directions
    y = y.permute(1, 2, 0, 3).reshape(batch, seqlen, K * di)
    bias = stack([m.out_proj.bias for m in mixers])
    return F.linear(y, cat([m.out_proj.weight for m in mixers], 1), None if bias is None else bias.sum(0))
