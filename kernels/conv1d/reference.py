"""The ordered causal depthwise conv1d as a plain loop over scan steps: slow, obviously correct.

The ground truth the gathered PyTorch path (``gathered.py``) and the Triton kernels
(``triton_conv.py``) are tested against. It computes in float64 for float64 inputs and in float32
otherwise (the result is cast back to ``x.dtype``), and autograd differentiates it.

Per batch b, visiting scan steps i = 0 .. L-1 (original position pos_i = scan_order[i])::

    y[b, pos_i] = act(bias + sum_{j = 0}^{W-1} weight[:, j] * x[b, pos_{i - (W-1) + j}])

where a tap is zero when its step is before the start, or when seq_idx changes between any two
consecutive steps from the tap's step to i (packed samples do not see each other).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def causal_conv1d_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    scan_order: Tensor | None = None,
    seq_idx: Tensor | None = None,
    activation: str | None = "silu",
) -> Tensor:
    """Same arguments and result as :func:`kernels.conv1d.causal_conv1d` (validated there)."""
    batch, seqlen, channels = x.shape
    width = weight.shape[-1]
    wdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xw, ww = x.to(wdtype), weight.to(wdtype)
    order = list(range(seqlen)) if scan_order is None else [int(i) for i in scan_order.tolist()]
    rows: list[Tensor | None] = [None] * seqlen
    for i, pos in enumerate(order):
        acc = xw.new_zeros(batch, channels) if bias is None else bias.to(wdtype).expand(batch, channels)
        alive = torch.ones(batch, dtype=torch.bool, device=x.device)
        for d in range(width):  # d steps back: tap width-1-d
            s = i - d
            if s < 0:
                break
            if d > 0 and seq_idx is not None:
                alive = alive & (seq_idx[:, order[s]] == seq_idx[:, order[s + 1]])
            acc = acc + ww[:, width - 1 - d] * xw[:, order[s]] * alive[:, None].to(wdtype)
        rows[pos] = F.silu(acc) if activation == "silu" else acc
    return torch.stack(rows, dim=1).to(x.dtype)  # type: ignore[arg-type]
