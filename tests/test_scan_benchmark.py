"""benchmarks/scan_throughput.py's GPU code path, run on CPU in Triton's interpreter (--smoke).

The GPU run happens only where a GPU is lent; this keeps the script's row logic (launch settings,
the chunk-parallel kernels, the mixer rows, the JSON) working between those runs. The numbers are
not measurements; what is checked is that every row ran and agreed with the default kernels.
"""

import json
import subprocess
import sys

from test_train_pretrain import REPO


def test_scan_throughput_smoke(tmp_path):
    cmd = [sys.executable, "benchmarks/scan_throughput.py", "--smoke", "--lengths", "24", "--directions", "4",
           "--tune", "parallel=1", "--mixer-tune", "", "parallel=1", "--out", str(tmp_path)]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    (path,) = tmp_path.glob("scan_throughput_*-smoke.json")
    rows = json.loads(path.read_text())["rows"]
    assert not [r for r in rows if "error" in r], rows
    names = [(r["impl"], r["K"]) for r in rows]
    assert names == [("ours triton (auto=16)", 4),
                     ("ours parallel=1", 4), ("mixer ours stacked", 4), ("mixer ours per-dir", 4),
                     ("mixer ours stacked parallel=1", 4), ("mixer ours per-dir parallel=1", 4)]
    for r in rows:
        assert r["dtype"] == "float32" and r["fwd_s"] > 0 and r["fwd_bwd_s"] > 0
        if "grad_rel_diff_vs_ours" in r:  # the chunk-parallel kernels against the sequential ones
            assert r["max_abs_diff_vs_ours"] < 1e-4 and r["grad_rel_diff_vs_ours"] < 1e-5, r
        else:  # mixers: stacked directions / one at a time / chunk-parallel scan, the same function
            assert r["rel_diff_vs_ours"] < 1e-5, r
    assert "mamba-ssm's Triton kernels need CUDA" in p.stdout
