"""The SSD (Mamba-2 state space duality) scan: one public entry point, :func:`ssd_scan`.

Backends (same function, different speed):
  * ``torch``: chunked block decomposition in plain PyTorch (``chunked.py``); the CPU path.
  * ``reference``: a sequential loop over positions (``reference.py``); the ground truth.
  * ``triton``: fused GPU kernels; not built yet (a later issue adds them).
  * ``auto``: picks ``torch`` for now.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.ssd.chunked import ssd_scan_chunked
from kernels.ssd.reference import ssd_scan_reference

__all__ = ["BACKENDS", "ssd_scan", "ssd_scan_chunked", "ssd_scan_reference"]

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
        chunk_size: chunk length of the block decomposition (``torch`` backend)
        backend: one of ``auto``, ``torch``, ``reference``, ``triton``

    Returns:
        y (batch, seqlen, nheads, headdim) in ``x.dtype``; with ``return_final_states`` the pair
        (y, final_states (batch, nheads, headdim, dstate)), final states in float32 (float64
        for float64 inputs).

    A/D/dt_bias may be float32 while x, B, C are bfloat16 (Mamba-2 keeps them in fp32).
    """
    if backend not in BACKENDS:
        raise ValueError(f"ssd_scan: unknown backend {backend!r}; allowed values: {', '.join(BACKENDS)}")
    if backend == "triton":
        raise NotImplementedError(
            "ssd_scan: the Triton SSD kernels are not built yet; use backend='torch' "
            "(or 'auto', which picks torch for now)"
        )
    _check_inputs(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, scan_order, chunk_size)

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
    return ssd_scan_chunked(*args, chunk_size=chunk_size)


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
    for name, t in (("seq_idx", seq_idx), ("scan_order", scan_order)):
        if t is not None and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
            raise ValueError(f"ssd_scan: {name} must be an integer tensor, got dtype {t.dtype}")
    if scan_order is not None:
        if scan_order.dtype != torch.long:
            raise ValueError(f"ssd_scan: scan_order must be a LongTensor (torch.long), got {scan_order.dtype}")
        # Checking the permutation costs a sort; skip it on accelerators to avoid a host sync.
        if scan_order.device.type == "cpu" and not torch.equal(
            scan_order.sort().values, torch.arange(l, device=scan_order.device)
        ):
            raise ValueError(f"ssd_scan: scan_order must be a permutation of 0..{l - 1}")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"ssd_scan: chunk_size must be a positive int, got {chunk_size!r}")
