"""The ordered causal depthwise conv1d in plain PyTorch: the "torch" backend (CPU path).

It materializes what the Triton kernels avoid: x and seq_idx are gathered into scan order, the
conv runs on the gathered sequence, and the output is scattered back to the original positions.
Fine on CPU, where copies are cheap next to the compute. Inputs are validated by
:func:`kernels.conv1d.causal_conv1d`.

The conv itself is W shifted multiply-adds over the (batch, seqlen, channels) layout the mixer
already has. Without ``seq_idx`` it is :class:`DepthwiseCausalConv`, an autograd function with its
own backward (W shifted multiply-adds for the input's gradient, W products summed over batch and
sequence for the weight's): about 3x faster forward and backward than ``F.conv1d(groups=C)`` on
the demo's CPU shapes, whose depthwise backward is slow and which needs a transpose each way.
With ``seq_idx`` every tap is masked where it reaches into an earlier run of equal ids, in plain
autograd-differentiable tensor code.
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
    seqlen = x.shape[1]
    width = weight.shape[-1]
    if seq_idx is None:
        # half-precision inputs compute in float32 (as the conv's own accumulation) and come back
        wdtype = torch.promote_types(x.dtype, torch.float32)
        out = DepthwiseCausalConv.apply(x.to(wdtype), weight.to(wdtype), None if bias is None else bias.to(wdtype))
        return out.to(x.dtype)
    change = seq_idx[:, 1:] != seq_idx[:, :-1]
    seg = F.pad(change.long().cumsum(1), (1, 0))  # monotone ids: one per run of equal seq_idx
    xp = F.pad(x, (0, 0, width - 1, 0))
    segp = F.pad(seg, (width - 1, 0), value=-1)
    out = x.new_zeros(x.shape) if bias is None else bias.expand_as(x)
    for j in range(width):  # tap j reads position t - (width - 1) + j
        same = (segp[:, j:j + seqlen] == seg).to(x.dtype)[..., None]
        out = out + xp[:, j:j + seqlen] * weight[:, j] * same
    return out


class DepthwiseCausalConv(torch.autograd.Function):
    """``y[:, t] = bias + sum_j weight[:, j] * x[:, t - (W-1) + j]`` over (B, L, C), taps before the
    start zero; x, weight (C, W) and bias (C,) or None of one dtype."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        seqlen, width = x.shape[1], weight.shape[1]
        xp = F.pad(x, (0, 0, width - 1, 0))  # (B, W-1+L, C): the W-1 zero taps before the start
        last = xp[:, width - 1:]
        out = last * weight[:, width - 1] if bias is None else torch.addcmul(bias, last, weight[:, width - 1])
        for j in range(width - 1):
            out.addcmul_(xp[:, j:j + seqlen], weight[:, j])
        ctx.save_for_backward(xp, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        xp, weight = ctx.saved_tensors
        seqlen, width = grad.shape[1], weight.shape[1]
        grad = grad.contiguous()
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad * weight[:, width - 1]
            for j in range(width - 1):  # tap j of output t + k reads x[t], k = W-1-j
                k = width - 1 - j
                if k < seqlen:
                    grad_x[:, :seqlen - k].addcmul_(grad[:, k:], weight[:, j])
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.stack([(grad * xp[:, j:j + seqlen]).sum((0, 1)) for j in range(width)], dim=1)
        grad_b = grad.sum((0, 1)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b
