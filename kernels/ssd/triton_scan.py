"""The Triton SSD scan as an autograd Function, for one direction or K directions in one launch.

Kernels: ``triton_fwd.py`` (forward) and ``triton_bwd.py`` (backward); both take inputs with a
leading direction dimension K (any strides, so K views of one projection cost no copy). The
public entry points are :func:`kernels.ssd.ssd_scan` (``backend="triton"``) and
:func:`kernels.ssd.ssd_scan_multi`, which validate their arguments and call in here.

On CPU the kernels run only under Triton's interpreter: ``TRITON_INTERPRET=1`` must be set before
this module (which decorates the kernels) is first imported; :func:`kernels_interpreted` says
whether it was.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.ssd import triton_fwd
from kernels.ssd.triton_bwd import ssd_bwd_triton
from kernels.ssd.triton_fwd import chunk_block, headdim_block, launch_settings, ssd_fwd_triton, tuning

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernels_interpreted() -> bool:
    """True when the kernels were built by Triton's interpreter (they then run on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(triton_fwd._ssd_fwd_kernel, InterpretedFunction)


def check_runnable(x: Tensor, who: str) -> None:
    """Raise NotImplementedError (naming the way out) where the Triton kernels cannot run."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise NotImplementedError(
            f"{who}: backend='triton' supports float32, float16 and bfloat16 inputs, got {x.dtype}; "
            "use backend='torch' or backend='reference' (both compute in float64)"
        )
    if x.device.type != "cuda" and not kernels_interpreted():
        raise NotImplementedError(
            f"{who}: backend='triton' needs CUDA tensors (got {x.device.type}); on CPU use "
            "backend='torch', or set TRITON_INTERPRET=1 before kernels.ssd.triton_scan is first "
            "imported to run the kernels in Triton's (slow) interpreter"
        )


class SSDScanFn(torch.autograd.Function):
    """Direction-stacked SSD scan: forward and backward in Triton (see ``triton_bwd.py``)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, scan_order,
                dt_softplus, chunk_size, deterministic):
        # launch settings are read once, here: the backward runs later (after the caller may have
        # left the scope that set MDM_SSD_TUNE / MDM_SSD_HEADDIM_BLOCK) and must use the same ones
        K, batch, L, nheads, headdim = x.shape
        programs = K * batch * nheads
        tune = launch_settings(tuning(), x.device)

        def block_p(parallel: int, chunk_key: str) -> int:
            # the chunk-parallel kernels run one program per chunk too: a full grid without headdim blocks
            n = programs * (-(-L // chunk_block(chunk_size, tune.get(chunk_key))) if parallel else 1)
            return headdim_block(headdim, n, x.device)

        if tune["fwd_parallel"]:
            from kernels.ssd.triton_par import ssd_fwd_parallel

            y, final = ssd_fwd_parallel(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_states, seq_idx,
                                        scan_order, chunk_size, block_p=block_p(1, "fwd_chunk"), tune=tune)
        else:
            y, final, _ = ssd_fwd_triton(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_states, seq_idx,
                                         scan_order, chunk_size, block_p=block_p(0, "fwd_chunk"), tune=tune)
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, scan_order)
        ctx.opts = (dt_softplus, chunk_size, deterministic)
        ctx.launch = dict(block_p=block_p(tune["bwd_parallel"], "bwd_chunk"), tune=tune)
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, scan_order = ctx.saved_tensors
        dt_softplus, chunk_size, deterministic = ctx.opts
        if dy is None:
            dy = torch.zeros_like(x)
        bwd = ssd_bwd_triton
        if ctx.launch["tune"]["bwd_parallel"]:
            from kernels.ssd.triton_par import ssd_bwd_parallel as bwd
        grads = bwd(dy, dfinal, x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_states,
                    seq_idx, scan_order, chunk_size, deterministic, **ctx.launch)
        return (*grads, None, None, None, None, None)


def ssd_scan_triton_stacked(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                            initial_states=None, seq_idx=None, scan_order=None, chunk_size=64,
                            deterministic=None) -> tuple[Tensor, Tensor]:
    """K directions at once; every tensor carries the leading K (see ``ssd_fwd_triton``).

    Returns (y (K, b, L, h, p) in x.dtype, final states (K, b, h, p, n) float32).
    ``deterministic=None`` follows ``torch.are_deterministic_algorithms_enabled()``.
    """
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    return SSDScanFn.apply(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, scan_order,
                           bool(dt_softplus), int(chunk_size), bool(deterministic))


def ssd_scan_triton(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, initial_states=None,
                    seq_idx=None, scan_order=None, return_final_states=False, chunk_size=64,
                    deterministic=None):
    """One direction: the arguments and result of :func:`kernels.ssd.ssd_scan` (validated there)."""
    one = lambda t: None if t is None else t.unsqueeze(0)  # noqa: E731  a K=1 view, no copy
    y, final = ssd_scan_triton_stacked(
        one(x), one(dt), one(A), one(B), one(C), one(D), one(z), one(dt_bias), dt_softplus,
        one(initial_states), one(seq_idx), one(scan_order), chunk_size, deterministic)
    if return_final_states:
        return y[0], final[0]
    return y[0]
