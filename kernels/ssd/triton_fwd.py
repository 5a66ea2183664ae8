"""Triton forward of the SSD scan: one program per (batch, head, direction), chunks in sequence.

Same math as ``chunked.py`` (read that first), fused into one kernel. A program owns one
(batch b, head h, direction k) -- or a block of its headdim columns (``headdim_block``: the
state's rows evolve independently) -- and walks the scan-ordered sequence chunk by chunk, keeping
the running state H (headdim, dstate) in registers. The per-chunk pieces are jit helpers
(``_chunk_y``, ``_chunk_state``) shared with the chunk-parallel kernels of ``triton_par.py``.
For chunk c (positions t = cQ .. cQ+Q-1 of the scan, original positions pos = scan_order[t]):

    rows       x, dt, B, C, z are *gathered* by pos on load (no permuted copies exist)
    a, acs     a_t = dt_t * A_h, acs = cumsum of a inside the chunk
    intra      y_l  = sum_{s<=l} (C_l . B_s) exp(acs_l - acs_s) dt_s x_s
    off        y_l += exp(acs_l) (H @ C_l)
    state      H    = exp(acs_last) H + sum_s exp(acs_last - acs_s) dt_s outer(x_s, B_s)
    out        y_l += D x_l;  y_l *= silu(z_l);  y is *scattered* to pos on store

So only the state of the current chunk boundary exists, in registers: neither per-position
states (seqlen, dstate) nor per-chunk states are written, except when the backward asks for the
chunk-entry states (``store_states``) to walk the chunks in reverse.

seq_idx: a state reset wherever seq_idx changes between two consecutively scanned positions.
Inside a chunk the resets are numbered by a cumulative sum (local segment ids, 0 = the segment
the chunk was entered in), so every term is masked by comparing local ids: no pass over the
whole sequence is needed.

The direction k is the second grid axis: K directions (each with its own inputs, parameters and
scan order, given as tensors with a leading K dimension of any stride) run in one launch.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _softplus(v):
    return tl.where(v > 20.0, v, tl.log(1.0 + tl.exp(tl.minimum(v, 20.0))))


@triton.jit
def _load_rows(
    c, L, k, b, h, p0, A_h, bias_h,
    x_ptr, dt_ptr, seq_ptr, order_ptr,
    s_xk, s_xb, s_xl, s_xh, s_xp,
    s_dk, s_db, s_dl, s_dh,
    s_sk, s_sb, s_sl,
    s_ok, s_ol,
    headdim,
    BQ: tl.constexpr, BP: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_ORDER: tl.constexpr,
):
    """Gather one chunk of the scan but for B and C: positions, mask, dt (raw and processed), acs,
    x (headdim columns p0 .. p0+BP-1), segs."""
    offs_q = tl.arange(0, BQ)
    offs_p = p0 + tl.arange(0, BP)
    t = c * BQ + offs_q
    valid = t < L
    if HAS_ORDER:
        pos = tl.load(order_ptr + k * s_ok + t * s_ol, mask=valid, other=0).to(tl.int64)
    else:
        pos = t.to(tl.int64)
    dt_raw = tl.load(dt_ptr + k * s_dk + b * s_db + pos * s_dl + h * s_dh, mask=valid, other=0.0).to(tl.float32)
    dtv = dt_raw
    if HAS_BIAS:
        dtv = dtv + bias_h
    if SOFTPLUS:
        dtv = _softplus(dtv)
    dtv = tl.where(valid, dtv, 0.0)  # padding: no input and no decay
    acs = tl.cumsum(dtv * A_h, axis=0)
    mp = offs_p < headdim
    x = tl.load(x_ptr + k * s_xk + b * s_xb + pos[:, None] * s_xl + h * s_xh + offs_p[None, :] * s_xp,
                mask=valid[:, None] & mp[None, :], other=0.0)
    if HAS_SEQ:
        cur = tl.load(seq_ptr + k * s_sk + b * s_sb + pos * s_sl, mask=valid, other=0)
        has_prev = valid & (t > 0)
        if HAS_ORDER:
            prev_pos = tl.load(order_ptr + k * s_ok + (t - 1) * s_ol, mask=has_prev, other=0).to(tl.int64)
        else:
            prev_pos = (t - 1).to(tl.int64)
        prev = tl.load(seq_ptr + k * s_sk + b * s_sb + prev_pos * s_sl, mask=has_prev, other=0)
        change = (has_prev & (cur != prev)).to(tl.int32)
        seg = tl.cumsum(change, axis=0)  # 0 = the segment the chunk was entered in
    else:
        seg = tl.zeros([BQ], dtype=tl.int32)
    return pos, valid, dt_raw, dtv, acs, x, seg


@triton.jit
def _load_bc(
    B_ptr, C_ptr, k, b, g, pos, valid, n0,
    s_bk, s_bb, s_bl, s_bg, s_bn,
    s_ck, s_cb, s_cl, s_cg, s_cn,
    dstate, BN: tl.constexpr, dot_t: tl.constexpr,
):
    """B and C of one chunk's positions, dstate columns n0 .. n0+BN-1, as matmul operands."""
    offs_n = n0 + tl.arange(0, BN)
    m = valid[:, None] & (offs_n < dstate)[None, :]
    Bm = tl.load(B_ptr + k * s_bk + b * s_bb + pos[:, None] * s_bl + g * s_bg + offs_n[None, :] * s_bn,
                 mask=m, other=0.0).to(dot_t)
    Cm = tl.load(C_ptr + k * s_ck + b * s_cb + pos[:, None] * s_cl + g * s_cg + offs_n[None, :] * s_cn,
                 mask=m, other=0.0).to(dot_t)
    return Bm, Cm


@triton.jit
def _load_chunk(
    c, L, k, b, h, g, p0, A_h, bias_h,
    x_ptr, dt_ptr, B_ptr, C_ptr, seq_ptr, order_ptr,
    s_xk, s_xb, s_xl, s_xh, s_xp,
    s_dk, s_db, s_dl, s_dh,
    s_bk, s_bb, s_bl, s_bg, s_bn,
    s_ck, s_cb, s_cl, s_cg, s_cn,
    s_sk, s_sb, s_sl,
    s_ok, s_ol,
    headdim, dstate,
    BQ: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_ORDER: tl.constexpr,
):
    """Gather one chunk of the scan: positions, masks, dt (raw and processed), acs, x (headdim
    columns p0 .. p0+BP-1), B, C, segs."""
    pos, valid, dt_raw, dtv, acs, x, seg = _load_rows(
        c, L, k, b, h, p0, A_h, bias_h, x_ptr, dt_ptr, seq_ptr, order_ptr,
        s_xk, s_xb, s_xl, s_xh, s_xp, s_dk, s_db, s_dl, s_dh, s_sk, s_sb, s_sl, s_ok, s_ol,
        headdim, BQ, BP, HAS_BIAS, SOFTPLUS, HAS_SEQ, HAS_ORDER)
    Bm, Cm = _load_bc(B_ptr, C_ptr, k, b, g, pos, valid, 0, s_bk, s_bb, s_bl, s_bg, s_bn,
                      s_ck, s_cb, s_cl, s_cg, s_cn, dstate, BN, x_ptr.dtype.element_ty)
    return pos, valid, dt_raw, dtv, acs, x, Bm, Cm, seg


@triton.jit
def _head_params(A_ptr, bias_ptr, D_ptr, k, h, offs_p, mp, s_ak, s_ah, s_biask, s_biash, s_Dk, s_Dh, s_Dp,
                 HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, D_HDIM: tl.constexpr):
    """A_h, dt_bias_h (0 without) and D (per head, per headdim column of the block, or 0 without)."""
    A_h = tl.load(A_ptr + k * s_ak + h * s_ah).to(tl.float32)
    bias_h = 0.0
    if HAS_BIAS:
        bias_h = tl.load(bias_ptr + k * s_biask + h * s_biash).to(tl.float32)
    Dv = 0.0
    if HAS_D:
        if D_HDIM:
            Dv = tl.load(D_ptr + k * s_Dk + h * s_Dh + offs_p * s_Dp, mask=mp, other=0.0).to(tl.float32)
        else:
            Dv = tl.load(D_ptr + k * s_Dk + h * s_Dh).to(tl.float32)
    return A_h, bias_h, Dv


@triton.jit
def _chunk_y(Cm, Bm, x, dtv, acs, seg, H, causal, dot_t: tl.constexpr, PREC: tl.constexpr):
    """y of one chunk before D and the gate: intra-chunk (C B^T * decay * dt_s) @ x, plus the
    entry state H seen through exp(acs_l) (C_l @ H^T) where the chunk's entry segment continues."""
    CB = tl.dot(Cm, tl.trans(Bm), input_precision=PREC)
    keep = causal & (seg[:, None] == seg[None, :])
    decay = tl.exp(tl.where(keep, acs[:, None] - acs[None, :], -float("inf")))
    y = tl.dot((CB * decay * dtv[None, :]).to(dot_t), x, input_precision=PREC)
    e = tl.where(seg == 0, tl.exp(acs), 0.0)
    y += tl.dot(Cm, tl.trans(H).to(dot_t), input_precision=PREC) * e[:, None]
    return y


@triton.jit
def _apply_D_z(y, x, Dv, zv, HAS_D: tl.constexpr, D_HDIM: tl.constexpr, HAS_Z: tl.constexpr):
    """y += D x; y *= silu(z)."""
    if HAS_D:
        if D_HDIM:
            y += x.to(tl.float32) * Dv[None, :]
        else:
            y += x.to(tl.float32) * Dv
    if HAS_Z:
        y = y * zv * tl.sigmoid(zv)
    return y


@triton.jit
def _chunk_state(x, Bm, dtv, acs, seg, offs_q, BQ: tl.constexpr, dot_t: tl.constexpr, PREC: tl.constexpr):
    """The chunk's own contribution to the state leaving it, sum_s w_s outer(x_s, B_s) with
    w_s = dt_s exp(acs_last - acs_s) (last segment only), and the decay of the state entering it
    (0 where a segment starts inside the chunk)."""
    acs_last = tl.sum(tl.where(offs_q == BQ - 1, acs, 0.0), axis=0)
    seg_last = tl.max(seg, axis=0)
    w = tl.where(seg == seg_last, dtv * tl.exp(acs_last - acs), 0.0)
    chunk_decay = tl.where(seg_last == 0, tl.exp(acs_last), 0.0)
    S = tl.dot(tl.trans((x.to(tl.float32) * w[:, None]).to(dot_t)), Bm, input_precision=PREC)
    return S, chunk_decay


@triton.jit
def _ssd_fwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, init_ptr, seq_ptr, order_ptr,
    y_ptr, final_ptr, states_ptr,
    L, nheads, rep, headdim, dstate, nchunks, npb,
    s_xk, s_xb, s_xl, s_xh, s_xp,
    s_dk, s_db, s_dl, s_dh,
    s_ak, s_ah,
    s_bk, s_bb, s_bl, s_bg, s_bn,
    s_ck, s_cb, s_cl, s_cg, s_cn,
    s_Dk, s_Dh, s_Dp,
    s_zk, s_zb, s_zl, s_zh, s_zp,
    s_biask, s_biash,
    s_ik, s_ib, s_ih, s_ip, s_in,
    s_sk, s_sb, s_sl,
    s_ok, s_ol,
    s_yk, s_yb, s_yl, s_yh, s_yp,
    BQ: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    HAS_D: tl.constexpr, D_HDIM: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_ORDER: tl.constexpr,
    STORE_STATES: tl.constexpr, WRITE_Y: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0)  # (b, h, headdim block)
    k = tl.program_id(1).to(tl.int64)
    bh = pid // npb
    p0 = (pid % npb).to(tl.int64) * BP
    b = (bh // nheads).to(tl.int64)
    h = (bh % nheads).to(tl.int64)
    g = h // rep
    prog_kbh = k * (tl.num_programs(0) // npb) + bh  # index of (k, b, h) in (K, batch, nheads, ...) buffers
    offs_q = tl.arange(0, BQ)
    offs_p = p0 + tl.arange(0, BP)
    offs_n = tl.arange(0, BN)
    mp = offs_p < headdim
    mn = offs_n < dstate
    dot_t = x_ptr.dtype.element_ty  # matmul operand dtype: the input dtype

    A_h, bias_h, Dv = _head_params(A_ptr, bias_ptr, D_ptr, k, h, offs_p, mp, s_ak, s_ah, s_biask, s_biash,
                                   s_Dk, s_Dh, s_Dp, HAS_BIAS, HAS_D, D_HDIM)
    state_mask = mp[:, None] & mn[None, :]
    if HAS_INIT:
        H = tl.load(init_ptr + k * s_ik + b * s_ib + h * s_ih + offs_p[:, None] * s_ip + offs_n[None, :] * s_in,
                    mask=state_mask, other=0.0).to(tl.float32)
    else:
        H = tl.zeros([BP, BN], dtype=tl.float32)
    causal = offs_q[:, None] >= offs_q[None, :]
    # Chunk-entry states for the backward: contiguous (K, batch, nheads, nchunks, headdim, dstate).
    st_base = states_ptr + prog_kbh.to(tl.int64) * nchunks * headdim * dstate

    for c in range(nchunks):
        pos, valid, dt_raw, dtv, acs, x, Bm, Cm, seg = _load_chunk(
            c, L, k, b, h, g, p0, A_h, bias_h, x_ptr, dt_ptr, B_ptr, C_ptr, seq_ptr, order_ptr,
            s_xk, s_xb, s_xl, s_xh, s_xp, s_dk, s_db, s_dl, s_dh, s_bk, s_bb, s_bl, s_bg, s_bn,
            s_ck, s_cb, s_cl, s_cg, s_cn, s_sk, s_sb, s_sl, s_ok, s_ol, headdim, dstate,
            BQ, BP, BN, HAS_BIAS, SOFTPLUS, HAS_SEQ, HAS_ORDER)
        if STORE_STATES:
            tl.store(st_base + c * headdim * dstate + offs_p[:, None] * dstate + offs_n[None, :], H, mask=state_mask)
        if WRITE_Y:
            y = _chunk_y(Cm, Bm, x, dtv, acs, seg, H, causal, dot_t, PREC)
            omask = valid[:, None] & mp[None, :]
            zv = 0.0
            if HAS_Z:
                zv = tl.load(z_ptr + k * s_zk + b * s_zb + pos[:, None] * s_zl + h * s_zh + offs_p[None, :] * s_zp,
                             mask=omask, other=0.0).to(tl.float32)
            y = _apply_D_z(y, x, Dv, zv, HAS_D, D_HDIM, HAS_Z)
            tl.store(y_ptr + k * s_yk + b * s_yb + pos[:, None] * s_yl + h * s_yh + offs_p[None, :] * s_yp,
                     y.to(y_ptr.dtype.element_ty), mask=omask)
        S, chunk_decay = _chunk_state(x, Bm, dtv, acs, seg, offs_q, BQ, dot_t, PREC)
        H = H * chunk_decay + S

    tl.store(final_ptr + prog_kbh.to(tl.int64) * headdim * dstate
             + offs_p[:, None] * dstate + offs_n[None, :], H, mask=state_mask)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


MAX_CHUNK_BLOCK = 64  # larger chunks need more shared memory than an H100 has (256: 313 KB > 227 KB)
TUNE_KEYS = ("fwd_chunk", "fwd_warps", "bwd_chunk", "bwd_warps", "parallel", "fwd_parallel", "bwd_parallel",
             "bwd_nblock")
PARALLEL_KEYS = ("parallel", "fwd_parallel", "bwd_parallel")


def tuning() -> dict[str, int]:
    """Launch settings forced through the environment variable MDM_SSD_TUNE, e.g.
    ``MDM_SSD_TUNE=bwd_chunk=32,bwd_warps=16`` (keys: fwd_chunk, fwd_warps, bwd_chunk, bwd_warps,
    fwd_parallel, bwd_parallel, parallel; chunks are powers of two in [16, 64], warps 1, 2, 4, 8 or
    16; fwd_parallel / bwd_parallel 0 or 1: the chunk-parallel kernels of ``triton_par.py`` for the
    forward / backward, parallel=1 both; bwd_nblock 0 or a power of two 16..256: the chunk-parallel
    backward's gradient pass in blocks of that many dstate columns). Only speed depends on them, not
    results. What is not set here takes the measured defaults of :func:`launch_settings`."""
    raw = os.environ.get("MDM_SSD_TUNE", "").strip()
    out = {}
    for item in filter(None, (t.strip() for t in raw.split(","))):
        key, _, val = item.partition("=")
        if key not in TUNE_KEYS or not val.strip().isdigit():
            raise ValueError(f"MDM_SSD_TUNE: bad item {item!r}; allowed: {', '.join(k + '=INT' for k in TUNE_KEYS)}")
        v = int(val)
        if key.endswith("chunk"):
            ok = 16 <= v <= MAX_CHUNK_BLOCK and v & (v - 1) == 0
        elif key == "bwd_nblock":
            ok = v == 0 or (16 <= v <= 256 and v & (v - 1) == 0)
        else:
            ok = v in ((0, 1) if key in PARALLEL_KEYS else (1, 2, 4, 8, 16))
        if not ok:
            raise ValueError(f"MDM_SSD_TUNE: {key}={v} out of range (chunks: powers of two 16..{MAX_CHUNK_BLOCK}; "
                             "warps: 1, 2, 4, 8 or 16; parallel, fwd_parallel, bwd_parallel: 0 or 1; "
                             "bwd_nblock: 0 or a power of two 16..256)")
        out[key] = v
    return out


def launch_settings(tune: dict[str, int], device: torch.device) -> dict[str, int]:
    """The launch settings a scan uses: those forced (``tune``, from :func:`tuning`) and, for the
    rest, defaults chosen from one H200 run of ``benchmarks/gpu_check.sh`` (bf16, batch 1, 32 heads,
    headdim 64, dstate 128, 1 and 4 directions, 4K-64K tokens; ``benchmarks/gpu_results.md``):

    - forward: the sequential kernel in chunks of 32 with 4 warps: 1.2-1.5x faster than chunks of
      64 with 8 warps from 16K tokens on (within 5% at 4K); the chunk-parallel forward was never
      faster (its two passes re-read every chunk).
    - backward: the chunk-parallel kernels, in chunks of 64: faster than the sequential backward in
      all six cases (1.5-1.6x for one direction, 1.1x for four), for one more float32 buffer of
      the chunk-entry states' size (freed when the backward returns).
    On CPU (Triton's interpreter) nothing is added: the kernels' own defaults, sequential.
    """
    out = dict(tune)
    if "parallel" in out:
        out.setdefault("fwd_parallel", out["parallel"])
        out.setdefault("bwd_parallel", out["parallel"])
    on_gpu = device.type == "cuda"
    out.setdefault("fwd_parallel", 0)
    if on_gpu and not out["fwd_parallel"]:
        out.setdefault("fwd_chunk", 32)
        out.setdefault("fwd_warps", 4)
    out.setdefault("bwd_parallel", int(on_gpu))
    return out


def chunk_block(chunk_size: int, forced: int | None = None) -> int:
    """The chunk length the kernels use: chunk_size rounded up to a power of two >= 16, at most
    64. The chunked algorithm computes the same function for every chunk length, so this is a
    choice of speed and memory only (the backward may pick its own, see ``tuning``)."""
    return forced or min(_block(chunk_size), MAX_CHUNK_BLOCK)


def headdim_block(headdim: int, programs: int, device: torch.device, block_p: int | None = None) -> int:
    """Headdim columns per program (BP): the rows of the state H (headdim, dstate) evolve
    independently, so a (batch, head) can be split over programs by headdim blocks. Splitting costs
    a recomputed C B^T and re-read B, C, dt per block, and pays where (batch x heads x directions)
    programs would leave streaming multiprocessors idle: a program's time per chunk barely depends
    on BP (on an H100, 4 directions x 32 heads took 2.25 ms with BP 64 and 7.15 ms with BP 16 at
    16K tokens; 1 direction 2.08 ms and 1.66 ms). ``block_p`` (or the environment variable
    MDM_SSD_HEADDIM_BLOCK) forces a power of two >= 16; by default blocks are halved, down to 16,
    while the doubled program count still fits in one wave of multiprocessors (never on CPU)."""
    full = _block(headdim)
    forced = block_p or int(os.environ.get("MDM_SSD_HEADDIM_BLOCK", "0") or 0)
    if forced:
        if forced < 16 or forced & (forced - 1):
            raise ValueError(f"headdim block must be a power of two >= 16, got {forced} "
                             "(block_p / MDM_SSD_HEADDIM_BLOCK)")
        return min(forced, full)
    if device.type != "cuda":
        return full
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    bp = full
    while bp > 16 and 2 * programs * triton.cdiv(headdim, bp) <= sms:
        bp //= 2
    return bp


@functools.cache
def _sm_count(index: int) -> int:  # looked up once per device, not at every launch
    return torch.cuda.get_device_properties(index).multi_processor_count


def _prec(x: torch.Tensor) -> str:
    """tl.dot's input precision: exact float32 products for float32 inputs (16-bit ones are exact anyway)."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _strides(t: torch.Tensor | None, ndim: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * ndim


def ssd_fwd_triton(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_states, seq_idx, scan_order,
                   chunk_size: int, store_states: bool = False, write_y: bool = True, block_p: int | None = None,
                   chunk: int | None = None, tune: dict | None = None):
    """Launch the forward on direction-stacked inputs (a leading K dimension, any strides).

    x, z (K, b, L, h, p); dt (K, b, L, h); A, dt_bias (K, h); B, C (K, b, L, g, n); D (K, h) or
    (K, h, p); initial_states (K, b, h, p, n); seq_idx (K, b, L); scan_order (K, L) long.
    Returns y (K, b, L, h, p) in x.dtype (None unless write_y), final states (K, b, h, p, n)
    float32, and the chunk-entry states (K, b, h, nchunks, p, n) float32 when store_states.
    ``block_p``: headdim columns per program (see :func:`headdim_block`); ``chunk`` overrides
    :func:`chunk_block`; ``tune`` replaces the settings read from MDM_SSD_TUNE (:func:`tuning`).
    """
    K, batch, L, nheads, headdim = x.shape
    ngroups, dstate = B.shape[-2:]
    tune = tuning() if tune is None else tune
    BQ = chunk_block(chunk_size, chunk or tune.get("fwd_chunk"))
    nchunks = triton.cdiv(L, BQ)
    dev = x.device
    y = torch.empty_like(x, memory_format=torch.contiguous_format) if write_y else x.new_empty(0)
    final = torch.empty(K, batch, nheads, headdim, dstate, device=dev, dtype=torch.float32)
    states = (torch.empty(K, batch, nheads, nchunks, headdim, dstate, device=dev, dtype=torch.float32)
              if store_states else final.new_empty(0))
    dummy = final
    BP = headdim_block(headdim, batch * nheads * K, dev, block_p)
    npb = triton.cdiv(headdim, BP)
    grid = (batch * nheads * npb, K)
    _ssd_fwd_kernel[grid](
        x, dt, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
        dt_bias if dt_bias is not None else dummy, initial_states if initial_states is not None else dummy,
        seq_idx if seq_idx is not None else dummy, scan_order if scan_order is not None else dummy,
        y, final, states,
        L, nheads, nheads // ngroups, headdim, dstate, nchunks, npb,
        *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(),
        *(_strides(D, 3) if D is None or D.dim() == 3 else (*D.stride(), 0)),
        *_strides(z, 5), *_strides(dt_bias, 2), *_strides(initial_states, 5), *_strides(seq_idx, 3),
        *_strides(scan_order, 2), *(y.stride() if write_y else (0,) * 5),
        BQ=BQ, BP=BP, BN=_block(dstate),
        HAS_D=D is not None, D_HDIM=D is not None and D.dim() == 3, HAS_Z=z is not None,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), HAS_INIT=initial_states is not None,
        HAS_SEQ=seq_idx is not None, HAS_ORDER=scan_order is not None,
        STORE_STATES=store_states, WRITE_Y=write_y,
        PREC=_prec(x),
        num_warps=tune.get("fwd_warps") or (8 if max(BP, dstate) >= 64 else 4),
    )
    return (y if write_y else None), final, (states if store_states else None)
