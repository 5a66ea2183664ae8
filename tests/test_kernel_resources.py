"""benchmarks/kernel_resources.py compiles the SSD kernels for sm_90 on this CPU-only machine and
reads their registers and spills from the cubin (Triton's wheel brings ptxas and cuobjdump)."""

import json
import subprocess
import sys

from test_train_pretrain import REPO


def _run(tmp_path, name, *args):
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, "benchmarks/kernel_resources.py", *args, "--json", str(out)]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(out.read_text()), p.stdout


def test_kernel_resources_offline(tmp_path):
    small, stdout = _run(tmp_path, "small", "--only", "fwd sequential, chunk 32", "--headdim", "16", "--dstate", "16",
                         "--no-z")
    assert small["arch"] == 90 and small["z"] is False
    (row,) = small["rows"]
    assert row["kernel"] == "fwd sequential, chunk 32" and row["warps"] == 4 and "fwd sequential, chunk 32" in stdout
    assert 16 <= row["regs"] <= 255 and row["shared_bytes"] > 0
    assert row["spill_bytes_per_program"] == row["stack_bytes"] * 32 * row["warps"]
    # the backward's gradient pass at the benchmark's sizes (headdim 64, dstate 128, with z) runs
    # out of registers: kilobytes of stack per thread against almost none for small tiles
    big, _ = _run(tmp_path, "big", "--only", "bwd parallel: grads, chunk 64")
    (grad,) = big["rows"]
    assert grad["regs"] == 255 and grad["stack_bytes"] > 512 > 8 * row["stack_bytes"]
