"""`python -m mdm_dist.inspect`: meta-device counts agree with a real build and the 7B config."""

import subprocess
import sys
import time
from pathlib import Path

from mdm_dist.config import load_config
from mdm_dist.inspect import component_params, report
from mdm_dist.models.mdm import build_model, count_parameters

ROOT = Path(__file__).resolve().parents[1]


def test_7b_reports_paper_size_in_seconds():
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "mdm_dist.inspect", "configs/7b.yaml", "--gpus", "8", "64"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert time.time() - t0 < 60
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("total_params=")
    total = int(last.split("=")[1])
    assert 6.5e9 <= total <= 7.5e9
    assert "49 Mamba blocks x d_model 2048" in out.stdout
    assert "ZeRO-3 memory per GPU" in out.stdout and "TFLOP" in out.stdout


def test_counts_equal_a_real_build(tmp_path):
    import io

    buf = io.StringIO()
    total = report(str(ROOT / "configs/tiny.yaml"), [], [1, 2], 1, file=buf)
    model = build_model(load_config(ROOT / "configs/tiny.yaml"))
    assert total == count_parameters(model) == sum(component_params(model).values())
    assert buf.getvalue().strip().endswith(f"total_params={total}")


def test_bad_override_exits_2():
    out = subprocess.run([sys.executable, "-m", "mdm_dist.inspect", "configs/tiny.yaml", "--set", "model.depth=3"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unknown key 'model.depth'" in out.stderr
