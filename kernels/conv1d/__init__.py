"""The causal depthwise conv1d that precedes Mamba-2's scan, causal in *scan order*.

One public entry point, :func:`causal_conv1d`, and its K-direction form
:func:`causal_conv1d_multi`. Backends (same function, different speed):
  * ``torch``: gather into scan order, shifted multiply-adds per tap, scatter back (``gathered.py``);
    the CPU path.
  * ``reference``: a loop over scan steps (``reference.py``); the ground truth.
  * ``triton``: fused kernels, forward and backward, that read x by index and write y to the
    original positions, K directions per launch (``triton_conv.py``); CUDA tensors, or CPU under
    ``TRITON_INTERPRET=1``.
  * ``auto``: ``triton`` for CUDA tensors of a dtype it supports, ``torch`` otherwise.

The Triton module is imported on first use (``TRITON_INTERPRET`` is read then), so importing this
package does not import Triton.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kernels._checks import check_order_args

from kernels.conv1d.gathered import causal_conv1d_gathered
from kernels.conv1d.reference import causal_conv1d_reference

__all__ = ["ACTIVATIONS", "BACKENDS", "causal_conv1d", "causal_conv1d_multi", "causal_conv1d_gathered",
           "causal_conv1d_reference", "resolve_backend"]

BACKENDS = ("auto", "torch", "reference", "triton")
ACTIVATIONS = ("silu", None)


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    scan_order: Tensor | None = None,
    seq_idx: Tensor | None = None,
    activation: str | None = "silu",
    backend: str = "auto",
) -> Tensor:
    """Depthwise causal conv1d along the scan order, then the activation.

    For each batch b, scan step i (original position pos_i = scan_order[i], or i) and channel c::

        y[b, pos_i, c] = act(bias[c] + sum_{j < W} weight[c, j] * x[b, pos_{i - (W-1) + j}, c])

    with taps before the first step zero, and, with ``seq_idx``, taps zero when the id changes
    between any two consecutive steps from the tap's step to i (packed samples stay apart, as
    in :func:`kernels.ssd.ssd_scan`).

    Args:
        x: (batch, seqlen, channels), any strides (e.g. a slice of a projection)
        weight: (channels, width) (an ``nn.Conv1d(groups=channels)`` weight without its middle 1)
        bias: None or (channels,)
        scan_order: None or (seqlen,) LongTensor permutation; x and y stay in original positions
        seq_idx: None or (batch, seqlen) integer ids, indexed by original position
        activation: ``"silu"`` or None
        backend: one of ``auto``, ``torch``, ``reference``, ``triton``

    Returns y (batch, seqlen, channels) in x.dtype.
    """
    _check_common(backend, activation, "causal_conv1d")
    _check_inputs(x, weight, bias, seq_idx, scan_order, "causal_conv1d")
    backend = resolve_backend(backend, x, "causal_conv1d")
    if x.shape[1] == 0:
        return x.new_zeros(x.shape)
    if backend == "triton":
        from kernels.conv1d.triton_conv import causal_conv1d_triton_stacked

        one = lambda t: None if t is None else t.unsqueeze(0)  # noqa: E731  a K=1 view, no copy
        return causal_conv1d_triton_stacked(one(x), weight, bias, one(seq_idx), one(scan_order),
                                            activation == "silu")[0]
    fn = causal_conv1d_reference if backend == "reference" else causal_conv1d_gathered
    return fn(x, weight, bias, scan_order, seq_idx, activation)


def causal_conv1d_multi(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    scan_order: Tensor | Sequence[Tensor | None] | None = None,
    seq_idx: Tensor | None = None,
    activation: str | None = "silu",
    backend: str = "auto",
) -> Tensor:
    """K directions at once: direction k is ``causal_conv1d`` of x[k] along scan_order[k].

    x (K, batch, seqlen, channels), any strides (K views into one projection cost no copy);
    weight (channels, width) shared or (K, channels, width); bias None, (channels,) or
    (K, channels); scan_order None, a (K, seqlen) LongTensor, or K entries each a permutation or
    None; seq_idx (batch, seqlen) shared. Returns y (K, batch, seqlen, channels).
    ``backend="triton"`` (``auto`` on CUDA) runs all directions in one launch per pass; ``torch``
    and ``reference`` loop over the directions.
    """
    _check_common(backend, activation, "causal_conv1d_multi")
    if x.dim() != 4:
        raise ValueError(f"causal_conv1d_multi: x must have shape (K, batch, seqlen, channels), got {tuple(x.shape)}")
    K, batch, seqlen, channels = x.shape
    if scan_order is not None and not torch.is_tensor(scan_order):
        orders = list(scan_order)
        if len(orders) != K:
            raise ValueError(f"causal_conv1d_multi: scan_order must hold K = {K} entries, got {len(orders)}")
        identity = torch.arange(seqlen, device=x.device)
        scan_order = None if all(o is None for o in orders) else torch.stack(
            [identity if o is None else o for o in orders])
    for name, t, nd in (("weight", weight, 3), ("bias", bias, 2), ("scan_order", scan_order, 2)):
        if t is not None and t.dim() == nd and t.shape[0] != K:
            raise ValueError(f"causal_conv1d_multi: {name} must have a leading K = {K} (from x), got {tuple(t.shape)}")
    if scan_order is not None and scan_order.dim() != 2:
        raise ValueError(f"causal_conv1d_multi: scan_order must have shape (K, seqlen), got {tuple(scan_order.shape)}")
    pick = lambda t, nd, k: t[k] if t is not None and t.dim() == nd else t  # noqa: E731
    for k in range(K):
        _check_inputs(x[k], pick(weight, 3, k), pick(bias, 2, k), seq_idx, pick(scan_order, 2, k),
                      "causal_conv1d_multi")
    backend = resolve_backend(backend, x, "causal_conv1d_multi")
    if backend == "triton" and seqlen > 0:
        from kernels.conv1d.triton_conv import causal_conv1d_triton_stacked

        seq_k = None if seq_idx is None else seq_idx.expand(K, *seq_idx.shape)
        return causal_conv1d_triton_stacked(x, weight, bias, seq_k, scan_order, activation == "silu")
    return torch.stack([
        causal_conv1d(x[k], pick(weight, 3, k), pick(bias, 2, k), pick(scan_order, 2, k), seq_idx, activation,
                      "torch" if backend == "triton" else backend)
        for k in range(K)
    ])


def resolve_backend(backend: str, x: Tensor, who: str = "causal_conv1d") -> str:
    """Resolve ``auto`` (Triton for CUDA tensors of a supported dtype, else torch); for ``triton``
    raise NotImplementedError where the kernels cannot run."""
    if backend == "auto":
        if x.is_cuda and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
            return "triton"
        return "torch"
    if backend == "triton":
        from kernels.conv1d.triton_conv import check_runnable

        check_runnable(x, who)
    return backend


def _check_common(backend: str, activation, who: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"{who}: unknown backend {backend!r}; allowed values: {', '.join(BACKENDS)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{who}: unknown activation {activation!r}; allowed values: 'silu', None")


def _check_inputs(x, weight, bias, seq_idx, scan_order, who: str) -> None:
    """Raise ValueError naming the argument, the expected shape and the one received."""
    if x.dim() != 3:
        raise ValueError(f"{who}: x must have shape (batch, seqlen, channels), got {tuple(x.shape)}")
    b, l, c = x.shape
    if weight.dim() != 2 or weight.shape[0] != c or weight.shape[1] < 1:
        raise ValueError(f"{who}: weight must have shape (channels={c}, width), got {tuple(weight.shape)}")
    for name, t, shape in (("bias", bias, (c,)), ("seq_idx", seq_idx, (b, l)), ("scan_order", scan_order, (l,))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{who}: {name} must have shape {shape}, got {tuple(t.shape)}")
    check_order_args(who, l, seq_idx, scan_order)
