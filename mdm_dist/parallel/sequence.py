"""Sequence parallelism for MDMBackbone: a sequence slice per rank, a head slice inside the mixers.

Layout (``sp`` ranks in an SP group, all holding the same samples):

* Outside the mixers every rank holds a contiguous slice of every sample's joint sequence. The
  backbone embeds the whole sequence (cheap), pads it with zeros to ``T_pad = sp * ceil(T / sp)``
  tokens and keeps slice ``[rank * T_pad / sp, (rank + 1) * T_pad / sp)``. Norms, residuals, the
  long-skip projections and the attention MLPs are per token and run on the slice.
* Inside each Mamba-2 mixer, ``in_proj`` runs on the slice; an all-to-all (megatron-core's
  autograd ``all_to_all``) trades the sequence slice of every head for the whole sequence of
  ``nheads / sp`` heads: x and dt per head, B and C per group (``ngroups % sp == 0``: split like
  the heads; ``sp % ngroups == 0``: each rank receives, in the same all-to-all, the one group its
  heads read; other combinations are refused by ``groups.check_layout``). The padding is dropped,
  and the causal conv1d (on the rank's channels), every scan direction and the SSD scan run on the
  full sequence in scan order, exactly as without SP. The scan output y goes back with the reverse all-to-all;
  the gated RMSNorm (whose statistics span all heads of a group, so need not be local to a head
  slice) and ``out_proj`` run per token on the slice. z never travels: it is made and used on
  the slice.
* Attention blocks are Ulysses attention (DeepSpeed-Ulysses' layout): one all-to-all trades the
  sequence slice of q, k and v of every head for the whole sequence of ``n_heads / sp`` heads,
  the attention runs over the real tokens (padding dropped), one all-to-all brings it back.
* ``norm_out``'s output is all-gathered along the sequence (padding dropped), so the output heads
  and everything after them see the full sequence on every rank.

Gradient convention: the all-gather's backward is a reduce-scatter (sum), every all-to-all's
backward is the reverse all-to-all, and the slice's backward pads with zeros. With the loss
computed identically on every SP rank, the exact gradient of every parameter is then the *mean*
over the SP group of the per-rank gradients, so the trainer averages over all data x sequence
ranks (DeepSpeed's default reduction over the whole world) and needs nothing else.

The model classes are untouched: ``apply_sequence_parallel`` swaps the class of the backbone, its
mixers and its attention modules for the subclasses below (as FSDP2's ``fully_shard`` does), so
parameter names, state dicts and ZeRO-3 hooks are those of the plain model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.conv1d import causal_conv1d
from kernels.ssd import ssd_scan
from mdm_dist.models.attention import SelfAttention, attention
from mdm_dist.models.backbone import MDMBackbone
from mdm_dist.models.mamba2 import Mamba2Mixer
from mdm_dist.parallel.groups import check_model_layout


# ----------------------------------------------------------------------------------------------
# Collectives (autograd-aware)
# ----------------------------------------------------------------------------------------------


def _all_to_all(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Exchange the ``size`` equal chunks of dim 0 (chunk j goes to rank j); autograd-aware."""
    from megatron.core.tensor_parallel.mappings import all_to_all

    return all_to_all(group, x)


def seq_to_heads(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """(B, L/sp, sp * c) sequence slice, channels rank-major -> (B, L, c) full sequence."""
    sp = dist.get_world_size(group)
    b, ls, ch = x.shape
    x = x.view(b, ls, sp, ch // sp).permute(2, 0, 1, 3).contiguous()  # (dest, B, Ls, c)
    x = _all_to_all(x, group)  # (src, B, Ls, c): src's slice of our channels
    return x.permute(1, 0, 2, 3).reshape(b, sp * ls, ch // sp)


def heads_to_seq(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """(B, L, c) full sequence -> (B, L/sp, sp * c) sequence slice, channels rank-major."""
    sp = dist.get_world_size(group)
    b, length, ch = x.shape
    x = x.view(b, sp, length // sp, ch).transpose(0, 1).contiguous()  # (dest, B, Ls, c)
    x = _all_to_all(x, group)  # (src, B, Ls, c): src's channels of our slice
    return x.permute(1, 2, 0, 3).reshape(b, length // sp, sp * ch)


class _GatherSeq(torch.autograd.Function):
    """All-gather along dim 1; backward: reduce-scatter (sum) of the gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        sp = dist.get_world_size(group)
        xt = x.transpose(0, 1).contiguous()
        out = xt.new_empty((sp * xt.shape[0],) + tuple(xt.shape[1:]))
        dist.all_gather_into_tensor(out, xt, group=group)
        return out.transpose(0, 1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        sp = dist.get_world_size(ctx.group)
        gt = grad.transpose(0, 1).contiguous()
        out = gt.new_empty((gt.shape[0] // sp,) + tuple(gt.shape[1:]))
        dist.reduce_scatter_tensor(out, gt, group=ctx.group)
        return out.transpose(0, 1), None


def gather_sequence(x: Tensor, group: dist.ProcessGroup, seqlen: int | None = None) -> Tensor:
    """(B, L/sp, ...) slices -> (B, L, ...) on every rank, cut to ``seqlen`` (drops the padding)."""
    out = _GatherSeq.apply(x, group)
    return out if seqlen is None else out[:, :seqlen]


def split_sequence(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """(B, T, ...) full -> this rank's contiguous slice of the zero-padded (B, T_pad, ...)."""
    sp, rank = dist.get_world_size(group), dist.get_rank(group)
    ls = math.ceil(x.shape[1] / sp)
    pad = sp * ls - x.shape[1]
    if pad:
        x = torch.cat([x, x.new_zeros((x.shape[0], pad) + tuple(x.shape[2:]))], dim=1)
    return x[:, rank * ls: (rank + 1) * ls]


def _pad_seq(x: Tensor, length: int) -> Tensor:
    if x.shape[1] == length:
        return x
    return torch.cat([x, x.new_zeros((x.shape[0], length - x.shape[1]) + tuple(x.shape[2:]))], dim=1)


@dataclass
class SequenceParallelState:
    """Shared by the wrapped modules of one backbone: the group and the current true length."""

    group: dist.ProcessGroup
    size: int
    rank: int
    seqlen: int = 0  # tokens of the joint sequence before padding; set by the backbone's embed


# ----------------------------------------------------------------------------------------------
# Wrapped modules (class swaps: same parameters, same names)
# ----------------------------------------------------------------------------------------------


class SequenceParallelMamba2Mixer(Mamba2Mixer):
    """Mamba2Mixer on a sequence slice: all-to-all to full sequence x local heads and back."""

    _sp: SequenceParallelState

    def forward(self, u: Tensor, scan_order: Tensor | None = None, seq_idx: Tensor | None = None) -> Tensor:
        if seq_idx is not None:
            raise NotImplementedError("sequence-parallel Mamba2Mixer: seq_idx (packed sequences) is not supported")
        st = self._sp
        sp, rank, group = st.size, st.rank, st.group
        seqlen = scan_order.numel() if scan_order is not None else st.seqlen
        b, ls, _ = u.shape
        H, P, G, N = self.nheads, self.headdim, self.ngroups, self.d_state
        hl = H // sp
        heads = slice(rank * hl, (rank + 1) * hl)
        split_groups = G % sp == 0

        z, x, Bm, Cm, dt = torch.split(self.in_proj(u), [self.d_inner, self.d_inner, G * N, G * N, H], dim=-1)
        parts = [x.view(b, ls, sp, hl * P), dt.view(b, ls, sp, hl)]
        if split_groups:
            gl = G // sp
            parts += [Bm.view(b, ls, sp, gl * N), Cm.view(b, ls, sp, gl * N)]
            g0 = rank * gl
        else:
            # sp % G == 0: the heads of destination rank j all read group (j * hl) // (H / G).
            # Each destination's chunk carries that group's B and C, so the same all-to-all
            # delivers them (no all-gather of its own); the backward sums the copies' gradients.
            gl, g0 = 1, (rank * hl) // (H // G)
            dest = [(j * hl) // (H // G) for j in range(sp)]
            parts += [torch.stack([Bm[..., g * N: (g + 1) * N] for g in dest], dim=2),
                      torch.stack([Cm[..., g * N: (g + 1) * N] for g in dest], dim=2)]
        recv = seq_to_heads(torch.cat(parts, dim=-1).flatten(2), group)[:, :seqlen]
        x_l, dt_l, B_l, C_l = torch.split(recv, [hl * P, hl, gl * N, gl * N], dim=-1)

        # The conv channels of this rank: its heads' x, its groups' B and C.
        di, gn = self.d_inner, G * N
        ch = torch.cat([
            torch.arange(rank * hl * P, (rank + 1) * hl * P),
            torch.arange(di + g0 * N, di + (g0 + gl) * N),
            torch.arange(di + gn + g0 * N, di + gn + (g0 + gl) * N),
        ]).to(u.device)
        w = self.conv1d.weight.index_select(0, ch)
        bias = None if self.conv1d.bias is None else self.conv1d.bias.index_select(0, ch)

        xBC = torch.cat([x_l, B_l, C_l], dim=-1)
        if scan_order is not None:
            xBC, dt_l = xBC.index_select(1, scan_order), dt_l.index_select(1, scan_order)
        if xBC.is_cuda:
            K = self.d_conv
            xBC = F.silu(F.conv1d(F.pad(xBC.transpose(1, 2), (K - 1, 0)), w, bias, groups=ch.numel()).transpose(1, 2))
        else:  # the CPU path's depthwise conv (kernels/conv1d/gathered.py: ~3x F.conv1d's speed there)
            xBC = causal_conv1d(xBC, w.squeeze(1), bias, activation="silu", backend="torch")
        x_l, B_l, C_l = torch.split(xBC, [hl * P, gl * N, gl * N], dim=-1)
        A_log = self.A_log[heads]
        y = ssd_scan(
            x_l.unflatten(-1, (hl, P)), dt_l,
            -torch.exp(A_log.to(torch.promote_types(A_log.dtype, torch.float32))),
            B_l.unflatten(-1, (gl, N)), C_l.unflatten(-1, (gl, N)),
            D=self.D[heads], dt_bias=self.dt_bias[heads], dt_softplus=True,
            chunk_size=self.chunk_size, backend=self.scan_backend,
        ).flatten(-2)
        if scan_order is not None:
            inverse = torch.empty_like(scan_order)
            inverse[scan_order] = torch.arange(seqlen, device=scan_order.device)
            y = y.index_select(1, inverse)
        y = heads_to_seq(_pad_seq(y, sp * ls), group)  # (B, Ls, d_inner), heads in order
        return self.out_proj(self.norm(y, z))


class SequenceParallelSelfAttention(SelfAttention):
    """SelfAttention on a sequence slice, Ulysses-style (heads split across the SP ranks): one
    all-to-all takes q, k and v together from the sequence slice of every head to the full
    sequence of ``n_heads / sp`` heads, the attention runs over the real tokens (the padding is
    dropped), and one all-to-all brings the output back. DeepSpeed's ``DistributedAttention``
    computes the same with one all-to-all each for q, k and v (4 per forward instead of 2)."""

    _sp: SequenceParallelState

    def forward(self, x: Tensor) -> Tensor:
        st = self._sp
        sp = st.size
        b, ls, d = x.shape
        hl, hd = self.n_heads // sp, d // self.n_heads
        # (B, Ls, 3, H, hd) -> channels rank-major: (B, Ls, sp, 3, H/sp, hd)
        qkv = self.qkv(x).view(b, ls, 3, sp, hl, hd).transpose(2, 3).reshape(b, ls, sp * 3 * hl * hd)
        q, k, v = seq_to_heads(qkv, st.group)[:, :st.seqlen].view(b, st.seqlen, 3, hl, hd).unbind(dim=2)
        out = attention(q, k, v, self.backend).reshape(b, st.seqlen, hl * hd)
        out = heads_to_seq(_pad_seq(out, sp * ls), st.group)  # (B, Ls, d), heads in order
        return self.out(out)


class SequenceParallelBackbone(MDMBackbone):
    """MDMBackbone whose ``embed`` returns this rank's slice of the (padded) joint sequence."""

    _sp: SequenceParallelState

    def embed(self, txt, img, t_txt, t_img, category, img_sc=None, img_keep=None) -> Tensor:
        x = super().embed(txt, img, t_txt, t_img, category, img_sc, img_keep)
        self._sp.seqlen = x.shape[1]
        return split_sequence(x, self._sp.group)

    def whole_sequence(self, x: Tensor) -> Tensor:
        return gather_sequence(x, self._sp.group, self._sp.seqlen)


def _gather_after_norm_out(module: nn.Module, args, output: Tensor) -> Tensor:
    st = module._sp
    return gather_sequence(output, st.group, st.seqlen)


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------


def apply_sequence_parallel(model: nn.Module, sp_group: dist.ProcessGroup | None) -> nn.Module:
    """Make ``model``'s backbone (``model.backbone``, or ``model`` itself) sequence parallel over
    ``sp_group``: sequence slices between the mixers, full sequence x a head slice inside each
    Mamba-2 mixer and attention block, the sequence gathered after ``norm_out``. A no-op when the
    group is None or has one rank. Raises ``ParallelLayoutError`` for layouts that cannot work.
    Every rank of the group must feed the same samples; average gradients over the whole world.
    """
    if sp_group is None or dist.get_world_size(sp_group) == 1:
        return model
    backbone = model.backbone if hasattr(model, "backbone") else model
    if not isinstance(backbone, MDMBackbone):
        raise TypeError(f"apply_sequence_parallel: expected an MDM or MDMBackbone, got {type(model).__name__}")
    if isinstance(backbone, SequenceParallelBackbone):
        raise RuntimeError("apply_sequence_parallel: the backbone is already sequence parallel")
    sp = dist.get_world_size(sp_group)
    check_model_layout(backbone.cfg, backbone.layout.length, dist.get_world_size(), sp)
    state = SequenceParallelState(sp_group, sp, dist.get_rank(sp_group))

    for module in backbone.modules():
        if type(module) is Mamba2Mixer:
            module.__class__ = SequenceParallelMamba2Mixer
        elif type(module) is SelfAttention:
            module.__class__ = SequenceParallelSelfAttention
        else:
            continue
        object.__setattr__(module, "_sp", state)
    backbone.__class__ = SequenceParallelBackbone
    object.__setattr__(backbone, "_sp", state)
    object.__setattr__(backbone.norm_out, "_sp", state)
    backbone.norm_out.register_forward_hook(_gather_after_norm_out)
    return model


__all__ = [
    "apply_sequence_parallel", "gather_sequence", "heads_to_seq", "seq_to_heads", "split_sequence",
    "SequenceParallelState",
]
