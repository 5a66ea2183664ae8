"""Triton forward and backward of the ordered causal depthwise conv1d, K directions per launch.

Every tensor carries a leading direction axis K (any strides: K views into one projection cost no
copy; a weight, bias or seq_idx shared by the directions is an expanded view with stride 0).
A program owns one (batch b, block of BL scan steps, block of BC channels, direction k):

    forward   step t (original position pos_t = scan_order[t]) reads x at the positions of steps
              t, t-1, ..., t-(W-1) (*gathered* by index on load), stops at the first change of
              seq_idx walking back, adds the bias, applies SiLU and *scatters* y to pos_t.
    backward  with g_t = dy[pos_t] * silu'(pre_t) (pre_t recomputed: the forward keeps nothing
              but its inputs), dx at step s = sum_d weight[W-1-d] * g_{s+d} over the d whose
              steps s..s+d are one run, written to pos_s; dweight and dbias are per-program
              partial sums (a float32 buffer, added up in PyTorch: deterministic, no atomics).

So neither x nor y nor any gradient exists in scan order in memory. The W^2 loads of the
recomputation in the backward (W = 4 in Mamba-2) hit the same few rows, which stay in cache.
On CPU the kernels run only under Triton's interpreter: ``TRITON_INTERPRET=1`` must be set
before this module is first imported (:func:`kernels_interpreted` says whether it was).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _pos(order_ptr, k, step, ok, s_ok, s_ol, HAS_ORDER: tl.constexpr):
    """Original position of each scan step (int64); 0 where not ok."""
    if HAS_ORDER:
        return tl.load(order_ptr + k * s_ok + step * s_ol, mask=ok, other=0).to(tl.int64)
    return tl.where(ok, step, 0).to(tl.int64)


@triton.jit
def _seq(seq_ptr, order_ptr, k, b, step, ok, s_sk, s_sb, s_sl, s_ok, s_ol, HAS_ORDER: tl.constexpr):
    pos = _pos(order_ptr, k, step, ok, s_ok, s_ol, HAS_ORDER)
    return tl.load(seq_ptr + k * s_sk + b * s_sb + pos * s_sl, mask=ok, other=0)


@triton.jit
def _pre_activation(
    t, t_ok, k, b, offs_c, mc, L,
    x_ptr, w_ptr, bias_ptr, seq_ptr, order_ptr,
    s_xk, s_xb, s_xl, s_xc, s_wk, s_wc, s_wj, s_bk, s_bc, s_sk, s_sb, s_sl, s_ok, s_ol,
    W: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_ORDER: tl.constexpr,
):
    """bias + sum of the taps of scan steps t (BL,) for channels offs_c (BC,): (BL, BC) float32."""
    acc = tl.zeros([BL, BC], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + k * s_bk + offs_c * s_bc, mask=mc, other=0.0).to(tl.float32)[None, :]
    alive = t_ok
    if HAS_SEQ:
        nxt = _seq(seq_ptr, order_ptr, k, b, t, t_ok, s_sk, s_sb, s_sl, s_ok, s_ol, HAS_ORDER)
    for d in tl.static_range(W):  # d steps back: tap W-1-d
        s = t - d
        alive = alive & (s >= 0)
        if HAS_SEQ:
            if d > 0:
                cur = _seq(seq_ptr, order_ptr, k, b, s, alive, s_sk, s_sb, s_sl, s_ok, s_ol, HAS_ORDER)
                alive = alive & (cur == nxt)
                nxt = cur
        pos = _pos(order_ptr, k, s, alive, s_ok, s_ol, HAS_ORDER)
        xv = tl.load(x_ptr + k * s_xk + b * s_xb + pos[:, None] * s_xl + offs_c[None, :] * s_xc,
                     mask=alive[:, None] & mc[None, :], other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + k * s_wk + offs_c * s_wc + (W - 1 - d) * s_wj, mask=mc, other=0.0).to(tl.float32)
        acc += xv * wv[None, :]
    return acc


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, seq_ptr, order_ptr, y_ptr,
    L, C, nblocks,
    s_xk, s_xb, s_xl, s_xc, s_wk, s_wc, s_wj, s_bk, s_bc, s_sk, s_sb, s_sl, s_ok, s_ol,
    s_yk, s_yb, s_yl, s_yc,
    W: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr, SILU: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_ORDER: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // nblocks).to(tl.int64)
    t = (pid % nblocks) * BL + tl.arange(0, BL)
    offs_c = tl.program_id(1) * BC + tl.arange(0, BC)
    k = tl.program_id(2).to(tl.int64)
    t_ok = t < L
    mc = offs_c < C
    acc = _pre_activation(t, t_ok, k, b, offs_c, mc, L, x_ptr, w_ptr, bias_ptr, seq_ptr, order_ptr,
                          s_xk, s_xb, s_xl, s_xc, s_wk, s_wc, s_wj, s_bk, s_bc, s_sk, s_sb, s_sl, s_ok, s_ol,
                          W, BL, BC, HAS_BIAS, HAS_SEQ, HAS_ORDER)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    pos = _pos(order_ptr, k, t, t_ok, s_ok, s_ol, HAS_ORDER)
    tl.store(y_ptr + k * s_yk + b * s_yb + pos[:, None] * s_yl + offs_c[None, :] * s_yc,
             acc.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & mc[None, :])


@triton.jit
def _grad_pre(
    t, t_ok, k, b, offs_c, mc, L,
    x_ptr, w_ptr, bias_ptr, seq_ptr, order_ptr, dy_ptr,
    s_xk, s_xb, s_xl, s_xc, s_wk, s_wc, s_wj, s_bk, s_bc, s_sk, s_sb, s_sl, s_ok, s_ol,
    s_gk, s_gb, s_gl, s_gc,
    W: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr, SILU: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_ORDER: tl.constexpr,
):
    """dLoss/d(pre-activation) at scan steps t: (BL, BC) float32, zero where not t_ok."""
    pos = _pos(order_ptr, k, t, t_ok, s_ok, s_ol, HAS_ORDER)
    g = tl.load(dy_ptr + k * s_gk + b * s_gb + pos[:, None] * s_gl + offs_c[None, :] * s_gc,
                mask=t_ok[:, None] & mc[None, :], other=0.0).to(tl.float32)
    if SILU:
        pre = _pre_activation(t, t_ok, k, b, offs_c, mc, L, x_ptr, w_ptr, bias_ptr, seq_ptr, order_ptr,
                              s_xk, s_xb, s_xl, s_xc, s_wk, s_wc, s_wj, s_bk, s_bc, s_sk, s_sb, s_sl, s_ok, s_ol,
                              W, BL, BC, HAS_BIAS, HAS_SEQ, HAS_ORDER)
        sig = tl.sigmoid(pre)
        g = g * sig * (1.0 + pre * (1.0 - sig))
    return g


@triton.jit
def _conv_bwd_kernel(
    x_ptr, w_ptr, bias_ptr, seq_ptr, order_ptr, dy_ptr, dx_ptr, dw_ptr, db_ptr,
    L, C, nblocks,
    s_xk, s_xb, s_xl, s_xc, s_wk, s_wc, s_wj, s_bk, s_bc, s_sk, s_sb, s_sl, s_ok, s_ol,
    s_gk, s_gb, s_gl, s_gc,
    W: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr, SILU: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_ORDER: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // nblocks).to(tl.int64)
    s = (pid % nblocks) * BL + tl.arange(0, BL)
    offs_c = tl.program_id(1) * BC + tl.arange(0, BC)
    k = tl.program_id(2).to(tl.int64)
    valid = s < L
    mc = offs_c < C
    # dx[s] = sum_d w[W-1-d] g[s+d], over the d for which steps s..s+d are one run
    alive = valid
    if HAS_SEQ:
        prev = _seq(seq_ptr, order_ptr, k, b, s, valid, s_sk, s_sb, s_sl, s_ok, s_ol, HAS_ORDER)
    dx = tl.zeros([BL, BC], dtype=tl.float32)
    for d in tl.static_range(W):
        t = s + d
        alive = alive & (t < L)
        if HAS_SEQ:
            if d > 0:
                cur = _seq(seq_ptr, order_ptr, k, b, t, alive, s_sk, s_sb, s_sl, s_ok, s_ol, HAS_ORDER)
                alive = alive & (cur == prev)
                prev = cur
        g = _grad_pre(t, alive, k, b, offs_c, mc, L, x_ptr, w_ptr, bias_ptr, seq_ptr, order_ptr, dy_ptr,
                      s_xk, s_xb, s_xl, s_xc, s_wk, s_wc, s_wj, s_bk, s_bc, s_sk, s_sb, s_sl, s_ok, s_ol,
                      s_gk, s_gb, s_gl, s_gc, W, BL, BC, SILU, HAS_BIAS, HAS_SEQ, HAS_ORDER)
        wv = tl.load(w_ptr + k * s_wk + offs_c * s_wc + (W - 1 - d) * s_wj, mask=mc, other=0.0).to(tl.float32)
        dx += g * wv[None, :]
    pos = _pos(order_ptr, k, s, valid, s_ok, s_ol, HAS_ORDER)
    tl.store(dx_ptr + k * s_gk + b * s_gb + pos[:, None] * s_gl + offs_c[None, :] * s_gc,
             dx.to(dx_ptr.dtype.element_ty), mask=valid[:, None] & mc[None, :])

    # dweight[:, W-1-d] += sum_s g[s] x[s-d], dbias += sum_s g[s]: this program's partial sums
    g0 = _grad_pre(s, valid, k, b, offs_c, mc, L, x_ptr, w_ptr, bias_ptr, seq_ptr, order_ptr, dy_ptr,
                   s_xk, s_xb, s_xl, s_xc, s_wk, s_wc, s_wj, s_bk, s_bc, s_sk, s_sb, s_sl, s_ok, s_ol,
                   s_gk, s_gb, s_gl, s_gc, W, BL, BC, SILU, HAS_BIAS, HAS_SEQ, HAS_ORDER)
    part = (k * tl.num_programs(0) + pid).to(tl.int64) * C  # row of the (K, programs, C) partials
    if HAS_BIAS:
        tl.store(db_ptr + part + offs_c, tl.sum(g0, axis=0), mask=mc)
    alive = valid
    if HAS_SEQ:
        nxt = _seq(seq_ptr, order_ptr, k, b, s, valid, s_sk, s_sb, s_sl, s_ok, s_ol, HAS_ORDER)
    for d in tl.static_range(W):
        src = s - d
        alive = alive & (src >= 0)
        if HAS_SEQ:
            if d > 0:
                cur = _seq(seq_ptr, order_ptr, k, b, src, alive, s_sk, s_sb, s_sl, s_ok, s_ol, HAS_ORDER)
                alive = alive & (cur == nxt)
                nxt = cur
        p = _pos(order_ptr, k, src, alive, s_ok, s_ol, HAS_ORDER)
        xv = tl.load(x_ptr + k * s_xk + b * s_xb + p[:, None] * s_xl + offs_c[None, :] * s_xc,
                     mask=alive[:, None] & mc[None, :], other=0.0).to(tl.float32)
        tl.store(dw_ptr + (part + offs_c) * W + (W - 1 - d), tl.sum(g0 * xv, axis=0), mask=mc)


def kernels_interpreted() -> bool:
    """True when the kernels were built by Triton's interpreter (they then run on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_conv_fwd_kernel, InterpretedFunction)


def check_runnable(x: Tensor, who: str) -> None:
    """Raise NotImplementedError (naming the way out) where the Triton kernels cannot run."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise NotImplementedError(
            f"{who}: backend='triton' supports float32, float16 and bfloat16 inputs, got {x.dtype}; "
            "use backend='torch' or backend='reference'"
        )
    if x.device.type != "cuda" and not kernels_interpreted():
        raise NotImplementedError(
            f"{who}: backend='triton' needs CUDA tensors (got {x.device.type}); on CPU use "
            "backend='torch', or set TRITON_INTERPRET=1 before kernels.conv1d.triton_conv is first "
            "imported to run the kernels in Triton's (slow) interpreter"
        )


def _launch_args(x, weight, bias, seq_idx, scan_order):
    """Grid, block sizes, and the dummy-filled pointer / stride arguments shared by both kernels."""
    K, batch, L, C = x.shape
    BL = min(64, max(16, triton.next_power_of_2(L)))
    BC = min(64, max(16, triton.next_power_of_2(C)))
    nblocks = triton.cdiv(L, BL)
    dummy = x
    strides = lambda t, n: tuple(t.stride()) if t is not None else (0,) * n  # noqa: E731
    ptrs = (x, weight, bias if bias is not None else dummy, seq_idx if seq_idx is not None else dummy,
            scan_order if scan_order is not None else dummy)
    st = (*x.stride(), *weight.stride(), *strides(bias, 2), *strides(seq_idx, 3), *strides(scan_order, 2))
    flags = dict(W=weight.shape[-1], BL=BL, BC=BC, HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None,
                 HAS_ORDER=scan_order is not None)
    return (batch * nblocks, triton.cdiv(C, BC), K), nblocks, ptrs, st, flags


def conv_fwd_triton(x, weight, bias, seq_idx, scan_order, silu: bool) -> Tensor:
    """x (K, b, L, C); weight (K, C, W); bias (K, C) or None; seq_idx (K, b, L) or None;
    scan_order (K, L) long or None (strides of 0 for shared ones). Returns y (K, b, L, C) in x.dtype."""
    grid, nblocks, ptrs, st, flags = _launch_args(x, weight, bias, seq_idx, scan_order)
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    _conv_fwd_kernel[grid](*ptrs, y, x.shape[2], x.shape[3], nblocks, *st, *y.stride(), SILU=silu, **flags)
    return y


def conv_bwd_triton(dy, x, weight, bias, seq_idx, scan_order, silu: bool):
    """Gradients (dx (K, b, L, C) in x.dtype, dweight (K, C, W) float32, dbias (K, C) float32 or None)."""
    grid, nblocks, ptrs, st, flags = _launch_args(x, weight, bias, seq_idx, scan_order)
    K, _, L, C = x.shape
    dy = dy.contiguous()
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    nprog = grid[0]
    dw = torch.empty(K, nprog, C, weight.shape[-1], device=x.device, dtype=torch.float32)
    db = torch.empty(K, nprog, C, device=x.device, dtype=torch.float32) if bias is not None else dw
    _conv_bwd_kernel[grid](*ptrs, dy, dx, dw, db, L, C, nblocks, *st, *dy.stride(), SILU=silu, **flags)
    return dx, dw.sum(1), (db.sum(1) if bias is not None else None)


class CausalConv1dFn(torch.autograd.Function):
    """Direction-stacked ordered causal conv1d; weight (C, W) / bias (C,) may be shared by the K."""

    @staticmethod
    def forward(ctx, x, weight, bias, seq_idx, scan_order, silu):
        K = x.shape[0]
        w3 = weight if weight.dim() == 3 else weight.expand(K, *weight.shape)
        b2 = bias if bias is None or bias.dim() == 2 else bias.expand(K, *bias.shape)
        ctx.save_for_backward(x, weight, bias, seq_idx, scan_order)
        ctx.silu = silu
        return conv_fwd_triton(x, w3, b2, seq_idx, scan_order, silu)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, seq_idx, scan_order = ctx.saved_tensors
        K = x.shape[0]
        w3 = weight if weight.dim() == 3 else weight.expand(K, *weight.shape)
        b2 = bias if bias is None or bias.dim() == 2 else bias.expand(K, *bias.shape)
        dx, dw, db = conv_bwd_triton(dy, x, w3, b2, seq_idx, scan_order, ctx.silu)
        if weight.dim() == 2:  # shared by the directions: their gradients add up
            dw = dw.sum(0)
        if bias is not None:
            db = (db if bias.dim() == 2 else db.sum(0)).to(bias.dtype)
        return dx, dw.to(weight.dtype), db, None, None, None


def causal_conv1d_triton_stacked(x, weight, bias=None, seq_idx=None, scan_order=None, silu=True) -> Tensor:
    """K directions in one launch per pass; shapes as in :func:`kernels.conv1d.causal_conv1d_multi`
    after its normalization (seq_idx (K, b, L), scan_order (K, L) or None)."""
    return CausalConv1dFn.apply(x, weight, bias, seq_idx, scan_order, bool(silu))
