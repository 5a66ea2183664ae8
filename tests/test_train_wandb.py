"""wandb offline (the default): metrics.jsonl and an offline wandb run, no network needed."""

import json

from mdm_dist.config import load_config
from mdm_dist.train.metrics import MetricsLogger


def test_offline_wandb_run_and_metrics_file(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = MetricsLogger(tmp_path, load_config("configs/tiny.yaml"), rank=0)
    assert logger.wandb is not None, "wandb offline failed to start"
    for step in (1, 2):
        logger.log({"step": step, "loss": 1.0 / step, "lr": 1e-3, "grad_norm": float("nan")})
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["loss"] == 0.5
    assert rows[0]["grad_norm"] is None  # non-finite values are written as null, never NaN
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_other_ranks_write_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = MetricsLogger(tmp_path, load_config("configs/tiny.yaml"), rank=1)
    logger.log({"step": 1, "loss": 1.0})
    logger.close()
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "wandb").exists()
