"""The SSD scan by block decomposition in plain PyTorch: the "torch" backend (CPU training path).

Mamba-2's state space duality: split the (scan-ordered) sequence into chunks of Q positions.
With a_t = dt_t * A_h the per-step log-decay and Acs its cumulative sum inside a chunk,

  * intra-chunk (diagonal blocks), a masked quadratic form:
        y_l += sum_{s <= l} (C_l . B_s) * exp(Acs_l - Acs_s) * dt_s * x_s
  * chunk states (what a chunk adds to the running state by its last position Q-1):
        S_c = sum_s exp(Acs_{Q-1} - Acs_s) * dt_s * outer(x_s, B_s)
  * inter-chunk recurrence over chunks (a short Python loop, one step per chunk):
        H_c = exp(Acs_{Q-1} of chunk c-1) * H_{c-1} + S_{c-1},    H_0 = initial state
  * state -> output (off-diagonal blocks):
        y_l += exp(Acs_l) * (H_c @ C_l)

A sequence that fits in one chunk, with no initial state and no final state asked for, is the
intra-chunk term alone: the chunk states, their recurrence and the off-diagonal term are skipped
(all zero there). On the demo's CPU shapes that is about 1.5x faster forward and backward than two
chunks, so ``model.chunk_size`` at least the sequence length is the fast choice on CPU.

Matmuls run in the input dtype; the log-decays (dt after bias/softplus, dt * A and their
cumulative sums) in float32 (float64 for float64 inputs), and the inter-chunk state in float32
for half/bfloat16 inputs. Segment sums are differences of within-chunk cumulative sums (bounded
by one chunk, so never the whole sequence), masked to -inf above the diagonal before the exp.
Everything is ordinary autograd-differentiable tensor code.

seq_idx is turned into monotone segment ids (a new id wherever seq_idx changes from one
scanned position to the next), and every term whose source and target lie in different
segments is masked out; this is exactly "reset the state to zero at each change".
Inputs are assumed validated by :func:`kernels.ssd.ssd_scan`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _segment_ids(seq_idx: Tensor) -> Tensor:
    """(batch, L) ids -> (batch, L) monotone ids that step by one wherever the id changes."""
    change = seq_idx[:, 1:] != seq_idx[:, :-1]
    return F.pad(change.long().cumsum(1), (1, 0))


def _pad_len(t: Tensor, pad: int) -> Tensor:
    """Zero-pad dim 1 (the sequence) of t at the end by ``pad`` positions."""
    if pad == 0:
        return t
    return F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))


def _finish(y: Tensor, x: Tensor, D: Tensor | None, z: Tensor | None, dtype: torch.dtype,
            scan_order: Tensor | None, seqlen: int) -> Tensor:
    """The skip term D x, the gate silu(z), the output dtype, and the scatter back from scan order."""
    if D is not None:
        y = y + x * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z)
    y = y.to(dtype)
    if scan_order is not None:
        inverse = torch.empty_like(scan_order)
        inverse[scan_order] = torch.arange(seqlen, device=scan_order.device)
        y = y.index_select(1, inverse)
    return y


def ssd_scan_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
    scan_order: Tensor | None = None,
    return_final_states: bool = False,
    chunk_size: int = 64,
) -> Tensor | tuple[Tensor, Tensor]:
    """Chunked SSD scan; same arguments and result as :func:`kernels.ssd.ssd_scan`."""
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[-2], B.shape[-1]
    rep = nheads // ngroups
    dtype = x.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32  # log-decay precision
    sdtype = torch.promote_types(dtype, torch.float32)  # inter-chunk state precision

    # Scan order: gather once here, scatter y back once at the end.
    if scan_order is not None:
        x, dt, B, C = (t.index_select(1, scan_order) for t in (x, dt, B, C))
        if z is not None:
            z = z.index_select(1, scan_order)
        if seq_idx is not None:
            seq_idx = seq_idx.index_select(1, scan_order)

    # dt after bias/softplus, in the accumulation precision; a_t = dt_t * A_h.
    dtf = dt.to(acc)
    if dt_bias is not None:
        dtf = dtf + dt_bias.to(acc)
    if dt_softplus:
        dtf = F.softplus(dtf)

    # As few chunks as chunk_size allows, of equal length: 33 positions at chunk_size 32 become
    # 2 chunks of 17 (34 slots), not 2 of 32 (64 slots, most of them padding).
    nchunks = -(-seqlen // min(chunk_size, seqlen))
    Q = -(-seqlen // nchunks)
    pad = nchunks * Q - seqlen
    # Padded positions get dt = 0: no input and no decay, so outputs and final state are unchanged.
    dtf = _pad_len(dtf, pad)
    xp, Bp, Cp = _pad_len(x, pad), _pad_len(B, pad), _pad_len(C, pad)

    shape5 = (batch, nchunks, Q, ngroups, rep)
    a = (dtf * A.to(acc)).view(shape5)  # (b, c, Q, g, r)
    acs = a.cumsum(dim=2)
    acs_last = acs[:, :, -1]  # (b, c, g, r)
    xdt = xp.view(*shape5, headdim) * dtf.to(dtype).view(*shape5, 1)  # (b, c, Q, g, r, p)
    Bc = Bp.view(batch, nchunks, Q, ngroups, dstate)
    Cc = Cp.view(batch, nchunks, Q, ngroups, dstate)

    seg = None
    if seq_idx is not None:
        seg = _segment_ids(seq_idx)
        if pad:
            seg = torch.cat([seg, seg[:, -1:].expand(batch, pad)], dim=1)
        seg = seg.view(batch, nchunks, Q)
        seg_prev = torch.cat([seg[:, :1, 0], seg[:, :-1, -1]], dim=1)  # (b, c): id entering chunk

    # 1. Intra-chunk: y_l = sum_{s<=l} (C_l.B_s) exp(acs_l - acs_s) dt_s x_s.
    acs_t = acs.permute(0, 1, 3, 4, 2)  # (b, c, g, r, Q)
    segsum = acs_t[..., :, None] - acs_t[..., None, :]  # (b, c, g, r, l, s)
    keep = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    if seg is not None:
        keep = keep & (seg[..., :, None] == seg[..., None, :])[:, :, None, None]
    decay_ls = torch.exp(segsum.masked_fill(~keep, float("-inf"))).to(dtype)
    CB = torch.einsum("bclgn,bcsgn->bcgls", Cc, Bc)  # (b, c, g, l, s)
    y = torch.einsum("bcgrls,bcsgrp->bclgrp", CB[:, :, :, None] * decay_ls, xdt)

    if nchunks == 1 and initial_states is None and not return_final_states:
        y = y.reshape(batch, Q, nheads, headdim)[:, :seqlen]
        return _finish(y, x, D, z, dtype, scan_order, seqlen)

    # 2. Chunk states: S_c = sum_s exp(acs_last - acs_s) dt_s outer(x_s, B_s).
    decay_s = torch.exp(acs_last[:, :, None] - acs)  # (b, c, Q, g, r)
    if seg is not None:
        decay_s = decay_s * (seg == seg[..., -1:]).to(acc)[..., None, None]
    states = torch.einsum("bcsgn,bcsgrp->bcgrpn", Bc, xdt * decay_s.to(dtype)[..., None])

    # 3. Inter-chunk recurrence, one step per chunk.
    chunk_decay = torch.exp(acs_last)  # (b, c, g, r)
    if seg is not None:
        chunk_decay = chunk_decay * (seg[:, :, -1] == seg_prev).to(acc)[..., None, None]
    chunk_decay = chunk_decay.to(sdtype)[..., None, None]
    if initial_states is not None:
        h = initial_states.to(sdtype).view(batch, ngroups, rep, headdim, dstate)
    else:
        h = x.new_zeros(batch, ngroups, rep, headdim, dstate, dtype=sdtype)
    entering = []
    for c in range(nchunks):
        entering.append(h)
        h = chunk_decay[:, c] * h + states[:, c].to(sdtype)
    h_in = torch.stack(entering, dim=1).to(dtype)  # (b, c, g, r, p, n)

    # 4. State -> output: y_l += exp(acs_l) (H_c @ C_l).
    decay_out = torch.exp(acs)  # (b, c, Q, g, r)
    if seg is not None:
        decay_out = decay_out * (seg == seg_prev[..., None]).to(acc)[..., None, None]
    y_off = torch.einsum("bclgn,bcgrpn->bclgrp", Cc, h_in) * decay_out.to(dtype)[..., None]
    y = _finish((y + y_off).reshape(batch, nchunks * Q, nheads, headdim)[:, :seqlen], x, D, z, dtype, scan_order,
                seqlen)
    if return_final_states:
        final = h.view(batch, nheads, headdim, dstate)
        return y, final.to(torch.float64 if dtype == torch.float64 else torch.float32)
    return y
