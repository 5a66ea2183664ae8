"""The SSD scan as a plain sequential loop over positions: slow, short, obviously correct.

This is the ground truth the chunked (``chunked.py``) and Triton paths are tested against. It
computes in float64 when given float64 inputs and in float32 otherwise (the result is cast back
to ``x.dtype``), and it is differentiable by autograd, so gradients of the fast paths can be
checked against it. Inputs are assumed validated by :func:`kernels.ssd.ssd_scan`.

Per batch b and head h (using group g = h // (nheads // ngroups)), visiting positions in scan
order t = scan_order[0], scan_order[1], ...:

    dt_t = softplus(dt_t + dt_bias_h)  (or dt_t + dt_bias_h without dt_softplus)
    s_t  = 0 if seq_idx changes between the previous visited position and t, else s_{t-1}
    s_t  = exp(dt_t * A_h) * s_{t-1} + dt_t * outer(x_t, B_t)       (headdim, dstate)
    y_t  = s_t @ C_t + D_h * x_t,   then  y_t *= silu(z_t)  if z is given
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ssd_scan_reference(
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
) -> Tensor | tuple[Tensor, Tensor]:
    """Sequential SSD scan; same arguments and result as :func:`kernels.ssd.ssd_scan`."""
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[-2], B.shape[-1]
    out_dtype = x.dtype
    wdtype = torch.float64 if x.dtype == torch.float64 else torch.float32

    # Heads read their group's B and C.
    group_of_head = torch.arange(nheads, device=x.device) // (nheads // ngroups)
    Bh = B.to(wdtype).index_select(2, group_of_head)  # (batch, seqlen, nheads, dstate)
    Ch = C.to(wdtype).index_select(2, group_of_head)
    xw = x.to(wdtype)
    dtw = dt.to(wdtype)
    if dt_bias is not None:
        dtw = dtw + dt_bias.to(wdtype)
    if dt_softplus:
        dtw = F.softplus(dtw)
    Aw = A.to(wdtype)

    order = range(seqlen) if scan_order is None else [int(i) for i in scan_order.tolist()]
    if initial_states is not None:
        state = initial_states.to(wdtype)
    else:
        state = xw.new_zeros(batch, nheads, headdim, dstate)

    ys: list[Tensor | None] = [None] * seqlen
    prev = None
    for t in order:
        if seq_idx is not None and prev is not None:
            keep = (seq_idx[:, t] == seq_idx[:, prev]).to(wdtype)  # (batch,)
            state = state * keep[:, None, None, None]
        decay = torch.exp(dtw[:, t] * Aw)  # (batch, nheads)
        inp = dtw[:, t, :, None, None] * xw[:, t, :, :, None] * Bh[:, t, :, None, :]
        state = decay[:, :, None, None] * state + inp
        y = (state * Ch[:, t, :, None, :]).sum(-1)  # (batch, nheads, headdim)
        if D is not None:
            Dw = D.to(wdtype)
            y = y + xw[:, t] * (Dw[:, None] if Dw.dim() == 1 else Dw)
        if z is not None:
            y = y * F.silu(z[:, t].to(wdtype))
        ys[t] = y
        prev = t

    out = torch.stack(ys, dim=1).to(out_dtype)  # type: ignore[arg-type]
    if return_final_states:
        return out, state  # float64 for float64 inputs, else float32
    return out
