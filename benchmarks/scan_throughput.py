"""SSD scan throughput: our kernels against mamba-ssm's, and against the memory-bandwidth floor.

    .venv/bin/python benchmarks/scan_throughput.py            # CPU: < 2 minutes on 2 cores
    .venv/bin/python benchmarks/scan_throughput.py --quick    # GPU smoke run (gpu_check.sh)

On CPU: our chunked PyTorch path (``ssd_scan(backend="torch")``) against mamba-ssm's PyTorch
reference ``ssd_chunk_scan_combined_ref`` (imported through ``kernels.mamba_ssm_compat``), both
float32, forward and forward+backward; accuracy is the error of each against our float64 path
(equal to the sequential reference to 1e-10, see tests/test_ssd_scan.py).

On a CUDA GPU, in bfloat16: our Triton kernels for 1 and 4 scan directions (``ssd_scan_multi``,
the order handled inside the kernels) against mamba-ssm's ``mamba_chunk_scan_combined`` called
once per direction on permuted copies (gather the inputs, scan, scatter y back: what a model
using mamba-ssm must do), forward and forward+backward, at several lengths up to 64K tokens.
The floor is the bytes the op must move (read every input once, write every output once) over
the device's peak memory bandwidth; "floor %" is floor time / measured time.

Then, on the GPU, "mixer" rows: a 4-direction MambaBlock's mixers (one Mamba-2 mixer per
direction, bf16, forward and forward+backward including every parameter gradient):
``mixers_forward_stacked`` (in-kernel ordering, the 4 directions in one conv and one scan launch),
our mixers called one direction at a time (in-kernel ordering, 4 launches each), and the
mamba-ssm way: gather the input into each direction's order, in_proj, conv
(``causal_conv1d_fn`` where its CUDA extension is installed, else cuDNN's ``F.conv1d``),
``mamba_chunk_scan_combined``, out_proj, scatter back. All three use the same gated RMSNorm
(PyTorch), so the rows differ only in ordering, conv and scan. ``--no-mixer`` skips them.

Prints a table and writes ``benchmarks/results/scan_throughput_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:  # the Triton kernels must be built by the interpreter: set before they are imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kernels.ssd import ssd_scan, ssd_scan_multi  # noqa: E402

# Peak memory bandwidth (bytes/s) by a substring of torch.cuda.get_device_name(); first match wins.
PEAK_BANDWIDTH = [
    ("GH200", 4.0e12),  # before "H200", which it contains
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("H100", 3.35e12),  # H100 SXM (HBM3)
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),
    ("L40S", 0.864e12),
    ("L4", 0.3e12),
    ("A10", 0.6e12),
    ("RTX 4090", 1.008e12),
]


def peak_bandwidth(name: str) -> float | None:
    for key, bw in PEAK_BANDWIDTH:
        if key in name:
            return bw
    return None


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def make_inputs(K, batch, L, nheads, headdim, dstate, ngroups, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    rn = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device, dtype)  # noqa: E731
    return dict(
        x=rn(K, batch, L, nheads, headdim), dt=rn(K, batch, L, nheads, scale=0.5) - 1.0,
        A=-(torch.rand(nheads, generator=g) * 4 + 0.5).to(device),
        B=rn(K, batch, L, ngroups, dstate, scale=0.5), C=rn(K, batch, L, ngroups, dstate, scale=0.5),
        D=torch.randn(nheads, generator=g).to(device), z=rn(K, batch, L, nheads, headdim),
        dt_bias=(torch.randn(nheads, generator=g) * 0.3).to(device),
    )


def scan_orders(K: int, L: int, device) -> list[torch.Tensor | None]:
    """Row, row reversed, column, column reversed over a near-square grid (the MDM directions)."""
    side = int(math.isqrt(L))
    while L % side:
        side -= 1
    col = torch.arange(L, device=device).view(side, L // side).t().reshape(-1)
    orders = [None, torch.arange(L - 1, -1, -1, device=device), col, col.flip(0)]
    return orders[:K]


def bytes_moved(inp: dict, K: int, backward: bool) -> int:
    """Bytes the op must move: each input read once and each output written once (per pass)."""
    size = lambda t: t[:K].numel() * t.element_size()  # noqa: E731
    fwd_in = sum(size(inp[n]) for n in ("x", "dt", "B", "C", "z"))
    fwd_out = size(inp["x"])  # y
    total = fwd_in + fwd_out
    if backward:  # reads the inputs and dy, writes dx, ddt, dB, dC, dz
        total += fwd_in + size(inp["x"]) + fwd_in
    return total


def timeit_cpu(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def timeit_gpu(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=40) / 1e3


def _timer(args):
    """How rows are timed: do_bench on the GPU; once (a number, not a measurement) for --compile-only
    (which only fills the Triton cache) and for --smoke (the GPU code path in the CPU interpreter)."""
    if args.compile_only or args.smoke:
        def once(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        return once
    return timeit_gpu


def _fwd_bwd(fn, leaves):
    def run():
        for t in leaves:
            t.grad = None
        y = fn()
        y.float().sum().backward()
    return run


def bench_cpu(args) -> list[dict]:
    from kernels.mamba_ssm_compat import import_mamba_ssm

    import_mamba_ssm()
    from mamba_ssm.ops.triton.ssd_combined import ssd_chunk_scan_combined_ref

    rows = []
    for L in args.lengths or [512, 2048]:
        inp = make_inputs(1, args.batch, L, args.nheads, args.headdim, args.dstate, args.ngroups, "cpu", torch.float32)
        x, dt, B, C, z = (inp[n][0] for n in ("x", "dt", "B", "C", "z"))
        common = dict(D=inp["D"], z=z, dt_bias=inp["dt_bias"], dt_softplus=True)
        exact = ssd_scan(x.double(), dt.double(), inp["A"].double(), B.double(), C.double(),
                         **{k: (v.double() if torch.is_tensor(v) else v) for k, v in common.items()},
                         chunk_size=args.chunk_size, backend="torch")
        ours = lambda: ssd_scan(x, dt, inp["A"], B, C, **common, chunk_size=args.chunk_size, backend="torch")  # noqa: E731
        theirs = lambda: ssd_chunk_scan_combined_ref(x, dt, inp["A"], B, C, args.chunk_size, **common)  # noqa: E731
        for name, fn in (("ours torch", ours), ("mamba-ssm ref", theirs)):
            out = fn()
            err = (out.double() - exact).abs().max().item()
            rel = ((out.double() - exact).norm() / exact.norm()).item()
            t_f = timeit_cpu(fn, args.reps)
            leaves = [x, dt, B, C, z]
            for t in leaves:
                t.requires_grad_(True)
            t_fb = timeit_cpu(_fwd_bwd(fn, leaves), max(1, args.reps - 1))
            for t in leaves:
                t.requires_grad_(False)
                t.grad = None
            tokens = args.batch * L
            rows.append(dict(impl=name, K=1, seqlen=L, dtype="float32", max_abs_err=err, rel_err=rel,
                             fwd_s=t_f, fwd_bwd_s=t_fb, fwd_tok_s=tokens / t_f, fwd_bwd_tok_s=tokens / t_fb))
    return rows


def _failed(rows: list, save, impl: str, K: int, L: int, err: Exception) -> None:
    """Record a row that raised (one failing row must not lose the others)."""
    print(f"[bench] {impl} K={K} L={L} failed: {type(err).__name__}: {err}", flush=True)
    rows.append(dict(impl=impl, K=K, seqlen=L, error=f"{type(err).__name__}: {err}"))
    save(rows)


def _dtype(args) -> torch.dtype:
    """bf16 on the GPU; float32 in the smoke run (Triton's CPU interpreter gets bf16 dots wrong)."""
    return torch.float32 if args.smoke else torch.bfloat16


def _mamba_scan(args):
    """mamba-ssm's ``mamba_chunk_scan_combined``, or None (with a message) where it cannot run."""
    if "mamba" not in args.rows:
        return None
    if args.smoke:
        print("[bench] smoke run: mamba-ssm's Triton kernels need CUDA; timing ours only")
        return None
    from kernels.mamba_ssm_compat import import_mamba_ssm

    try:
        import_mamba_ssm()
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as err:  # noqa: BLE001  the baseline is optional
        print(f"[bench] mamba-ssm unavailable ({type(err).__name__}: {err}); timing ours only")
        return None
    return mamba_chunk_scan_combined


def bench_gpu(args, save) -> list[dict]:
    from kernels.ssd.triton_fwd import headdim_block

    mamba_chunk_scan_combined = _mamba_scan(args)
    timeit = _timer(args)
    dev = args.dev
    name = args.device_name
    bw = peak_bandwidth(name) if dev == "cuda" else None
    rows = []
    dtype = _dtype(args)
    for L in args.lengths or ([4096, 16384] if args.quick else [4096, 16384, 65536]):
        for K in args.directions:
            inp = make_inputs(K, args.batch, L, args.nheads, args.headdim, args.dstate, args.ngroups, dev, dtype)
            orders = scan_orders(K, L, dev)
            A, D, dtb = inp["A"], inp["D"], inp["dt_bias"]
            leaves = [inp[n] for n in ("x", "dt", "B", "C", "z")]

            def ours(block_p=None, tune=""):
                det = "deterministic" in tune
                tune = ",".join(t for t in tune.split(",") if t and t != "deterministic")

                def run():
                    # launch settings (kernels.ssd.triton_fwd.headdim_block / tuning) are read when the
                    # forward runs; its backward reuses them, whenever it runs
                    env = {"MDM_SSD_HEADDIM_BLOCK": str(block_p or ""), "MDM_SSD_TUNE": tune}
                    os.environ.update(env)
                    try:
                        return ssd_scan_multi(inp["x"], inp["dt"], A, inp["B"], inp["C"], D=D, z=inp["z"],
                                              dt_bias=dtb, dt_softplus=True, scan_order=orders,
                                              chunk_size=args.chunk_size, backend="triton", deterministic=det)
                    finally:
                        for key in env:
                            os.environ.pop(key, None)
                return run

            def theirs():
                ys = []
                for k, order in enumerate(orders):
                    g = (lambda t: t[k]) if order is None else (lambda t: t[k].index_select(1, order))  # noqa: E731
                    y = mamba_chunk_scan_combined(g(inp["x"]), g(inp["dt"]), A, g(inp["B"]), g(inp["C"]),
                                                  args.chunk_size, D=D, z=g(inp["z"]), dt_bias=dtb, dt_softplus=True)
                    if order is not None:
                        y = y.index_select(1, torch.argsort(order))
                    ys.append(y)
                return torch.stack(ys)

            auto_bp = headdim_block(args.headdim, args.batch * args.nheads * K, torch.device(dev))
            impls = [(f"ours triton (auto={auto_bp})", ours())] if "auto" in args.rows else []
            if "bp" in args.rows:
                impls += [(f"ours triton bp{bp}", ours(bp)) for bp in args.block_p if bp != auto_bp]
            if L in args.tune_lengths and "tune" in args.rows:
                impls += [(f"ours {t}", ours(tune=t)) for t in args.tune]
            impls += [("mamba-ssm + copies", theirs)] if mamba_chunk_scan_combined else []
            ref_y = ref_g = None
            gw = torch.randn(K, args.batch, L, args.nheads, args.headdim, device=dev, dtype=dtype)
            for impl, fn in impls:
                try:
                    with torch.no_grad():
                        y = fn()
                        ref_y = y if ref_y is None else ref_y
                        err = (y.float() - ref_y.float()).abs().max().item()
                    for t in leaves:
                        t.requires_grad_(True)
                    (fn().float() * gw).sum().backward()  # gradients vs the first row's
                    grads = torch.cat([t.grad.float().flatten() for t in leaves])
                    ref_g = grads if ref_g is None else ref_g
                    gerr = ((grads - ref_g).norm() / ref_g.norm()).item()
                    del grads
                    for t in leaves:
                        t.grad = None
                        t.requires_grad_(False)
                    t_f = timeit(lambda: fn())
                    for t in leaves:
                        t.requires_grad_(True)
                    t_fb = timeit(_fwd_bwd(fn, leaves))
                except Exception as e:  # noqa: BLE001
                    _failed(rows, save, impl, K, L, e)
                    continue
                finally:
                    for t in leaves:
                        t.requires_grad_(False)
                        t.grad = None
                tokens = args.batch * L * K
                row = dict(impl=impl, K=K, seqlen=L, dtype=str(dtype).removeprefix("torch."), max_abs_diff_vs_ours=err,
                           grad_rel_diff_vs_ours=gerr, fwd_s=t_f, fwd_bwd_s=t_fb, fwd_tok_s=tokens / t_f,
                           fwd_bwd_tok_s=tokens / t_fb)
                if bw:
                    row["floor_fwd_s"] = bytes_moved(inp, K, False) / bw
                    row["floor_fwd_bwd_s"] = bytes_moved(inp, K, True) / bw
                    row["floor_frac_fwd"] = row["floor_fwd_s"] / t_f
                    row["floor_frac_fwd_bwd"] = row["floor_fwd_bwd_s"] / t_fb
                rows.append(row)
                print_row(row)
                save(rows)
            del inp, leaves
            if dev == "cuda":
                torch.cuda.empty_cache()
    return rows


MIXER = dict(d_model=1024, d_state=128, d_conv=4, expand=2.0, headdim=64, ngroups=1, chunk_size=64)
MIXER_SMOKE = dict(MIXER, d_model=32, d_state=16, headdim=16, chunk_size=16)


def _baseline_conv(width: int):
    """mamba-ssm's conv: causal_conv1d_fn with its CUDA extension, else F.conv1d (its fallback)."""
    import torch.nn.functional as F

    try:
        import causal_conv1d_cuda  # noqa: F401  the extension, not only the Python package
        from causal_conv1d import causal_conv1d_fn

        return "causal_conv1d_fn", lambda x, w, b: causal_conv1d_fn(
            x.transpose(1, 2), w, b, activation="silu").transpose(1, 2)
    except ImportError:
        return "F.conv1d", lambda x, w, b: F.silu(F.conv1d(
            F.pad(x.transpose(1, 2), (width - 1, 0)), w.unsqueeze(1), b, groups=x.shape[-1])).transpose(1, 2)


def bench_gpu_mixer(args, save, rows) -> list[dict]:
    """4-direction block mixers, forward and forward+backward: ours stacked / ours per direction /
    mamba-ssm with gathered copies (see the module docstring)."""
    import torch.nn.functional as F

    from mdm_dist.models.mamba2 import Mamba2Mixer, keep_fp32_, mixers_forward_stacked, rms_norm_gated

    mamba_chunk_scan_combined = _mamba_scan(args)
    timeit = _timer(args)
    dev = args.dev
    cfg = MIXER_SMOKE if args.smoke else MIXER
    conv_name, conv = _baseline_conv(cfg["d_conv"])
    K, dtype = 4, _dtype(args)
    torch.manual_seed(0)
    mixers = [keep_fp32_(Mamba2Mixer(**cfg, scan_backend="triton", device=dev).to(dtype)) for _ in range(K)]
    params = [p for m in mixers for p in m.parameters()]

    def theirs_one(m, u, order):
        if order is not None:
            u = u.index_select(1, order)
        z, xBC, dt = torch.split(m.in_proj(u), [m.d_inner, m.conv_dim, m.nheads], dim=-1)
        xBC = conv(xBC, m.conv1d.weight.squeeze(1), m.conv1d.bias)
        gn = m.ngroups * m.d_state
        x, B, C = torch.split(xBC, [m.d_inner, gn, gn], dim=-1)
        y = mamba_chunk_scan_combined(
            x.unflatten(-1, (m.nheads, m.headdim)), dt, -torch.exp(m.A_log.float()),
            B.unflatten(-1, (m.ngroups, m.d_state)), C.unflatten(-1, (m.ngroups, m.d_state)), m.chunk_size,
            D=m.D, dt_bias=m.dt_bias, dt_softplus=True)
        out = m.out_proj(rms_norm_gated(y.flatten(-2), z, m.norm.weight, m.norm.group_size, m.norm.eps))
        return out if order is None else out.index_select(1, torch.argsort(order))

    for L in args.lengths or [4096, 16384]:
        u = torch.randn(args.batch, L, cfg["d_model"], device=dev, dtype=dtype)
        orders = scan_orders(K, L, dev)
        impls = []  # (name, MDM_SSD_TUNE, fn)
        for tune in args.mixer_tune:
            tag = f" {tune}" if tune else ""
            if "auto" in args.rows or tune:
                impls.append((f"mixer ours stacked{tag}", tune,
                              lambda: mixers_forward_stacked(mixers, u, orders, backend="triton")))
                impls.append((f"mixer ours per-dir{tag}", tune,
                              lambda: sum(m(u, scan_order=o) for m, o in zip(mixers, orders))))
        if mamba_chunk_scan_combined is not None:
            impls.append((f"mixer mamba-ssm+copy ({conv_name})", "",
                          lambda: sum(theirs_one(m, u, o) for m, o in zip(mixers, orders))))
        ref = None
        for impl, tune, fn in impls:
            os.environ["MDM_SSD_TUNE"] = tune  # read by each forward; its backward reuses it
            try:
                with torch.no_grad():
                    out = fn()
                    ref = out if ref is None else ref
                    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                t_f = timeit(fn)
                u.requires_grad_(True)
                t_fb = timeit(_fwd_bwd(fn, [u, *params]))
            except Exception as e:  # noqa: BLE001
                _failed(rows, save, impl, K, L, e)
                continue
            finally:
                os.environ.pop("MDM_SSD_TUNE", None)
                u.requires_grad_(False)
                u.grad = None
                for q in params:
                    q.grad = None
            tokens = args.batch * L * K
            row = dict(impl=impl, K=K, seqlen=L, dtype=str(dtype).removeprefix("torch."), mixer=cfg, rel_diff_vs_ours=err,
                       fwd_s=t_f, fwd_bwd_s=t_fb, fwd_tok_s=tokens / t_f, fwd_bwd_tok_s=tokens / t_fb)
            rows.append(row)
            print_row(row)
            save(rows)
        del u
        if dev == "cuda":
            torch.cuda.empty_cache()
    return rows


def print_header(gpu: bool):
    extra = f"{'floor% f':>9} {'floor% fb':>9}" if gpu else f"{'max err':>9} {'rel err':>9}"
    print(f"{'impl':<36} {'K':>2} {'seqlen':>7} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd Mtok/s':>11} "
          f"{'f+b Mtok/s':>11} {extra}")


def print_row(r: dict):
    if "max_abs_err" in r:
        extra = f"{r['max_abs_err']:9.2e} {r['rel_err']:9.2e}"
    elif "floor_frac_fwd" in r:
        extra = f"{100 * r['floor_frac_fwd']:8.1f}% {100 * r['floor_frac_fwd_bwd']:8.1f}%"
    else:
        extra = ""
    if "grad_rel_diff_vs_ours" in r:
        extra += f"  grad diff {r['grad_rel_diff_vs_ours']:.1e}"
    if "rel_diff_vs_ours" in r:
        extra = f"  rel diff {r['rel_diff_vs_ours']:.1e}"
    print(f"{r['impl']:<36} {r['K']:>2} {r['seqlen']:>7} {1e3 * r['fwd_s']:9.2f} {1e3 * r['fwd_bwd_s']:11.2f} "
          f"{r['fwd_tok_s'] / 1e6:11.3f} {r['fwd_bwd_tok_s'] / 1e6:11.3f} {extra}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--lengths", type=int, nargs="*", help="sequence lengths (default: CPU 512 2048; GPU 4K 16K 64K)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--nheads", type=int, default=None, help="default: CPU 8, GPU 32")
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--dstate", type=int, default=None, help="default: CPU 64, GPU 128")
    p.add_argument("--ngroups", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--reps", type=int, default=3, help="CPU timing repetitions (median)")
    p.add_argument("--quick", action="store_true", help="GPU: skip 64K")
    p.add_argument("--no-mixer", action="store_true", help="GPU: skip the 4-direction mixer rows")
    p.add_argument("--block-p", type=int, nargs="*", default=[],
                   help="GPU: headdim blocks of our kernels to time besides the automatic choice (16 32 64)")
    p.add_argument("--tune", nargs="*", default=[],
                   help="GPU: launch settings to time besides the defaults, each a MDM_SSD_TUNE value "
                        "(e.g. bwd_chunk=32,bwd_warps=4), optionally with ',deterministic'")
    p.add_argument("--tune-lengths", type=int, nargs="*", default=[16384], help="GPU: lengths for --tune rows")
    p.add_argument("--directions", type=int, nargs="*", default=[1, 4], help="GPU: direction counts K")
    p.add_argument("--rows", default="auto,bp,tune,mamba",
                   help="GPU: which rows, comma-separated from auto (our defaults), bp (--block-p), tune (--tune), "
                        "mamba (mamba-ssm's kernels)")
    p.add_argument("--mixer-tune", nargs="*", default=[""],
                   help="GPU: MDM_SSD_TUNE values for our mixer rows ('' = the defaults)")
    p.add_argument("--compile-only", action="store_true",
                   help="GPU: run every selected row once, untimed, to fill the Triton cache (TRITON_CACHE_DIR) "
                        "for a later timed run; several such processes can compile side by side")
    p.add_argument("--smoke", action="store_true",
                   help="run the GPU code path on CPU in Triton's interpreter at toy sizes (a check of this "
                        "script, not a measurement)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    bad = set(args.rows.split(",")) - {"auto", "bp", "tune", "mamba"}
    if bad:
        p.error(f"--rows: unknown {', '.join(sorted(bad))}; allowed: auto, bp, tune, mamba")
    args.rows = set(args.rows.split(","))
    if args.smoke:  # toy sizes: the interpreter runs every program of the grid in Python
        if os.environ.get("TRITON_INTERPRET") != "1":
            p.error("--smoke needs TRITON_INTERPRET=1 before the kernels are imported (set by this script itself "
                    "when --smoke is on its command line)")
        args.lengths = args.lengths or [80]
        args.nheads, args.headdim, args.dstate, args.chunk_size = args.nheads or 2, 16, args.dstate or 16, 16
        args.tune_lengths = args.lengths
    gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.smoke and gpu:
        p.error("--smoke runs on CPU; on a GPU run without it")
    args.dev = "cuda" if gpu else "cpu"
    args.nheads = args.nheads or (32 if gpu else 8)
    args.dstate = args.dstate or (128 if gpu else 64)
    if not gpu:
        torch.set_num_threads(max(1, torch.get_num_threads()))
    device_name = torch.cuda.get_device_name() if gpu else f"cpu-{platform.processor() or platform.machine()}"
    if args.smoke:
        device_name += "-smoke"
    args.device_name = device_name
    print(f"[bench] {device_name}: batch {args.batch}, nheads {args.nheads}, headdim {args.headdim}, "
          f"dstate {args.dstate}, ngroups {args.ngroups}, chunk {args.chunk_size}")
    print_header(gpu or args.smoke)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"scan_throughput_{slug(device_name)}.json"
    meta = dict(device=device_name, torch=torch.__version__, threads=torch.get_num_threads(),
                peak_bandwidth_Bps=peak_bandwidth(device_name) if gpu else None,
                config={k: (str(v) if isinstance(v, Path) else sorted(v) if isinstance(v, set) else v)
                        for k, v in vars(args).items()})

    def save(rows):
        path.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))

    if args.compile_only:
        save = lambda rows: None  # noqa: E731  fills the Triton cache only; the timed run writes the JSON
    on_gpu_path = gpu or args.smoke
    rows = bench_gpu(args, save) if on_gpu_path else bench_cpu(args)
    if on_gpu_path and not args.no_mixer:
        bench_gpu_mixer(args, save, rows)
    if not on_gpu_path:
        for r in rows:
            print_row(r)
    save(rows)
    if args.compile_only:
        print("[bench] compile-only: nothing written")
        return
    print(f"[bench] wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


if __name__ == "__main__":
    main()
