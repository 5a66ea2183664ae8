"""launch/train_vae.py end to end on a tiny corpus: checkpoint, grid, metrics; the encoder loads it;
and the same under the DeepSpeed launcher with 2 CPU ranks (gloo)."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["vae.image_size=16", "vae.base_channels=8", "vae.channel_mult=[1,2]", "vae.trunk_width=32",
        "vae.trunk_layers=1", "vae.d_z=8", "vae.max_text_len=12", "train.max_steps=6", "train.warmup_steps=2",
        "train.micro_batch_size=4", "train.global_batch_size=8", "train.log_every=2"]


def _script(rel: str):
    spec = importlib.util.spec_from_file_location(Path(rel).stem, ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_vae_writes_a_checkpoint_the_encoder_loads(tmp_path):
    from mdm_dist.data.tokenizer import CaptionTokenizer
    from mdm_dist.data.vae_checkpoint import load_vae_checkpoint

    assert _script("data_prep/make_demo_data.py").main(
        ["--output", str(tmp_path / "demo"), "--num-samples", "40", "--shard-size", "20", "--image-size", "24"]) == 0
    out = tmp_path / "vae"
    args = ["--config", str(ROOT / "configs/vae_tiny.yaml"), "--data", str(tmp_path / "demo"), "--output", str(out),
            "--val-samples", "8"]
    for s in TINY:
        args += ["--set", s]
    assert _script("launch/train_vae.py").main(args) == 0
    for name in ("vae.pt", "vae_reconstructions.png", "vae_metrics.json", "config.yaml", "tokenizer/tokenizer.model"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "vae_metrics.json").read_text())
    m = metrics["metrics"]
    assert m["num_samples"] == 8 and 0 <= m["token_acc"] <= 1 and 0 < m["psnr"] < 60
    assert metrics["train_samples"] == 32 and len(metrics["history"]) >= 3
    vae, cfg, ckpt = load_vae_checkpoint(out / "vae.pt")
    assert cfg.vae.image_size == 16 and cfg.train.max_steps == 6 and ckpt["step"] == 6
    assert cfg.data.tokenizer == ckpt["tokenizer"] == str((out / "tokenizer").resolve())
    tok = CaptionTokenizer(ckpt["tokenizer"])
    tok.check_vae(cfg.vae)
    mu, logvar = vae.encode_image(torch.zeros(1, 3, 16, 16))
    assert mu.shape == (1, 16, 8)
    rc = _script("data_prep/encode_laion.py").main(
        ["--input", str(tmp_path / "demo"), "--output", str(tmp_path / "mds"), "--vae", str(out / "vae.pt"),
         "--tokenizer", ckpt["tokenizer"]])
    assert rc == 0
    assert json.loads((tmp_path / "mds" / "encode_report.json").read_text())["written"] == 40


def test_train_vae_bad_arguments_exit_2(tmp_path):
    mod = _script("launch/train_vae.py")
    assert mod.main(["--data", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2
    assert mod.main(["--config", str(ROOT / "configs/vae_tiny.yaml"), "--data", str(tmp_path), "--output",
                     str(tmp_path / "o"), "--set", "vae.nope=1"]) == 2


def test_train_vae_under_deepspeed_launcher_two_ranks(tmp_path):
    """``deepspeed --num_accelerators 2 launch/train_vae.py``: exits 0, rank 0 writes a checkpoint
    the encoder's loader reads, and the ranks' replicas ended equal (the script all-gathers each
    rank's parameter sum, fails on a mismatch and records them in vae_metrics.json)."""
    from mdm_dist.data.vae_checkpoint import load_vae_checkpoint

    assert _script("data_prep/make_demo_data.py").main(
        ["--output", str(tmp_path / "demo"), "--num-samples", "40", "--shard-size", "20", "--image-size", "24"]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "vae"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_accelerators", "2", "--master_port", str(port),
           str(ROOT / "launch/train_vae.py"), "--config", str(ROOT / "configs/vae_tiny.yaml"),
           "--data", str(tmp_path / "demo"), "--output", str(out), "--val-samples", "8"]
    for s in TINY + ["train.max_steps=3"]:
        cmd += ["--set", s]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               TORCH_EXTENSIONS_DIR=str(ROOT / ".cache" / "torch_extensions"),
               MPLCONFIGDIR=str(ROOT / ".cache" / "matplotlib"))
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    metrics = json.loads((out / "vae_metrics.json").read_text())
    assert metrics["world_size"] == 2
    sums = metrics["replica_param_sums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    assert metrics["train_samples"] == 32 and metrics["metrics"]["num_samples"] == 8
    assert 0 < metrics["metrics"]["psnr"] < 60 and 0 <= metrics["metrics"]["token_acc"] <= 1
    vae, cfg, ckpt = load_vae_checkpoint(out / "vae.pt")
    assert ckpt["step"] == 3 and cfg.vae.image_size == 16
    assert abs(sum(float(p.detach().double().sum()) for p in vae.parameters()) - sums[0]) < 1e-6 * max(1.0, abs(sums[0]))
    assert (out / "vae_reconstructions.png").is_file() and (out / "tokenizer" / "tokenizer.model").is_file()
