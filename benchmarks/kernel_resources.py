"""Registers, spills and shared memory of the Triton SSD kernels, compiled offline (no GPU needed).

    .venv/bin/python benchmarks/kernel_resources.py                  # sm_90 (H100 / H200), bf16
    .venv/bin/python benchmarks/kernel_resources.py --no-z --arch 80 --json out.json

Triton compiles a kernel for any NVIDIA target without a GPU: its wheel brings ``ptxas`` and
``cuobjdump``. This script compiles each kernel of ``kernels/ssd`` at the benchmark's sizes
(headdim 64, dstate 128 by default) for the launch settings a GPU run would use, then reads the
cubin's resource usage: registers per thread (REG), the per-thread stack that register spills go
to (STACK, bytes; 0 = no spill), and Triton's shared memory. A program of ``warps`` warps spills
STACK x 32 x warps bytes to local memory, which is what made the backward slow on an H200
(``benchmarks/gpu_results.md``). So this is the tool for choosing launch settings between GPU
runs: spills are not time, but a kernel that spills kilobytes per thread is not going to be fast.

Each row is one kernel specialization: the direction-stacked scan with scan orders, D, dt_bias and
softplus, z (the gate; ``--no-z`` for the model's mixers, which gate outside the scan), no
seq_idx, no initial states.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

INPUT_PTRS = {"x_ptr", "dt_ptr", "B_ptr", "C_ptr", "z_ptr", "dy_ptr", "dx_ptr", "dz_ptr", "y_ptr"}
INDEX_PTRS = {"order_ptr", "seq_ptr"}
USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def signature(kernel, dtype: str) -> dict[str, str]:
    """Triton's signature for our kernels: pointers by name (input tensors in ``dtype``, scan
    orders int64, everything else float32), integers as i32, constexprs as such."""
    sig = {}
    for p in kernel.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = f"*{dtype}" if p.name in INPUT_PTRS else ("*i64" if p.name in INDEX_PTRS else "*fp32")
        else:
            sig[p.name] = "i32"
    return sig


def cuobjdump() -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        raise SystemExit(f"kernel_resources: {tool} not found: this needs Triton's NVIDIA backend (its wheel "
                         "ships ptxas and cuobjdump)")
    return str(tool)


def resources(kernel, constexprs: dict, warps: int, stages: int | None, arch: int, dtype: str) -> dict:
    """Compile one specialization for sm_<arch> and return its resource usage."""
    src = ASTSource(fn=kernel, signature=signature(kernel, dtype), constexprs=constexprs)
    opts = dict(num_warps=warps) | ({} if stages is None else dict(num_stages=stages))
    t0 = time.perf_counter()
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    seconds = time.perf_counter() - t0
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = USAGE.search(out)
    if not m:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{out}")
    reg, stack, _, local = map(int, m.groups())
    return dict(regs=reg, stack_bytes=stack, local_bytes=local, spill_bytes_per_program=stack * 32 * warps,
                shared_bytes=int(compiled.metadata.shared), compile_s=round(seconds, 1))


def rows(args) -> list[tuple[str, object, dict, int, int | None]]:
    """(label, kernel, constexprs, warps, stages): the launch settings of kernels/ssd, defaults first."""
    import kernels.ssd.triton_bwd as tb
    import kernels.ssd.triton_fwd as tf
    import kernels.ssd.triton_par as tp

    BP, BN = tf._block(args.headdim), tf._block(args.dstate)
    prec = "tf32"  # 16-bit inputs (float32 inputs use "ieee")
    opts = dict(HAS_D=True, D_HDIM=False, HAS_Z=not args.no_z, HAS_BIAS=True, SOFTPLUS=True, HAS_SEQ=False,
                HAS_ORDER=True, PREC=prec)
    no_gate = {k: v for k, v in opts.items() if k not in ("HAS_D", "D_HDIM", "HAS_Z")}
    wide = lambda: 8 if max(BP, args.dstate) >= 64 else 4  # noqa: E731  the kernels' default warps
    out = []
    for BQ, w in ((32, 4), (64, wide())):
        out.append((f"fwd sequential, chunk {BQ}", tf._ssd_fwd_kernel,
                    dict(opts, BQ=BQ, BP=BP, BN=BN, HAS_INIT=False, STORE_STATES=False, WRITE_Y=True), w, None))
    out.append(("bwd sequential, chunk 64", tb._ssd_bwd_kernel,
                dict(opts, BQ=64, BP=BP, BN=BN, HAS_DFINAL=False, PER_HEAD_DBC=False), wide(), None))
    out.append(("bwd parallel: state pass, chunk 64", tp._par_state_kernel, dict(no_gate, BQ=64, BP=BP, BN=BN),
                wide(), None))
    out.append(("bwd parallel: dstate pass, chunk 64", tp._par_dstate_kernel,
                dict({k: v for k, v in opts.items() if k not in ("HAS_D", "D_HDIM")}, BQ=64, BP=BP, BN=BN),
                wide(), None))
    for BQ in (64, 32):
        out.append((f"bwd parallel: grads, chunk {BQ}", tp._par_grad_kernel,
                    dict(opts, BQ=BQ, BP=BP, BN=BN, PER_HEAD_DBC=False, BLOCKED=False), wide(), None))
    for BQ, NB in ((64, 64), (64, 32), (64, 16), (32, 64), (32, 32)):
        if NB < BN:
            out.append((f"bwd parallel: blocked grads, chunk {BQ}, bwd_nblock {NB}", tp._par_grad_kernel,
                        dict(opts, BQ=BQ, BP=BP, BN=NB, PER_HEAD_DBC=False, BLOCKED=True), wide(), None))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200, 80: A100)")
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--dstate", type=int, default=128)
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--no-z", action="store_true", help="no gate in the scan (the model's mixers gate outside it)")
    p.add_argument("--only", default="", help="only rows whose label contains this text")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    print(f"[resources] sm_{args.arch}, {args.dtype}, headdim {args.headdim}, dstate {args.dstate}, "
          f"{'no z' if args.no_z else 'with z'}; triton {triton.__version__}")
    print(f"{'kernel':<52} {'warps':>5} {'regs':>5} {'stack B':>8} {'spill/program':>14} {'shared':>8}")
    results = []
    for label, kernel, constexprs, warps, stages in rows(args):
        if args.only not in label:
            continue
        r = resources(kernel, constexprs, warps, stages, args.arch, args.dtype)
        results.append(dict(kernel=label, warps=warps, **r))
        print(f"{label:<52} {warps:>5} {r['regs']:>5} {r['stack_bytes']:>8} "
              f"{r['spill_bytes_per_program'] / 1024:>11.1f} KB {r['shared_bytes'] / 1024:>6.1f}KB", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(arch=args.arch, dtype=args.dtype, headdim=args.headdim, dstate=args.dstate,
                                             z=not args.no_z, triton=triton.__version__, rows=results), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
