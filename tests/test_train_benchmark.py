"""benchmarks/train_throughput.py runs on CPU for a tiny config and reports its numbers."""

import json

import pytest

from _warm import run_script
from test_train_pretrain import REPO, TINY, _env


def test_train_throughput_cpu(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--config", "configs/tiny.yaml", "--steps", "2", "--warmup", "1", "--checkpointing", "every",
            "--zero-stage", "3", "--json", str(out), "--profile", str(tmp_path / "top_ops.txt")]
    for o in TINY:
        args += ["--set", o]
    # a fresh process forked from a warm interpreter (tests/_warm.py): the script as `python` runs it
    p = run_script(REPO / "benchmarks" / "train_throughput.py", args, _env(tmp_path), REPO, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["steps_per_s"] > 0 and r["tokens_per_s"] == r["samples_per_s"] * r["seq_len"]
    assert r["mfu"] is None and r["peak_mem_gb"] > 0 and r["zero_stage"] == 3
    # the step split into the engine's phases: each took time, and together no more than the step
    ph = r["phase_ms"]
    assert set(ph) == {"forward", "backward", "step"} and min(ph.values()) > 0
    assert sum(ph.values()) <= r["step_ms"] and r["step_ms"] == pytest.approx(1000 / r["steps_per_s"])
    assert "steps/s" in p.stdout
    top = (tmp_path / "top_ops.txt").read_text()  # one profiled step: the operator table
    assert "sorted by self_cpu_time_total" in top and "aten::mm" in top and "# of Calls" in top
