"""Triton backward of the SSD scan: one program per (batch, head, direction), chunks in reverse.

The forward (``triton_fwd.py``) is first re-run with ``store_states`` to get H_c, the state
entering each chunk (nchunks x (headdim, dstate) per program, float32; freed after the backward).
Then each program walks the chunks from last to first carrying G = dLoss/d(state leaving the
chunk), starting from the gradient of the final states. Per chunk, with g = dLoss/dy before the
gate (dy * silu(z)), M_ls = (C_l . B_s) exp(acs_l - acs_s) (causal, same segment),
e_l = exp(acs_l) (entry segment only), w_s = dt_s exp(acs_last - acs_s) (last segment only):

    intra   dx_s += dt_s sum_l M_ls g_l          ddt_s += sum_l M_ls (g_l . x_s)
            dC_l += sum_s (M_ls / CB_ls) dt_s (g_l . x_s) B_s,   dB_s likewise with C_l
    off     dC_l += e_l (g_l @ H_c)              dH_c += sum_l e_l outer(g_l, C_l)
    state   dx_s += w_s (G @ B_s)                dB_s += w_s (G^T x_s)
            ddt_s += exp(acs_last - acs_s) x_s^T G B_s
            dH_c += exp(acs_last) G   ->   the G of the previous chunk
    decays  every term's derivative by acs is collected in dacs, and acs = cumsum(dt * A) gives
            ddt += A revcumsum(dacs), dA += sum dt revcumsum(dacs)

then the chain rule through dt_softplus / dt_bias, D and the gate z (one chunk's part is the jit
helper ``_chunk_grads``, shared with ``triton_par.py``). Everything is computed in the kernel
except sums that cross programs: dA, dD, ddt_bias (per-program partial sums added up in
PyTorch), ddt, dB and dC over headdim blocks (one partial per block), and dB, dC when several
heads share a group: with ``deterministic`` each head writes its own rows (summed over the group
in PyTorch), otherwise they are added with atomics.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from kernels.ssd.triton_fwd import (_apply_D_z, _block, _head_params, _load_chunk, _prec, _strides, chunk_block,
                                    headdim_block, ssd_fwd_triton, tuning)


@triton.jit
def _chunk_grads_core(CB, CH, BG, HG, x, dtv, dt_raw, acs, seg, valid, dy, zv, Dv, A_h, bias_h, offs_q, causal,
                      BQ: tl.constexpr, BP: tl.constexpr, dot_t: tl.constexpr, PREC: tl.constexpr,
                      HAS_D: tl.constexpr, D_HDIM: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr):
    """The part of one chunk's gradients that sees B, C and the states only through the products
    summed over dstate: CB = C B^T (Q, Q), CH = C_l . H_c rows (Q, P), BG = G B_s rows (Q, P) and
    HG = sum(H_c * G). Returns dx, dz, ddt (through softplus / bias, 0 on padding), and for dB, dC
    and dH: dCB (Q, Q; dC = dCB B + ..., dB = dCB^T C + ...), gy (dLoss/dy before the gate), e, w;
    then chunk_decay and this chunk's terms of dA, ddt_bias and dD (per headdim column)."""
    xf = x.to(tl.float32)
    acs_last = tl.sum(tl.where(offs_q == BQ - 1, acs, 0.0), axis=0)
    seg_last = tl.max(seg, axis=0)
    keep = causal & (seg[:, None] == seg[None, :])
    decay = tl.exp(tl.where(keep, acs[:, None] - acs[None, :], -float("inf")))
    M0 = CB * decay
    e = tl.where(seg == 0, tl.exp(acs), 0.0)
    dz = dy
    if HAS_Z:
        # recompute y before the gate for dz
        y = tl.dot((M0 * dtv[None, :]).to(dot_t), x, input_precision=PREC) + CH * e[:, None]
        y = _apply_D_z(y, x, Dv, 0.0, HAS_D, D_HDIM, False)
        sz = tl.sigmoid(zv)
        dz = dy * y * sz * (1.0 + zv * (1.0 - sz))
        gy = dy * zv * sz
    else:
        gy = dy
    dD = tl.sum(gy * xf, axis=0)  # per headdim column (summed over it in PyTorch for a per-head D)
    if HAS_D:
        if D_HDIM:
            dx = gy * Dv[None, :]
        else:
            dx = gy * Dv
    else:
        dx = tl.zeros([BQ, BP], dtype=tl.float32)
    gyd = gy.to(dot_t)

    # intra-chunk
    GX = tl.dot(gyd, tl.trans(x), input_precision=PREC)  # (l, s): g_l . x_s
    dx += tl.dot(tl.trans(M0).to(dot_t), gyd, input_precision=PREC) * dtv[:, None]
    MGX = M0 * GX
    ddt = tl.sum(MGX, axis=0)
    T = MGX * dtv[None, :]
    dacs = tl.sum(T, axis=1) - tl.sum(T, axis=0)
    dCB = (decay * GX * dtv[None, :]).to(dot_t)
    # state -> output
    dacs += e * tl.sum(gy * CH, axis=1)
    # chunk state -> state leaving the chunk
    wdec = tl.where(seg == seg_last, tl.exp(acs_last - acs), 0.0)
    w = wdec * dtv
    dx += BG * w[:, None]
    V = wdec * tl.sum(xf * BG, axis=1)
    ddt += V
    dacs -= dtv * V
    chunk_decay = tl.where(seg_last == 0, tl.exp(acs_last), 0.0)
    dacs_last = tl.sum(dtv * V, axis=0) + chunk_decay * HG
    dacs += tl.where(offs_q == BQ - 1, dacs_last, 0.0)
    # acs = cumsum(dt * A)
    da = tl.cumsum(dacs, axis=0, reverse=True)
    ddt += da * A_h
    dA = tl.sum(da * dtv, axis=0)
    if SOFTPLUS:
        ddt = ddt * tl.sigmoid(dt_raw + bias_h)
    ddt = tl.where(valid, ddt, 0.0)
    return dx, dz, ddt, dCB, gy, e, w, chunk_decay, dA, tl.sum(ddt, axis=0), dD


@triton.jit
def _chunk_grads(x, Bm, Cm, dtv, dt_raw, acs, seg, valid, Hc, G, dy, zv, Dv, A_h, bias_h, offs_q, causal,
                 BQ: tl.constexpr, BP: tl.constexpr, dot_t: tl.constexpr, PREC: tl.constexpr,
                 HAS_D: tl.constexpr, D_HDIM: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr):
    """Every gradient of one chunk, given its entry state Hc and G = dLoss/d(state leaving it).

    Returns dx, dz (dy where there is no z), ddt (through softplus/bias, 0 on padding), dB, dC,
    dH_local (the chunk's own term of dLoss/d(entry state); the rest is chunk_decay * G),
    chunk_decay, and this chunk's terms of dA, ddt_bias and dD (per headdim column)."""
    CB = tl.dot(Cm, tl.trans(Bm), input_precision=PREC)
    CH = tl.dot(Cm, tl.trans(Hc).to(dot_t), input_precision=PREC)  # (Q, P): H_c @ C_l
    Gd = G.to(dot_t)
    BG = tl.dot(Bm, tl.trans(Gd), input_precision=PREC)  # (Q, P): G @ B_s
    HG = tl.sum(tl.sum(Hc * G, axis=1), axis=0)
    dx, dz, ddt, dCB, gy, e, w, chunk_decay, dA, dbias, dD = _chunk_grads_core(
        CB, CH, BG, HG, x, dtv, dt_raw, acs, seg, valid, dy, zv, Dv, A_h, bias_h, offs_q, causal,
        BQ, BP, dot_t, PREC, HAS_D, D_HDIM, HAS_Z, SOFTPLUS)
    dC = tl.dot(dCB, Bm, input_precision=PREC)
    dB = tl.dot(tl.trans(dCB), Cm, input_precision=PREC)
    dC += tl.dot(gy.to(dot_t), Hc.to(dot_t), input_precision=PREC) * e[:, None]
    dH_local = tl.dot(tl.trans((gy * e[:, None]).to(dot_t)), Cm, input_precision=PREC)
    dB += tl.dot(x, Gd, input_precision=PREC) * w[:, None]
    return dx, dz, ddt, dB, dC, dH_local, chunk_decay, dA, dbias, dD


@triton.jit
def _store_dbc(dB_ptr, dC_ptr, dB, dC, k, b, pos, valid, row, n0, dstate, s_gk, s_gb, s_gl, s_gh, s_gn,
               BN: tl.constexpr, PER_HEAD_DBC: tl.constexpr):
    """Write one chunk's dB, dC (Q, BN; dstate columns n0 ..) to their buffer rows: stored where the
    row is this program's own (PER_HEAD_DBC), else added with atomics (heads sharing a group)."""
    offs_n = n0 + tl.arange(0, BN)
    nmask = valid[:, None] & (offs_n < dstate)[None, :]
    off_g = k * s_gk + b * s_gb + pos[:, None] * s_gl + row * s_gh + offs_n[None, :] * s_gn
    if PER_HEAD_DBC:
        tl.store(dB_ptr + off_g, dB, mask=nmask)
        tl.store(dC_ptr + off_g, dC, mask=nmask)
    else:
        tl.atomic_add(dB_ptr + off_g, dB, mask=nmask)
        tl.atomic_add(dC_ptr + off_g, dC, mask=nmask)


@triton.jit
def _ssd_bwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr, order_ptr,
    states_ptr, dy_ptr, dfinal_ptr,
    dx_ptr, dz_ptr, ddt_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dinit_ptr,
    L, nheads, rep, headdim, dstate, nchunks, npb,
    s_xk, s_xb, s_xl, s_xh, s_xp,
    s_dk, s_db, s_dl, s_dh,
    s_ak, s_ah,
    s_bk, s_bb, s_bl, s_bg, s_bn,
    s_ck, s_cb, s_cl, s_cg, s_cn,
    s_Dk, s_Dh, s_Dp,
    s_zk, s_zb, s_zl, s_zh, s_zp,
    s_biask, s_biash,
    s_sk, s_sb, s_sl,
    s_ok, s_ol,
    s_yk, s_yb, s_yl, s_yh, s_yp,
    s_fk, s_fb, s_fh, s_fp, s_fn,
    s_gk, s_gb, s_gl, s_gh, s_gn,  # dB / dC buffers: rows per (head, headdim block) or per group
    s_tj, s_tk, s_tb, s_tl, s_th,  # ddt partial sums, one per headdim block (j)
    BQ: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    HAS_D: tl.constexpr, D_HDIM: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_ORDER: tl.constexpr,
    HAS_DFINAL: tl.constexpr, PER_HEAD_DBC: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0)  # (b, h, headdim block j)
    k = tl.program_id(1).to(tl.int64)
    prog = k * tl.num_programs(0) + pid  # index of (k, b, h, j) in contiguous per-program buffers
    bh = pid // npb
    j = (pid % npb).to(tl.int64)
    p0 = j * BP
    prog_kbh = k * (tl.num_programs(0) // npb) + bh  # index of (k, b, h)
    b = (bh // nheads).to(tl.int64)
    h = (bh % nheads).to(tl.int64)
    g = h // rep
    offs_q = tl.arange(0, BQ)
    offs_p = p0 + tl.arange(0, BP)
    offs_n = tl.arange(0, BN)
    mp = offs_p < headdim
    mn = offs_n < dstate
    state_mask = mp[:, None] & mn[None, :]
    dot_t = x_ptr.dtype.element_ty

    A_h, bias_h, Dv = _head_params(A_ptr, bias_ptr, D_ptr, k, h, offs_p, mp, s_ak, s_ah, s_biask, s_biash,
                                   s_Dk, s_Dh, s_Dp, HAS_BIAS, HAS_D, D_HDIM)
    if HAS_DFINAL:
        G = tl.load(dfinal_ptr + k * s_fk + b * s_fb + h * s_fh + offs_p[:, None] * s_fp + offs_n[None, :] * s_fn,
                    mask=state_mask, other=0.0).to(tl.float32)
    else:
        G = tl.zeros([BP, BN], dtype=tl.float32)
    causal = offs_q[:, None] >= offs_q[None, :]
    st_base = states_ptr + prog_kbh.to(tl.int64) * nchunks * headdim * dstate
    dA_acc = 0.0
    dbias_acc = 0.0
    dD_acc = tl.zeros([BP], dtype=tl.float32)
    hb = h * npb + j if PER_HEAD_DBC else g  # row of the dB / dC buffers

    for i in range(nchunks):
        c = nchunks - 1 - i
        pos, valid, dt_raw, dtv, acs, x, Bm, Cm, seg = _load_chunk(
            c, L, k, b, h, g, p0, A_h, bias_h, x_ptr, dt_ptr, B_ptr, C_ptr, seq_ptr, order_ptr,
            s_xk, s_xb, s_xl, s_xh, s_xp, s_dk, s_db, s_dl, s_dh, s_bk, s_bb, s_bl, s_bg, s_bn,
            s_ck, s_cb, s_cl, s_cg, s_cn, s_sk, s_sb, s_sl, s_ok, s_ol, headdim, dstate,
            BQ, BP, BN, HAS_BIAS, SOFTPLUS, HAS_SEQ, HAS_ORDER)
        Hc = tl.load(st_base + c * headdim * dstate + offs_p[:, None] * dstate + offs_n[None, :],
                     mask=state_mask, other=0.0)
        omask = valid[:, None] & mp[None, :]
        dy = tl.load(dy_ptr + k * s_yk + b * s_yb + pos[:, None] * s_yl + h * s_yh + offs_p[None, :] * s_yp,
                     mask=omask, other=0.0).to(tl.float32)
        zv = dy
        if HAS_Z:
            zv = tl.load(z_ptr + k * s_zk + b * s_zb + pos[:, None] * s_zl + h * s_zh + offs_p[None, :] * s_zp,
                         mask=omask, other=0.0).to(tl.float32)
        dx, dz, ddt, dB, dC, dH_local, chunk_decay, dA_c, dbias_c, dD_c = _chunk_grads(
            x, Bm, Cm, dtv, dt_raw, acs, seg, valid, Hc, G, dy, zv, Dv, A_h, bias_h, offs_q, causal,
            BQ, BP, dot_t, PREC, HAS_D, D_HDIM, HAS_Z, SOFTPLUS)
        if HAS_Z:
            tl.store(dz_ptr + k * s_yk + b * s_yb + pos[:, None] * s_yl + h * s_yh + offs_p[None, :] * s_yp,
                     dz.to(dz_ptr.dtype.element_ty), mask=omask)
        G = G * chunk_decay + dH_local
        dA_acc += dA_c
        dbias_acc += dbias_c
        dD_acc += dD_c

        tl.store(dx_ptr + k * s_yk + b * s_yb + pos[:, None] * s_yl + h * s_yh + offs_p[None, :] * s_yp,
                 dx.to(dx_ptr.dtype.element_ty), mask=omask)
        tl.store(ddt_ptr + j * s_tj + k * s_tk + b * s_tb + pos * s_tl + h * s_th, ddt, mask=valid)
        _store_dbc(dB_ptr, dC_ptr, dB, dC, k, b, pos, valid, hb, 0, dstate, s_gk, s_gb, s_gl, s_gh, s_gn, BN,
                   PER_HEAD_DBC)

    tl.store(dinit_ptr + prog_kbh.to(tl.int64) * headdim * dstate + offs_p[:, None] * dstate + offs_n[None, :],
             G, mask=state_mask)
    tl.store(dA_ptr + prog, dA_acc)
    tl.store(dbias_ptr + prog, dbias_acc)
    tl.store(dD_ptr + prog_kbh.to(tl.int64) * headdim + offs_p, dD_acc, mask=mp)


def grad_buffers(dy, x, z, ngroups: int, dstate: int, npb: int, nparts: int, deterministic: bool) -> SimpleNamespace:
    """The output buffers of a backward launch (this module's or ``triton_par.py``'s), float32.

    Sums that cross programs get one partial per headdim block (npb) and per ``nparts`` (1 for the
    sequential kernel, one per chunk for the chunk-parallel one): ddt, dA, ddt_bias, dD. dB and dC
    get a row per (head, headdim block) where ``per_head`` (deterministic, one head per group, or
    several blocks), else a row per group that the heads add into with atomics (zeros)."""
    K, batch, L, nheads, headdim = x.shape
    dev, f32 = x.device, torch.float32
    per_head = deterministic or nheads == ngroups or npb > 1
    nrows = nheads * npb if per_head else ngroups
    alloc = torch.empty if per_head else torch.zeros
    return SimpleNamespace(
        per_head=per_head,
        dx=torch.empty_like(dy, dtype=x.dtype),
        dz=torch.empty_like(dy, dtype=z.dtype) if z is not None else None,
        ddt=torch.empty(npb, K, batch, L, nheads, device=dev, dtype=f32),
        dB=alloc(K, batch, L, nrows, dstate, device=dev, dtype=f32),
        dC=alloc(K, batch, L, nrows, dstate, device=dev, dtype=f32),
        dA=torch.empty(K, batch, nheads, npb, nparts, device=dev, dtype=f32),
        dbias=torch.empty(K, batch, nheads, npb, nparts, device=dev, dtype=f32),
        dD=torch.empty(K, batch, nheads, nparts, headdim, device=dev, dtype=f32),
        dinit=torch.empty(K, batch, nheads, headdim, dstate, device=dev, dtype=f32),
    )


def finish_grads(g: SimpleNamespace, dt, A, B, C, D, dt_bias, initial_states):
    """Add up the partial sums of :func:`grad_buffers`; the gradients in their inputs' dtypes and
    shapes (None for absent inputs), in the order ``SSDScanFn.backward`` returns them."""
    K, batch, L, nrows, dstate = g.dB.shape
    ngroups = B.shape[-2]
    dB, dC = g.dB, g.dC
    if nrows > ngroups:  # rows (group, head in group, headdim block) -> group
        dB = dB.view(K, batch, L, ngroups, nrows // ngroups, dstate).sum(4)
        dC = dC.view(K, batch, L, ngroups, nrows // ngroups, dstate).sum(4)
    ddt = g.ddt[0] if g.ddt.shape[0] == 1 else g.ddt.sum(0)
    dD = None
    if D is not None:
        dD = g.dD.sum((1, 3))
        dD = (dD if D.dim() == 3 else dD.sum(-1)).to(D.dtype)
    dbias = g.dbias.sum((1, 3, 4)).to(dt_bias.dtype) if dt_bias is not None else None
    dinit = g.dinit.to(initial_states.dtype) if initial_states is not None else None
    return (g.dx, ddt.to(dt.dtype), g.dA.sum((1, 3, 4)).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype), dD, g.dz,
            dbias, dinit)


def ssd_bwd_triton(dy, dfinal, x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_states, seq_idx,
                   scan_order, chunk_size: int, deterministic: bool, block_p: int | None = None,
                   tune: dict | None = None):
    """Gradients of the direction-stacked scan (shapes as in :func:`ssd_fwd_triton`).

    Returns dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_states (None for absent inputs), each
    in its input's dtype and shape.
    """
    K, batch, L, nheads, headdim = x.shape
    ngroups, dstate = B.shape[-2:]
    rep = nheads // ngroups
    tune = tuning() if tune is None else tune  # the forward's, when called from the autograd Function
    BQ = chunk_block(chunk_size, tune.get("bwd_chunk"))  # the chunk-entry states below use the same
    nchunks = triton.cdiv(L, BQ)
    BP = headdim_block(headdim, batch * nheads * K, x.device, block_p)
    npb = triton.cdiv(headdim, BP)
    _, _, states = ssd_fwd_triton(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_states, seq_idx,
                                  scan_order, chunk_size, store_states=True, write_y=False, block_p=BP, chunk=BQ,
                                  tune=tune)
    dy = dy.contiguous()
    g = grad_buffers(dy, x, z, ngroups, dstate, npb, 1, deterministic)
    dummy = g.dA
    _ssd_bwd_kernel[(batch * nheads * npb, K)](
        x, dt, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
        dt_bias if dt_bias is not None else dummy, seq_idx if seq_idx is not None else dummy,
        scan_order if scan_order is not None else dummy, states, dy,
        dfinal if dfinal is not None else dummy,
        g.dx, g.dz if z is not None else dummy, g.ddt, g.dB, g.dC, g.dA, g.dD, g.dbias, g.dinit,
        L, nheads, rep, headdim, dstate, nchunks, npb,
        *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(),
        *(_strides(D, 3) if D is None or D.dim() == 3 else (*D.stride(), 0)),
        *_strides(z, 5), *_strides(dt_bias, 2), *_strides(seq_idx, 3), *_strides(scan_order, 2),
        *dy.stride(), *_strides(dfinal, 5), *g.dB.stride(), *g.ddt.stride(),
        BQ=BQ, BP=BP, BN=_block(dstate),
        HAS_D=D is not None, D_HDIM=D is not None and D.dim() == 3, HAS_Z=z is not None,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), HAS_SEQ=seq_idx is not None,
        HAS_ORDER=scan_order is not None, HAS_DFINAL=dfinal is not None, PER_HEAD_DBC=g.per_head,
        PREC=_prec(x),
        num_warps=tune.get("bwd_warps") or (8 if max(BP, dstate) >= 64 else 4),
    )
    del states
    return finish_grads(g, dt, A, B, C, D, dt_bias, initial_states)
