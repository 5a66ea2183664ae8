"""The ordered causal depthwise conv1d in plain PyTorch: the "torch" backend (CPU path).

It materializes what the Triton kernels avoid: x and seq_idx are gathered into scan order, the
conv runs on the gathered sequence (``F.conv1d``, or, with ``seq_idx``, one shifted multiply per
tap masked where the tap reaches into an earlier run of equal ids), and the output is scattered
back to the original positions. Fine on CPU, where copies are cheap next to the compute.
Everything is ordinary autograd-differentiable tensor code; inputs are validated by
:func:`kernels.conv1d.causal_conv1d`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def causal_conv1d_gathered(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    scan_order: Tensor | None = None,
    seq_idx: Tensor | None = None,
    activation: str | None = "silu",
) -> Tensor:
    """Same arguments and result as :func:`kernels.conv1d.causal_conv1d`."""
    if scan_order is not None:
        x = x.index_select(1, scan_order)
        if seq_idx is not None:
            seq_idx = seq_idx.index_select(1, scan_order)
    out = causal_conv1d_in_order(x, weight, bias, seq_idx)
    if activation == "silu":
        out = F.silu(out)
    if scan_order is not None:
        inverse = torch.empty_like(scan_order)
        inverse[scan_order] = torch.arange(scan_order.numel(), device=scan_order.device)
        out = out.index_select(1, inverse)
    return out


def causal_conv1d_in_order(x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor | None) -> Tensor:
    """Depthwise causal conv of x (B, L, C) along its own order; weight (C, W); no activation.

    With seq_idx (B, L), taps that reach back across a change of id are dropped.
    """
    seqlen, channels = x.shape[1], x.shape[2]
    width = weight.shape[-1]
    if seq_idx is None:
        out = F.conv1d(F.pad(x.transpose(1, 2), (width - 1, 0)), weight.unsqueeze(1), bias, groups=channels)
        return out.transpose(1, 2)
    change = seq_idx[:, 1:] != seq_idx[:, :-1]
    seg = F.pad(change.long().cumsum(1), (1, 0))  # monotone ids: one per run of equal seq_idx
    xp = F.pad(x, (0, 0, width - 1, 0))
    segp = F.pad(seg, (width - 1, 0), value=-1)
    out = x.new_zeros(x.shape) if bias is None else bias.expand_as(x)
    for j in range(width):  # tap j reads position t - (width - 1) + j
        same = (segp[:, j:j + seqlen] == seg).to(x.dtype)[..., None]
        out = out + xp[:, j:j + seqlen] * weight[:, j] * same
    return out
