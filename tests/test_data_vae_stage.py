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
    # the latent standardization was measured on the training images and saved: the corpus's
    # latents (32 of its 40 images trained) come out near mean 0 / std 1 in every dimension
    assert m["image_latent_scale"] == [round(float(v), 5) for v in vae.image_latent_scale]
    assert not torch.allclose(vae.image_latent_scale, torch.ones(8))
    from mdm_dist.data.raw import expand_inputs, to_tensor_range

    imgs, _, _ = _script("launch/train_vae.py").load_corpus(expand_inputs([str(tmp_path / "demo")]), 16, quiet=True)
    with torch.no_grad():
        z = vae.encode_image(to_tensor_range(imgs))[0].reshape(-1, 8)
    assert z.mean(0).abs().max() < 0.3, z.mean(0)
    assert ((z.std(0) - 1).abs() < 0.3).all(), z.std(0)
    rc = _script("data_prep/encode_laion.py").main(
        ["--input", str(tmp_path / "demo"), "--output", str(tmp_path / "mds"), "--vae", str(out / "vae.pt"),
         "--tokenizer", ckpt["tokenizer"]])
    assert rc == 0
    assert json.loads((tmp_path / "mds" / "encode_report.json").read_text())["written"] == 40
    # the reconstruction ceiling of benchmarks/vae_ceiling.py: classifier on the real held-out
    # images as mdm_dist.eval.heldout scores them, and fractions in range
    ceiling = tmp_path / "ceiling.json"
    assert _script("benchmarks/vae_ceiling.py").main(["--vae", str(out / "vae.pt"), "--corpus", str(tmp_path / "demo"),
                                                       "--num", "12", "--batch", "5", "--json", str(ceiling)]) == 0
    c = json.loads(ceiling.read_text())
    assert c["num"] == 12 and 0 <= c["shape"] <= 1 and 0 <= c["colour"] <= 1 and 0 < c["psnr"] < 60
    assert c["classifier_on_reconstructions"] <= min(c["colour"], c["shape"])


def test_train_vae_bad_arguments_exit_2(tmp_path):
    mod = _script("launch/train_vae.py")
    assert mod.main(["--data", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2
    assert mod.main(["--config", str(ROOT / "configs/vae_tiny.yaml"), "--data", str(tmp_path), "--output",
                     str(tmp_path / "o"), "--set", "vae.nope=1"]) == 2


def test_train_vae_under_deepspeed_launcher_two_ranks(tmp_path):
    """``deepspeed --num_accelerators 2 launch/train_vae.py``: exits 0, rank 0 writes a checkpoint
    the encoder's loader reads, and the ranks' replicas ended equal (the script all-gathers each
    rank's parameter sum, fails on a mismatch and records them in vae_metrics.json). With a time
    budget far too small for its 30 steps, both ranks stop together at the budget's first check
    (step 10). It trains with Muon (``train.optimizer=muon``): every rank orthogonalizes the same
    all-reduced gradients, so the replicas stay equal."""
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
    for s in TINY + ["train.max_steps=30", "train.time_budget_s=0.001", "train.optimizer=muon"]:
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
    assert ckpt["step"] == 10 and cfg.vae.image_size == 16
    assert (metrics["steps"], metrics["configured_steps"], metrics["time_budget_s"]) == (10, 30, 0.001)
    assert "time budget of 0 s spent at step 10" in proc.stdout + proc.stderr
    assert abs(sum(float(p.detach().double().sum()) for p in vae.parameters()) - sums[0]) < 1e-6 * max(1.0, abs(sums[0]))
    assert (out / "vae_reconstructions.png").is_file() and (out / "tokenizer" / "tokenizer.model").is_file()


def test_vae_checkpoint_carries_the_latent_standardization(tmp_path):
    """The standardization buffers survive save/load and reach the MDM's VAE in pretraining;
    checkpoints and exports written before they existed load with the identity and a warning."""
    import pytest

    from mdm_dist.config import load_config
    from mdm_dist.data.vae_checkpoint import (
        load_vae_checkpoint, save_vae_checkpoint, tolerate_missing_latent_stats,
    )
    from mdm_dist.models.mdm import build_model
    from mdm_dist.models.vae import UnifiedVAE
    from mdm_dist.train.engine import load_pretrained_vae

    cfg = load_config(ROOT / "configs/tiny.yaml")
    torch.manual_seed(0)
    vae = UnifiedVAE(cfg.vae)
    shift, scale = vae.set_image_latent_stats(torch.randn(8, 16, cfg.vae.d_z) * 2.5 + 0.7)
    path = save_vae_checkpoint(tmp_path / "vae.pt", vae, cfg, tmp_path, step=1)
    loaded, _, _ = load_vae_checkpoint(path)
    assert torch.equal(loaded.image_latent_shift, shift) and torch.equal(loaded.image_latent_scale, scale)
    mdm = build_model(cfg)
    load_pretrained_vae(mdm, str(path), cfg)
    assert torch.equal(mdm.vae.image_latent_shift, shift) and torch.equal(mdm.vae.image_latent_scale, scale)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(mdm.vae.encode_image(x)[0], loaded.encode_image(x)[0])

    old = torch.load(path, weights_only=True)
    del old["state_dict"]["image_latent_shift"], old["state_dict"]["image_latent_scale"]
    torch.save(old, tmp_path / "old.pt")
    with pytest.warns(UserWarning, match="standardization"):
        legacy, _, _ = load_vae_checkpoint(tmp_path / "old.pt")
    assert torch.equal(legacy.image_latent_scale, torch.ones(cfg.vae.d_z))
    torch.testing.assert_close(legacy.encode_image(x)[0], legacy.encode_image_raw(x)[0])
    old["state_dict"]["stray.weight"] = torch.zeros(1)  # anything else that does not fit is an error
    torch.save(old, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="stray.weight"), pytest.warns(UserWarning):
        load_vae_checkpoint(tmp_path / "bad.pt")
    with pytest.warns(UserWarning, match="identity"):
        rest = tolerate_missing_latent_stats(["vae.image_latent_shift", "backbone.sep", "vae.image_latent_scale"], "x")
    assert rest == ["backbone.sep"]
