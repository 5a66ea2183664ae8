"""Chunk-parallel Triton SSD scan: the chunks of a sequence run in parallel programs.

The sequential kernels (``triton_fwd.py``, ``triton_bwd.py``) give each (batch, head, direction)
one program that walks its chunks in order, carrying the state in registers: no state ever goes
to memory, but a program's time is the sum of its chunks' latencies, and one direction at batch 1
fills a fraction of a large GPU. Here every pass that does the chunk math is parallel over
(batch, head, headdim block, chunk, direction), as in mamba-ssm's SSD kernels, and only a light
pass over the chunk-boundary states is sequential:

forward   1. ``_par_state_kernel``  per chunk: its own state term S_c and the decay of the state
                                    entering it (``_chunk_state``), written to a buffer
          2. ``_par_pass_kernel``   per (b, h, k) tile of the state, chunk by chunk: replaces S_c
                                    by the state entering chunk c, H_c; H_{c+1} = decay_c H_c + S_c
          3. ``_par_out_kernel``    per chunk: y from the chunk and H_c (``_chunk_y``), D, gate
backward  1-2. as above: H_c for every chunk
          3. ``_par_dstate_kernel`` per chunk: its own term of dLoss/d(state entering it),
                                    dH_c = sum_l e_l outer(g_l, C_l)
          4. ``_par_pass_kernel``   reversed: replaces dH_c by G_c = dLoss/d(state leaving chunk c);
                                    G_{c-1} = decay_c G_c + dH_c, ending in d(initial states)
          5. ``_par_grad_kernel``   per chunk: every gradient from H_c and G_c (``_chunk_grads``),
                                    optionally with dstate in blocks (``bwd_nblock``: fewer spills)

The per-chunk math is the sequential kernels' own (shared jit helpers), so both compute the same
function; the buffers cost (K, batch, nheads, nchunks, headdim, dstate) float32. Scan orders are
gathered on load and scattered on store as there. On CUDA the backward runs here by default
(``triton_fwd.launch_settings``); ``MDM_SSD_TUNE=fwd_parallel=1`` / ``parallel=1`` for the forward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.ssd.triton_bwd import _chunk_grads, _chunk_grads_core, _store_dbc, finish_grads, grad_buffers
from kernels.ssd.triton_fwd import (_apply_D_z, _block, _chunk_state, _chunk_y, _head_params, _load_bc, _load_chunk,
                                    _load_rows, _prec, _strides, chunk_block, headdim_block, tuning)


@triton.jit
def _program_ids(nheads, npb, BP: tl.constexpr):
    """(pid, chunk c, direction k, b, h, headdim block j, its first column p0, index of (k, b, h))."""
    pid = tl.program_id(0)
    c = tl.program_id(1).to(tl.int64)
    k = tl.program_id(2).to(tl.int64)
    bh = pid // npb
    j = (pid % npb).to(tl.int64)
    b = (bh // nheads).to(tl.int64)
    h = (bh % nheads).to(tl.int64)
    kbh = k * (tl.num_programs(0) // npb) + bh
    return pid, c, k, b, h, j, j * BP, kbh.to(tl.int64)


@triton.jit
def _par_chunk(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, seq_ptr, order_ptr,
    L, nheads, rep, headdim, dstate, npb,
    s_xk, s_xb, s_xl, s_xh, s_xp, s_dk, s_db, s_dl, s_dh, s_ak, s_ah,
    s_bk, s_bb, s_bl, s_bg, s_bn, s_ck, s_cb, s_cl, s_cg, s_cn, s_Dk, s_Dh, s_Dp, s_biask, s_biash,
    s_sk, s_sb, s_sl, s_ok, s_ol,
    BQ: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, HAS_D: tl.constexpr, D_HDIM: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_ORDER: tl.constexpr,
):
    """This program's chunk: its indices, head parameters and gathered rows (``_load_chunk``)."""
    pid, c, k, b, h, j, p0, kbh = _program_ids(nheads, npb, BP)
    offs_p = p0 + tl.arange(0, BP)
    mp = offs_p < headdim
    A_h, bias_h, Dv = _head_params(A_ptr, bias_ptr, D_ptr, k, h, offs_p, mp, s_ak, s_ah, s_biask, s_biash,
                                   s_Dk, s_Dh, s_Dp, HAS_BIAS, HAS_D, D_HDIM)
    pos, valid, dt_raw, dtv, acs, x, Bm, Cm, seg = _load_chunk(
        c, L, k, b, h, h // rep, p0, A_h, bias_h, x_ptr, dt_ptr, B_ptr, C_ptr, seq_ptr, order_ptr,
        s_xk, s_xb, s_xl, s_xh, s_xp, s_dk, s_db, s_dl, s_dh, s_bk, s_bb, s_bl, s_bg, s_bn,
        s_ck, s_cb, s_cl, s_cg, s_cn, s_sk, s_sb, s_sl, s_ok, s_ol, headdim, dstate,
        BQ, BP, BN, HAS_BIAS, SOFTPLUS, HAS_SEQ, HAS_ORDER)
    return (pid, c, k, b, h, j, kbh, offs_p, mp, A_h, bias_h, Dv,
            pos, valid, dt_raw, dtv, acs, x, Bm, Cm, seg)


@triton.jit
def _par_state_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, bias_ptr, seq_ptr, order_ptr, S_ptr, decay_ptr,
    L, nheads, rep, headdim, dstate, nchunks, npb,
    s_xk, s_xb, s_xl, s_xh, s_xp, s_dk, s_db, s_dl, s_dh, s_ak, s_ah,
    s_bk, s_bb, s_bl, s_bg, s_bn, s_ck, s_cb, s_cl, s_cg, s_cn, s_biask, s_biash,
    s_sk, s_sb, s_sl, s_ok, s_ol,
    BQ: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_ORDER: tl.constexpr,
    PREC: tl.constexpr,
):
    (pid, c, k, b, h, j, kbh, offs_p, mp, A_h, bias_h, Dv,
     pos, valid, dt_raw, dtv, acs, x, Bm, Cm, seg) = _par_chunk(
        x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, A_ptr, bias_ptr, seq_ptr, order_ptr,
        L, nheads, rep, headdim, dstate, npb,
        s_xk, s_xb, s_xl, s_xh, s_xp, s_dk, s_db, s_dl, s_dh, s_ak, s_ah,
        s_bk, s_bb, s_bl, s_bg, s_bn, s_ck, s_cb, s_cl, s_cg, s_cn, 0, 0, 0, s_biask, s_biash,
        s_sk, s_sb, s_sl, s_ok, s_ol, BQ, BP, BN, False, False, HAS_BIAS, SOFTPLUS, HAS_SEQ, HAS_ORDER)
    offs_q = tl.arange(0, BQ)
    offs_n = tl.arange(0, BN)
    S, chunk_decay = _chunk_state(x, Bm, dtv, acs, seg, offs_q, BQ, x_ptr.dtype.element_ty, PREC)
    tile = (kbh * nchunks + c) * headdim * dstate + offs_p[:, None] * dstate + offs_n[None, :]
    tl.store(S_ptr + tile, S, mask=mp[:, None] & (offs_n < dstate)[None, :])
    tl.store(decay_ptr + kbh * nchunks + c, chunk_decay)  # the same value from every headdim block


@triton.jit
def _par_pass_kernel(
    buf_ptr, decay_ptr, init_ptr, out_ptr,
    batch, nheads, headdim, dstate, nchunks,
    s_ik, s_ib, s_ih, s_ip, s_in,
    TP: tl.constexpr, TN: tl.constexpr, HAS_INIT: tl.constexpr, REVERSE: tl.constexpr,
):
    """Chunk by chunk over one (TP, TN) tile of the (k, b, h) state: buf[c] is replaced by the carry
    before chunk c (in scan order, or reversed), carry = decay_c * carry + buf[c]; out = the last carry."""
    kbh = tl.program_id(0).to(tl.int64)
    offs_p = tl.program_id(1) * TP + tl.arange(0, TP)
    offs_n = tl.program_id(2) * TN + tl.arange(0, TN)
    mask = (offs_p < headdim)[:, None] & (offs_n < dstate)[None, :]
    k = kbh // (batch * nheads)
    b = (kbh // nheads) % batch
    h = kbh % nheads
    if HAS_INIT:
        H = tl.load(init_ptr + k * s_ik + b * s_ib + h * s_ih + offs_p[:, None] * s_ip + offs_n[None, :] * s_in,
                    mask=mask, other=0.0).to(tl.float32)
    else:
        H = tl.zeros([TP, TN], dtype=tl.float32)
    tile = offs_p[:, None] * dstate + offs_n[None, :]
    for i in range(nchunks):
        if REVERSE:
            c = nchunks - 1 - i
        else:
            c = i
        at = buf_ptr + (kbh * nchunks + c) * headdim * dstate + tile
        S = tl.load(at, mask=mask, other=0.0)
        tl.store(at, H, mask=mask)
        H = H * tl.load(decay_ptr + kbh * nchunks + c) + S
    tl.store(out_ptr + kbh * headdim * dstate + tile, H, mask=mask)


@triton.jit
def _par_out_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr, order_ptr, states_ptr, y_ptr,
    L, nheads, rep, headdim, dstate, nchunks, npb,
    s_xk, s_xb, s_xl, s_xh, s_xp, s_dk, s_db, s_dl, s_dh, s_ak, s_ah,
    s_bk, s_bb, s_bl, s_bg, s_bn, s_ck, s_cb, s_cl, s_cg, s_cn,
    s_Dk, s_Dh, s_Dp, s_zk, s_zb, s_zl, s_zh, s_zp, s_biask, s_biash,
    s_sk, s_sb, s_sl, s_ok, s_ol, s_yk, s_yb, s_yl, s_yh, s_yp,
    BQ: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    HAS_D: tl.constexpr, D_HDIM: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_ORDER: tl.constexpr, PREC: tl.constexpr,
):
    (pid, c, k, b, h, j, kbh, offs_p, mp, A_h, bias_h, Dv,
     pos, valid, dt_raw, dtv, acs, x, Bm, Cm, seg) = _par_chunk(
        x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, seq_ptr, order_ptr,
        L, nheads, rep, headdim, dstate, npb,
        s_xk, s_xb, s_xl, s_xh, s_xp, s_dk, s_db, s_dl, s_dh, s_ak, s_ah,
        s_bk, s_bb, s_bl, s_bg, s_bn, s_ck, s_cb, s_cl, s_cg, s_cn, s_Dk, s_Dh, s_Dp, s_biask, s_biash,
        s_sk, s_sb, s_sl, s_ok, s_ol, BQ, BP, BN, HAS_D, D_HDIM, HAS_BIAS, SOFTPLUS, HAS_SEQ, HAS_ORDER)
    offs_q = tl.arange(0, BQ)
    offs_n = tl.arange(0, BN)
    H = tl.load(states_ptr + (kbh * nchunks + c) * headdim * dstate + offs_p[:, None] * dstate + offs_n[None, :],
                mask=mp[:, None] & (offs_n < dstate)[None, :], other=0.0)
    causal = offs_q[:, None] >= offs_q[None, :]
    y = _chunk_y(Cm, Bm, x, dtv, acs, seg, H, causal, x_ptr.dtype.element_ty, PREC)
    omask = valid[:, None] & mp[None, :]
    zv = 0.0
    if HAS_Z:
        zv = tl.load(z_ptr + k * s_zk + b * s_zb + pos[:, None] * s_zl + h * s_zh + offs_p[None, :] * s_zp,
                     mask=omask, other=0.0).to(tl.float32)
    y = _apply_D_z(y, x, Dv, zv, HAS_D, D_HDIM, HAS_Z)
    tl.store(y_ptr + k * s_yk + b * s_yb + pos[:, None] * s_yl + h * s_yh + offs_p[None, :] * s_yp,
             y.to(y_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _par_dstate_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, z_ptr, bias_ptr, seq_ptr, order_ptr, dy_ptr, dH_ptr,
    L, nheads, rep, headdim, dstate, nchunks, npb,
    s_xk, s_xb, s_xl, s_xh, s_xp, s_dk, s_db, s_dl, s_dh, s_ak, s_ah,
    s_bk, s_bb, s_bl, s_bg, s_bn, s_ck, s_cb, s_cl, s_cg, s_cn,
    s_zk, s_zb, s_zl, s_zh, s_zp, s_biask, s_biash,
    s_sk, s_sb, s_sl, s_ok, s_ol, s_yk, s_yb, s_yl, s_yh, s_yp,
    BQ: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr,
    HAS_ORDER: tl.constexpr, PREC: tl.constexpr,
):
    (pid, c, k, b, h, j, kbh, offs_p, mp, A_h, bias_h, Dv,
     pos, valid, dt_raw, dtv, acs, x, Bm, Cm, seg) = _par_chunk(
        x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, A_ptr, bias_ptr, seq_ptr, order_ptr,
        L, nheads, rep, headdim, dstate, npb,
        s_xk, s_xb, s_xl, s_xh, s_xp, s_dk, s_db, s_dl, s_dh, s_ak, s_ah,
        s_bk, s_bb, s_bl, s_bg, s_bn, s_ck, s_cb, s_cl, s_cg, s_cn, 0, 0, 0, s_biask, s_biash,
        s_sk, s_sb, s_sl, s_ok, s_ol, BQ, BP, BN, False, False, HAS_BIAS, SOFTPLUS, HAS_SEQ, HAS_ORDER)
    offs_n = tl.arange(0, BN)
    omask = valid[:, None] & mp[None, :]
    gy = tl.load(dy_ptr + k * s_yk + b * s_yb + pos[:, None] * s_yl + h * s_yh + offs_p[None, :] * s_yp,
                 mask=omask, other=0.0).to(tl.float32)
    if HAS_Z:
        zv = tl.load(z_ptr + k * s_zk + b * s_zb + pos[:, None] * s_zl + h * s_zh + offs_p[None, :] * s_zp,
                     mask=omask, other=0.0).to(tl.float32)
        gy = gy * zv * tl.sigmoid(zv)
    e = tl.where(seg == 0, tl.exp(acs), 0.0)
    dH = tl.dot(tl.trans((gy * e[:, None]).to(x_ptr.dtype.element_ty)), Cm, input_precision=PREC)
    tl.store(dH_ptr + (kbh * nchunks + c) * headdim * dstate + offs_p[:, None] * dstate + offs_n[None, :], dH,
             mask=mp[:, None] & (offs_n < dstate)[None, :])


@triton.jit
def _state_block(buf_ptr, base, offs_p, mp, n0, dstate, BN: tl.constexpr):
    """Columns n0 .. n0+BN-1 of one chunk's (headdim, dstate) float32 state in a buffer."""
    offs_n = n0 + tl.arange(0, BN)
    return tl.load(buf_ptr + base + offs_p[:, None] * dstate + offs_n[None, :],
                   mask=mp[:, None] & (offs_n < dstate)[None, :], other=0.0)


@triton.jit
def _load_dy_z(dy_ptr, z_ptr, out, k, b, h, pos, offs_p, omask, s_zk, s_zb, s_zl, s_zh, s_zp, HAS_Z: tl.constexpr):
    """dLoss/dy of one chunk's rows (``out``: their offsets in y's layout) and the gate z (dy without)."""
    dy = tl.load(dy_ptr + out, mask=omask, other=0.0).to(tl.float32)
    zv = dy
    if HAS_Z:
        zv = tl.load(z_ptr + k * s_zk + b * s_zb + pos[:, None] * s_zl + h * s_zh + offs_p[None, :] * s_zp,
                     mask=omask, other=0.0).to(tl.float32)
    return dy, zv


@triton.jit
def _store_rows(dx_ptr, dz_ptr, ddt_ptr, dx, dz, ddt, out, omask, valid, j, k, b, pos, h,
                s_tj, s_tk, s_tb, s_tl, s_th, HAS_Z: tl.constexpr):
    """Write one chunk's dx, dz (at y's offsets ``out``) and its headdim block's ddt partial sum."""
    if HAS_Z:
        tl.store(dz_ptr + out, dz.to(dz_ptr.dtype.element_ty), mask=omask)
    tl.store(dx_ptr + out, dx.to(dx_ptr.dtype.element_ty), mask=omask)
    tl.store(ddt_ptr + j * s_tj + k * s_tk + b * s_tb + pos * s_tl + h * s_th, ddt, mask=valid)


@triton.jit
def _par_grad_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr, order_ptr,
    states_ptr, G_ptr, dy_ptr,
    dx_ptr, dz_ptr, ddt_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
    L, nheads, rep, headdim, dstate, nchunks, npb,
    s_xk, s_xb, s_xl, s_xh, s_xp, s_dk, s_db, s_dl, s_dh, s_ak, s_ah,
    s_bk, s_bb, s_bl, s_bg, s_bn, s_ck, s_cb, s_cl, s_cg, s_cn,
    s_Dk, s_Dh, s_Dp, s_zk, s_zb, s_zl, s_zh, s_zp, s_biask, s_biash,
    s_sk, s_sb, s_sl, s_ok, s_ol, s_yk, s_yb, s_yl, s_yh, s_yp,
    s_gk, s_gb, s_gl, s_gh, s_gn, s_tj, s_tk, s_tb, s_tl, s_th,
    BQ: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    HAS_D: tl.constexpr, D_HDIM: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_ORDER: tl.constexpr,
    PER_HEAD_DBC: tl.constexpr, PREC: tl.constexpr, BLOCKED: tl.constexpr,
):
    """Every gradient of one chunk from H_c and G_c. BN is dstate's block: the whole of it, or with
    BLOCKED (``MDM_SSD_TUNE=bwd_nblock=BN``) a block of BN columns at a time: the products summed
    over dstate (C B^T, C H_c, B G, H_c . G) are accumulated block by block, then dB and dC are made
    and stored block by block (re-reading B, C, H_c and G). No (headdim, dstate) state and no
    (chunk, dstate) gradient is then held whole: fewer registers (far fewer spills,
    ``benchmarks/kernel_resources.py``) for a second read of the chunk's B, C and states."""
    pid, c, k, b, h, j, p0, kbh = _program_ids(nheads, npb, BP)
    offs_q = tl.arange(0, BQ)
    offs_p = p0 + tl.arange(0, BP)
    mp = offs_p < headdim
    g = h // rep
    dot_t = x_ptr.dtype.element_ty
    A_h, bias_h, Dv = _head_params(A_ptr, bias_ptr, D_ptr, k, h, offs_p, mp, s_ak, s_ah, s_biask, s_biash,
                                   s_Dk, s_Dh, s_Dp, HAS_BIAS, HAS_D, D_HDIM)
    pos, valid, dt_raw, dtv, acs, x, seg = _load_rows(
        c, L, k, b, h, p0, A_h, bias_h, x_ptr, dt_ptr, seq_ptr, order_ptr,
        s_xk, s_xb, s_xl, s_xh, s_xp, s_dk, s_db, s_dl, s_dh, s_sk, s_sb, s_sl, s_ok, s_ol,
        headdim, BQ, BP, HAS_BIAS, SOFTPLUS, HAS_SEQ, HAS_ORDER)
    base = (kbh * nchunks + c) * headdim * dstate
    hb = h * npb + j if PER_HEAD_DBC else g
    if BLOCKED:  # (dy and z are loaded after the first loop: fewer live registers across it)
        CB = tl.zeros([BQ, BQ], dtype=tl.float32)
        CH = tl.zeros([BQ, BP], dtype=tl.float32)
        BG = tl.zeros([BQ, BP], dtype=tl.float32)
        HG = tl.zeros([BP], dtype=tl.float32)
        for n0 in range(0, dstate, BN):
            Bm, Cm = _load_bc(B_ptr, C_ptr, k, b, g, pos, valid, n0, s_bk, s_bb, s_bl, s_bg, s_bn,
                              s_ck, s_cb, s_cl, s_cg, s_cn, dstate, BN, dot_t)
            Hc = _state_block(states_ptr, base, offs_p, mp, n0, dstate, BN)
            G = _state_block(G_ptr, base, offs_p, mp, n0, dstate, BN)
            CB += tl.dot(Cm, tl.trans(Bm), input_precision=PREC)
            CH += tl.dot(Cm, tl.trans(Hc).to(dot_t), input_precision=PREC)
            BG += tl.dot(Bm, tl.trans(G.to(dot_t)), input_precision=PREC)
            HG += tl.sum(Hc * G, axis=1)
        omask = valid[:, None] & mp[None, :]
        out = k * s_yk + b * s_yb + pos[:, None] * s_yl + h * s_yh + offs_p[None, :] * s_yp
        causal = offs_q[:, None] >= offs_q[None, :]
        dy, zv = _load_dy_z(dy_ptr, z_ptr, out, k, b, h, pos, offs_p, omask, s_zk, s_zb, s_zl, s_zh, s_zp, HAS_Z)
        dx, dz, ddt, dCB, gy, e, w, _, dA_c, dbias_c, dD_c = _chunk_grads_core(
            CB, CH, BG, tl.sum(HG, axis=0), x, dtv, dt_raw, acs, seg, valid, dy, zv, Dv, A_h, bias_h, offs_q,
            causal, BQ, BP, dot_t, PREC, HAS_D, D_HDIM, HAS_Z, SOFTPLUS)
        _store_rows(dx_ptr, dz_ptr, ddt_ptr, dx, dz, ddt, out, omask, valid, j, k, b, pos, h,
                    s_tj, s_tk, s_tb, s_tl, s_th, HAS_Z)  # before the second loop: they die here
        gyd = gy.to(dot_t)
        for n0 in range(0, dstate, BN):
            Bm, Cm = _load_bc(B_ptr, C_ptr, k, b, g, pos, valid, n0, s_bk, s_bb, s_bl, s_bg, s_bn,
                              s_ck, s_cb, s_cl, s_cg, s_cn, dstate, BN, dot_t)
            Hc = _state_block(states_ptr, base, offs_p, mp, n0, dstate, BN)
            G = _state_block(G_ptr, base, offs_p, mp, n0, dstate, BN)
            dC = (tl.dot(dCB, Bm, input_precision=PREC)
                  + tl.dot(gyd, Hc.to(dot_t), input_precision=PREC) * e[:, None])
            dB = (tl.dot(tl.trans(dCB), Cm, input_precision=PREC)
                  + tl.dot(x, G.to(dot_t), input_precision=PREC) * w[:, None])
            _store_dbc(dB_ptr, dC_ptr, dB, dC, k, b, pos, valid, hb, n0, dstate,
                       s_gk, s_gb, s_gl, s_gh, s_gn, BN, PER_HEAD_DBC)
    else:
        Bm, Cm = _load_bc(B_ptr, C_ptr, k, b, g, pos, valid, 0, s_bk, s_bb, s_bl, s_bg, s_bn,
                          s_ck, s_cb, s_cl, s_cg, s_cn, dstate, BN, dot_t)
        Hc = _state_block(states_ptr, base, offs_p, mp, 0, dstate, BN)
        G = _state_block(G_ptr, base, offs_p, mp, 0, dstate, BN)
        omask = valid[:, None] & mp[None, :]
        out = k * s_yk + b * s_yb + pos[:, None] * s_yl + h * s_yh + offs_p[None, :] * s_yp
        causal = offs_q[:, None] >= offs_q[None, :]
        dy, zv = _load_dy_z(dy_ptr, z_ptr, out, k, b, h, pos, offs_p, omask, s_zk, s_zb, s_zl, s_zh, s_zp, HAS_Z)
        dx, dz, ddt, dB, dC, _, _, dA_c, dbias_c, dD_c = _chunk_grads(
            x, Bm, Cm, dtv, dt_raw, acs, seg, valid, Hc, G, dy, zv, Dv, A_h, bias_h, offs_q, causal,
            BQ, BP, dot_t, PREC, HAS_D, D_HDIM, HAS_Z, SOFTPLUS)
        _store_rows(dx_ptr, dz_ptr, ddt_ptr, dx, dz, ddt, out, omask, valid, j, k, b, pos, h,
                    s_tj, s_tk, s_tb, s_tl, s_th, HAS_Z)
        _store_dbc(dB_ptr, dC_ptr, dB, dC, k, b, pos, valid, hb, 0, dstate,
                   s_gk, s_gb, s_gl, s_gh, s_gn, BN, PER_HEAD_DBC)
    prog = (k * tl.num_programs(0) + pid) * nchunks + c  # (K, batch, nheads, npb, nchunks)
    tl.store(dA_ptr + prog, dA_c)
    tl.store(dbias_ptr + prog, dbias_c)
    tl.store(dD_ptr + (kbh * nchunks + c) * headdim + offs_p, dD_c, mask=mp)


def _entry_states(x, dt, A, B, C, dt_bias, dt_softplus, initial_states, seq_idx, scan_order, BQ, BP, npb, prec):
    """Passes 1-2: the state entering every chunk (K, b, h, nchunks, p, n), the chunk decays
    (K, b, h, nchunks) and the final states (K, b, h, p, n), all float32."""
    K, batch, L, nheads, headdim = x.shape
    ngroups, dstate = B.shape[-2:]
    nchunks = triton.cdiv(L, BQ)
    dev = x.device
    states = torch.empty(K, batch, nheads, nchunks, headdim, dstate, device=dev, dtype=torch.float32)
    decay = torch.empty(K, batch, nheads, nchunks, device=dev, dtype=torch.float32)
    dummy = decay
    _par_state_kernel[(batch * nheads * npb, nchunks, K)](
        x, dt, A, B, C, dt_bias if dt_bias is not None else dummy, seq_idx if seq_idx is not None else dummy,
        scan_order if scan_order is not None else dummy, states, decay,
        L, nheads, nheads // ngroups, headdim, dstate, nchunks, npb,
        *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(), *_strides(dt_bias, 2),
        *_strides(seq_idx, 3), *_strides(scan_order, 2),
        BQ=BQ, BP=BP, BN=_block(dstate), HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
        HAS_SEQ=seq_idx is not None, HAS_ORDER=scan_order is not None, PREC=prec,
        num_warps=8 if max(BP, dstate) >= 64 else 4,
    )
    final = torch.empty(K, batch, nheads, headdim, dstate, device=dev, dtype=torch.float32)
    _state_pass(states, decay, initial_states, final, reverse=False)
    return states, decay, final


def _state_pass(buf, decay, init, out, reverse: bool):
    K, batch, nheads, nchunks, headdim, dstate = buf.shape
    TP, TN = min(_block(headdim), 32), min(_block(dstate), 64)
    _par_pass_kernel[(K * batch * nheads, triton.cdiv(headdim, TP), triton.cdiv(dstate, TN))](
        buf, decay, init if init is not None else decay, out, batch, nheads, headdim, dstate, nchunks,
        *_strides(init, 5), TP=TP, TN=TN, HAS_INIT=init is not None, REVERSE=reverse, num_warps=4,
    )


def ssd_fwd_parallel(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_states, seq_idx, scan_order,
                     chunk_size: int, block_p: int | None = None, tune: dict | None = None):
    """The chunk-parallel forward; arguments and results (y, final states) as ``ssd_fwd_triton``."""
    K, batch, L, nheads, headdim = x.shape
    ngroups, dstate = B.shape[-2:]
    tune = tuning() if tune is None else tune
    BQ = chunk_block(chunk_size, tune.get("fwd_chunk"))
    BP = headdim_block(headdim, batch * nheads * K, x.device, block_p)
    npb = triton.cdiv(headdim, BP)
    states, decay, final = _entry_states(x, dt, A, B, C, dt_bias, dt_softplus, initial_states, seq_idx, scan_order,
                                         BQ, BP, npb, _prec(x))
    nchunks = states.shape[3]
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    dummy = decay
    _par_out_kernel[(batch * nheads * npb, nchunks, K)](
        x, dt, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
        dt_bias if dt_bias is not None else dummy, seq_idx if seq_idx is not None else dummy,
        scan_order if scan_order is not None else dummy, states, y,
        L, nheads, nheads // ngroups, headdim, dstate, nchunks, npb,
        *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(),
        *(_strides(D, 3) if D is None or D.dim() == 3 else (*D.stride(), 0)), *_strides(z, 5),
        *_strides(dt_bias, 2), *_strides(seq_idx, 3), *_strides(scan_order, 2), *y.stride(),
        BQ=BQ, BP=BP, BN=_block(dstate),
        HAS_D=D is not None, D_HDIM=D is not None and D.dim() == 3, HAS_Z=z is not None,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), HAS_SEQ=seq_idx is not None,
        HAS_ORDER=scan_order is not None, PREC=_prec(x),
        num_warps=tune.get("fwd_warps") or (8 if max(BP, dstate) >= 64 else 4),
    )
    return y, final


def ssd_bwd_parallel(dy, dfinal, x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_states, seq_idx,
                     scan_order, chunk_size: int, deterministic: bool, block_p: int | None = None,
                     tune: dict | None = None):
    """The chunk-parallel backward; arguments and results as ``ssd_bwd_triton``."""
    K, batch, L, nheads, headdim = x.shape
    ngroups, dstate = B.shape[-2:]
    rep = nheads // ngroups
    tune = tuning() if tune is None else tune
    BQ = chunk_block(chunk_size, tune.get("bwd_chunk"))
    BP = headdim_block(headdim, batch * nheads * K, x.device, block_p)
    npb = triton.cdiv(headdim, BP)
    prec = _prec(x)
    states, decay, _ = _entry_states(x, dt, A, B, C, dt_bias, dt_softplus, initial_states, seq_idx, scan_order,
                                     BQ, BP, npb, prec)
    nchunks = states.shape[3]
    dy = dy.contiguous()
    dummy = decay
    opt = lambda t: t if t is not None else dummy  # noqa: E731
    grid = (batch * nheads * npb, nchunks, K)
    warps = tune.get("bwd_warps") or (8 if max(BP, dstate) >= 64 else 4)
    G = torch.empty_like(states)
    _par_dstate_kernel[grid](
        x, dt, A, B, C, opt(z), opt(dt_bias), opt(seq_idx), opt(scan_order), dy, G,
        L, nheads, rep, headdim, dstate, nchunks, npb,
        *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(), *_strides(z, 5),
        *_strides(dt_bias, 2), *_strides(seq_idx, 3), *_strides(scan_order, 2), *dy.stride(),
        BQ=BQ, BP=BP, BN=_block(dstate), HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
        SOFTPLUS=bool(dt_softplus), HAS_SEQ=seq_idx is not None, HAS_ORDER=scan_order is not None, PREC=prec,
        num_warps=warps,
    )
    g = grad_buffers(dy, x, z, ngroups, dstate, npb, nchunks, deterministic)
    _state_pass(G, decay, dfinal, g.dinit, reverse=True)  # G[c] = dLoss/d(state leaving chunk c)
    nblock = tune.get("bwd_nblock")  # dstate in blocks (BLOCKED), else whole
    _par_grad_kernel[grid](
        x, dt, A, B, C, opt(D), opt(z), opt(dt_bias), opt(seq_idx), opt(scan_order), states, G, dy,
        g.dx, opt(g.dz), g.ddt, g.dB, g.dC, g.dA, g.dD, g.dbias,
        L, nheads, rep, headdim, dstate, nchunks, npb,
        *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(),
        *(_strides(D, 3) if D is None or D.dim() == 3 else (*D.stride(), 0)), *_strides(z, 5),
        *_strides(dt_bias, 2), *_strides(seq_idx, 3), *_strides(scan_order, 2), *dy.stride(),
        *g.dB.stride(), *g.ddt.stride(),
        BQ=BQ, BP=BP, BN=min(nblock, _block(dstate)) if nblock else _block(dstate),
        HAS_D=D is not None, D_HDIM=D is not None and D.dim() == 3, HAS_Z=z is not None,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), HAS_SEQ=seq_idx is not None,
        HAS_ORDER=scan_order is not None, PER_HEAD_DBC=g.per_head, PREC=prec, BLOCKED=bool(nblock),
        num_warps=warps,
    )
    del states, G
    return finish_grads(g, dt, A, B, C, D, dt_bias, initial_states)
