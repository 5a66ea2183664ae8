"""The SSD (Mamba-2 state space duality) scan: one public entry point, :func:`ssd_scan`.

Backends (same function, different speed):
  * ``torch``: chunked block decomposition in plain PyTorch (``chunked.py``); the CPU path.
  * ``reference``: a sequential loop over positions (``reference.py``); the ground truth.
  * ``triton``: fused Triton kernels, forward and backward (``triton_fwd.py``, ``triton_bwd.py``,
    autograd in ``triton_scan.py``); CUDA tensors, or CPU under ``TRITON_INTERPRET=1``. Two
    algorithms: chunks in sequence, or in parallel (``triton_par.py``); on CUDA the forward runs
    them in sequence and the backward in parallel (``triton_fwd.launch_settings``, measured), on
    CPU both in sequence; ``MDM_SSD_TUNE`` (``fwd_parallel``, ``bwd_parallel``, ...) overrides.
  * ``auto``: ``triton`` for CUDA tensors of a dtype it supports, ``torch`` otherwise.

:func:`ssd_scan_multi` runs K directions (each with its own inputs and scan order) at once: one
launch of the Triton kernels with the direction as a grid axis.

The Triton modules are imported on first use (they decorate their kernels at import, and
``TRITON_INTERPRET`` is read then), so importing this package does not import Triton.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kernels._checks import check_order_args

from kernels.ssd.chunked import ssd_scan_chunked
from kernels.ssd.reference import ssd_scan_reference

__all__ = ["BACKENDS", "resolve_backend", "ssd_scan", "ssd_scan_chunked", "ssd_scan_multi", "ssd_scan_reference"]

BACKENDS = ("auto", "torch", "reference", "triton")


def ssd_scan(
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
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba-2's selective state space scan with a scalar decay per head.

    For each batch b and head h (which reads group g = h // (nheads // ngroups) of B and C),
    visiting positions t in scan order (``scan_order[0], scan_order[1], ...``, or 0..L-1)::

        dt_t = softplus(dt_t + dt_bias_h)   if dt_softplus   else   dt_t + dt_bias_h
        s_t  = exp(dt_t * A_h) * s_{t-1} + dt_t * outer(x_t, B_t)      # (headdim, dstate)
        y_t  = s_t @ C_t + D_h * x_t
        y_t  = y_t * silu(z_t)                                          # if z is given

    with s_{-1} = initial_states (zeros if None), and s_{t-1} replaced by zeros wherever
    ``seq_idx`` differs between t and the position scanned just before it (so packed
    sequences do not see each other; the initial state belongs to the first segment).

    Args (shapes follow mamba-ssm's ``mamba_chunk_scan_combined``):
        x: (batch, seqlen, nheads, headdim)
        dt: (batch, seqlen, nheads)
        A: (nheads,), negative (e.g. ``-exp(A_log)``)
        B, C: (batch, seqlen, ngroups, dstate); nheads must be a multiple of ngroups
        D: None, (nheads,) or (nheads, headdim): skip connection
        z: None or like x: output gate
        dt_bias: None or (nheads,)
        dt_softplus: apply softplus to dt + dt_bias
        initial_states: None or (batch, nheads, headdim, dstate)
        seq_idx: None or (batch, seqlen) integer ids, indexed by original position
        scan_order: None or (seqlen,) integer permutation; inputs and outputs stay in their
            original positions, only the order of the recurrence changes
        return_final_states: also return the state after the last scanned position
        chunk_size: chunk length of the block decomposition (``torch`` and ``triton``; Triton
            rounds it up to a power of two >= 16; the result does not depend on it)
        backend: one of ``auto``, ``torch``, ``reference``, ``triton``

    Returns:
        y (batch, seqlen, nheads, headdim) in ``x.dtype``; with ``return_final_states`` the pair
        (y, final_states (batch, nheads, headdim, dstate)), final states in float32 (float64
        for float64 inputs).

    A/D/dt_bias may be float32 while x, B, C are bfloat16 (Mamba-2 keeps them in fp32).
    """
    if backend not in BACKENDS:
        raise ValueError(f"ssd_scan: unknown backend {backend!r}; allowed values: {', '.join(BACKENDS)}")
    _check_inputs(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, scan_order, chunk_size)
    backend = resolve_backend(backend, x, "ssd_scan")

    batch, seqlen, nheads, headdim = x.shape
    if seqlen == 0:  # nothing to scan: the state passes through unchanged
        y = x.new_zeros(x.shape)
        if not return_final_states:
            return y
        sdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        if initial_states is not None:
            return y, initial_states.to(sdtype)
        return y, x.new_zeros(batch, nheads, headdim, B.shape[-1], dtype=sdtype)

    args = (x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_states, seq_idx, scan_order,
            return_final_states)
    if backend == "reference":
        return ssd_scan_reference(*args)
    if backend == "triton":
        from kernels.ssd.triton_scan import ssd_scan_triton

        return ssd_scan_triton(*args, chunk_size=chunk_size)
    return ssd_scan_chunked(*args, chunk_size=chunk_size)


def resolve_backend(backend: str, x: Tensor, who: str = "ssd_scan") -> str:
    """The backend ``ssd_scan`` runs for inputs like x: ``auto`` is ``triton`` for CUDA tensors of
    a supported dtype, ``torch`` otherwise; ``triton`` raises NotImplementedError (naming the way
    out) where the kernels cannot run."""
    if backend == "auto":
        if x.is_cuda and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
            return "triton"
        return "torch"
    if backend == "triton":
        from kernels.ssd.triton_scan import check_runnable

        check_runnable(x, who)
    return backend


def _stack(t, name: str, K: int | None = None) -> Tensor | None:
    """A sequence of per-direction tensors -> one tensor with a leading K (a copy); tensors as is."""
    if t is None or torch.is_tensor(t):
        return t
    items = list(t)
    if K is not None and len(items) != K:
        raise ValueError(f"ssd_scan_multi: {name} must hold K = {K} directions, got {len(items)}")
    return torch.stack(items)


def ssd_scan_multi(
    x: Tensor | Sequence[Tensor],
    dt: Tensor | Sequence[Tensor],
    A: Tensor | Sequence[Tensor],
    B: Tensor | Sequence[Tensor],
    C: Tensor | Sequence[Tensor],
    D: Tensor | Sequence[Tensor] | None = None,
    z: Tensor | Sequence[Tensor] | None = None,
    dt_bias: Tensor | Sequence[Tensor] | None = None,
    dt_softplus: bool = False,
    initial_states: Tensor | Sequence[Tensor] | None = None,
    seq_idx: Tensor | None = None,
    scan_order: Tensor | Sequence[Tensor | None] | None = None,
    return_final_states: bool = False,
    chunk_size: int = 64,
    backend: str = "auto",
    deterministic: bool | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """K scan directions at once: direction k is ``ssd_scan`` of the k-th inputs along scan_order[k].

    Every per-direction input carries a leading K: x, z (K, batch, seqlen, nheads, headdim), dt
    (K, batch, seqlen, nheads), B, C (K, batch, seqlen, ngroups, dstate), initial_states
    (K, batch, nheads, headdim, dstate). Give either one tensor (any strides: K views into one
    projection cost no copy) or a sequence of K tensors (stacked here: a copy). A, D and dt_bias
    are shared by all directions in their ``ssd_scan`` shapes, or per direction with a leading K
    (A (K, nheads); dt_bias (K, nheads); D (K, nheads, headdim), or (K, nheads) when A is
    per-direction). seq_idx (batch, seqlen) is shared (ids by original position). scan_order is
    None, a (K, seqlen) LongTensor, or K entries each a (seqlen,) permutation or None (identity).

    Returns y (K, batch, seqlen, nheads, headdim), and with ``return_final_states`` the final
    states (K, batch, nheads, headdim, dstate). ``backend="triton"`` (``auto`` on CUDA) runs all
    directions in one launch per pass; ``torch`` and ``reference`` loop over the directions.
    ``deterministic`` (Triton backward only; None follows
    ``torch.are_deterministic_algorithms_enabled()``) avoids atomics.
    """
    if backend not in BACKENDS:
        raise ValueError(f"ssd_scan_multi: unknown backend {backend!r}; allowed values: {', '.join(BACKENDS)}")
    x = _stack(x, "x")
    if x.dim() != 5:
        raise _shape_error("x", "(K, batch, seqlen, nheads, headdim)", x)
    K, batch, seqlen = x.shape[:3]
    dt, B, C, z, initial_states = (_stack(t, n, K) for t, n in ((dt, "dt"), (B, "B"), (C, "C"), (z, "z"),
                                                                (initial_states, "initial_states")))
    A, D, dt_bias = (_stack(t, n, K) for t, n in ((A, "A"), (D, "D"), (dt_bias, "dt_bias")))
    per_dir = A.dim() == 2
    A = A if per_dir else A.expand(K, *A.shape)
    if dt_bias is not None and dt_bias.dim() == 1:
        dt_bias = dt_bias.expand(K, *dt_bias.shape)
    if D is not None and (D.dim() == 1 or (D.dim() == 2 and not per_dir)):
        D = D.expand(K, *D.shape)
    if scan_order is not None and not torch.is_tensor(scan_order):
        orders = list(scan_order)
        identity = torch.arange(seqlen, device=x.device)
        scan_order = None if all(o is None for o in orders) else torch.stack(
            [identity if o is None else o for o in orders])
    for name, t in (("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z), ("dt_bias", dt_bias),
                    ("initial_states", initial_states), ("scan_order", scan_order)):
        if t is not None and t.shape[0] != K:
            raise ValueError(f"ssd_scan_multi: {name} must have a leading K = {K} (from x), got {tuple(t.shape)}")
    pick = lambda t, k: None if t is None else t[k]  # noqa: E731
    for k in range(K):  # each direction is a valid ssd_scan call (views, no copies)
        _check_inputs(x[k], dt[k], A[k], B[k], C[k], pick(D, k), pick(z, k), pick(dt_bias, k),
                      pick(initial_states, k), seq_idx, pick(scan_order, k), chunk_size)
    backend = resolve_backend(backend, x, "ssd_scan_multi")

    if backend == "triton" and seqlen > 0:
        from kernels.ssd.triton_scan import ssd_scan_triton_stacked

        seq_k = None if seq_idx is None else seq_idx.expand(K, *seq_idx.shape)
        y, final = ssd_scan_triton_stacked(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_states, seq_k,
                                           scan_order, chunk_size, deterministic)
        return (y, final) if return_final_states else y
    outs = [
        ssd_scan(x[k], dt[k], A[k], B[k], C[k], pick(D, k), pick(z, k), pick(dt_bias, k), dt_softplus,
                 pick(initial_states, k), seq_idx, pick(scan_order, k), True, chunk_size,
                 "torch" if backend == "triton" else backend)
        for k in range(K)
    ]
    y = torch.stack([o[0] for o in outs])
    return (y, torch.stack([o[1] for o in outs])) if return_final_states else y


def _shape_error(name: str, expected: str, got: Tensor) -> ValueError:
    return ValueError(f"ssd_scan: {name} must have shape {expected}, got {tuple(got.shape)}")


def _check_inputs(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, scan_order, chunk_size):
    """Raise ValueError naming the argument, the expected shape and the one received."""
    if x.dim() != 4:
        raise _shape_error("x", "(batch, seqlen, nheads, headdim)", x)
    b, l, h, p = x.shape
    if B.dim() != 4 or B.shape[:2] != (b, l):
        raise _shape_error("B", f"(batch={b}, seqlen={l}, ngroups, dstate)", B)
    g, n = B.shape[2:]
    if g == 0 or h % g:
        raise ValueError(f"ssd_scan: nheads = {h} (x.shape[2]) must be a multiple of ngroups = {g} (B.shape[2])")
    expected = {
        "dt": (dt, (b, l, h), "(batch, seqlen, nheads)"),
        "A": (A, (h,), "(nheads,)"),
        "C": (C, (b, l, g, n), "like B (batch, seqlen, ngroups, dstate)"),
        "z": (z, (b, l, h, p), "like x (batch, seqlen, nheads, headdim)"),
        "dt_bias": (dt_bias, (h,), "(nheads,)"),
        "initial_states": (initial_states, (b, h, p, n), "(batch, nheads, headdim, dstate)"),
        "seq_idx": (seq_idx, (b, l), "(batch, seqlen)"),
        "scan_order": (scan_order, (l,), "(seqlen,)"),
    }
    for name, (t, shape, desc) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            raise _shape_error(name, f"{desc} = {shape}", t)
    if D is not None and tuple(D.shape) not in ((h,), (h, p)):
        raise _shape_error("D", f"(nheads,) = {(h,)} or (nheads, headdim) = {(h, p)}", D)
    check_order_args("ssd_scan", l, seq_idx, scan_order)
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"ssd_scan: chunk_size must be a positive int, got {chunk_size!r}")
