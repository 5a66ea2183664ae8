"""Data pipeline throughput: encode (images/s) against its decode-and-resize floor, and the MDS
loader (samples/s) against what the trainer consumes per step.

    python benchmarks/data_throughput.py [--input SHARDS...] [--vae vae.pt --tokenizer DIR]
        [--num-samples 512] [--workers 1 2] [--config configs/tiny.yaml] [--output FILE.json]

Without ``--input`` it draws a demo corpus (data_prep/make_demo_data.py) into a scratch folder;
without ``--vae`` it uses a randomly initialized UnifiedVAE of ``--config``'s vae section (the
encoder's cost does not depend on its weights) and a tokenizer trained on the captions.

Measured, on the same inputs:
1. ``decode_resize``: read + decode + resize/centre-crop alone (the floor: the encoder cannot
   beat it on CPU, it does this and more);
2. ``encode_workers_W``: the full ``data_prep/encode_laion.py`` run (decode, filter, tokenize,
   VAE-encode in batches, MDS write, merge) with W worker processes;
3. ``loader``: one epoch of the MDS output through StreamingDataset + StreamingDataLoader +
   MDMCollator at the config's micro batch size (0 loader workers);
4. ``trainer``: the samples/s one training step of ``--config``'s MDM consumes (forward +
   backward of ``mdm_loss`` + AdamW on stored latents), so the loader's margin is visible.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mdm_dist.config import load_config  # noqa: E402
from mdm_dist.data.raw import Skip, decode_image, expand_inputs, iter_samples  # noqa: E402


def _script(rel: str):
    spec = importlib.util.spec_from_file_location(Path(rel).stem, ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bench_decode(paths: list[str], image_size: int) -> dict:
    t0, n = time.perf_counter(), 0
    for p in paths:
        for s in iter_samples(p):
            if s.image is None:
                continue
            with contextlib.suppress(Skip):
                decode_image(s.image, image_size)
                n += 1
    dt = time.perf_counter() - t0
    return {"images": n, "seconds": round(dt, 3), "images_per_s": round(n / dt, 1)}


def bench_encode(paths, out: Path, vae: str, tok: str, workers: int) -> dict:
    """The encoder as users run it: its own process (worker pools need an importable main)."""
    import subprocess

    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "data_prep/encode_laion.py"), "--input", *paths, "--output",
                           str(out), "--vae", vae, "--tokenizer", tok, "--workers", str(workers)],
                          capture_output=True, text=True)
    dt = time.perf_counter() - t0
    rc = proc.returncode
    if rc:
        raise RuntimeError(f"encode_laion.py failed ({rc}):\n{proc.stderr[-3000:]}")
    report = json.loads((out / "encode_report.json").read_text())
    return {"rc": rc, "images": report["seen"], "seconds": round(dt, 3),
            "images_per_s": round(report["seen"] / dt, 1), "workers": workers,
            "images_per_s_excluding_startup": report["images_per_s_now"]}


def bench_loader(mds: Path, cfg, batch_size: int) -> tuple[dict, list[dict]]:
    from mdm_dist.data.loader import MDMCollator, build_dataset, build_loader

    ds = build_dataset([str(mds)], batch_size=batch_size, shuffle=True, seed=0)
    loader = build_loader(ds, batch_size, MDMCollator(cfg.vae.max_text_len, cfg.vae.pad_id))
    t0, n, keep = time.perf_counter(), 0, []
    for b in loader:
        n += len(b["key"])
        if len(keep) < 4:
            keep.append(b)
    dt = time.perf_counter() - t0
    return {"samples": n, "seconds": round(dt, 3), "samples_per_s": round(n / dt, 1), "batch_size": batch_size}, keep


def bench_trainer(cfg, batches: list[dict], steps: int) -> dict:
    from mdm_dist.diffusion import mdm_loss
    from mdm_dist.models.mdm import build_model

    model = build_model(cfg)
    model.vae.freeze_image_encoder()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + 1):
        b = batches[i % len(batches)]
        batch = {k: b[k] for k in ("ids", "img_mu", "img_logvar", "category")}
        batch["category"] = batch["category"].clamp(max=cfg.model.num_categories - 1)
        t0 = time.perf_counter()
        loss = mdm_loss(model, batch, cfg, generator=gen)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:  # the first step warms up allocators
            times.append(time.perf_counter() - t0)
    step = sum(times) / len(times)
    bs = len(batches[0]["key"])
    return {"step_s": round(step, 4), "batch_size": bs, "samples_per_s": round(bs / step, 1), "steps": steps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--input", nargs="+", default=None, help="shards (default: a fresh demo corpus)")
    ap.add_argument("--num-samples", type=int, default=512, help="demo corpus size without --input")
    ap.add_argument("--vae", default=None, help="vae.pt (default: random weights of --config's vae)")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--config", default="configs/tiny.yaml", help="MDM config: vae section and trainer step")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--trainer-steps", type=int, default=3)
    ap.add_argument("--output", default="benchmarks/results/data_throughput.json")
    ap.add_argument("--scratch", default=None, help="scratch folder (default: a temp dir under .cache)")
    args = ap.parse_args(argv)
    from mdm_dist.data.loader import prepare_streaming_env
    from mdm_dist.data.tokenizer import train_tokenizer
    from mdm_dist.data.vae_checkpoint import save_vae_checkpoint
    from mdm_dist.models.vae import UnifiedVAE

    prepare_streaming_env()
    cfg = load_config(ROOT / args.config if not Path(args.config).exists() else args.config)
    (ROOT / ".cache").mkdir(exist_ok=True)
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="data_bench_", dir=ROOT / ".cache"))
    scratch.mkdir(parents=True, exist_ok=True)
    if args.input:
        paths = expand_inputs(args.input)
    else:
        with contextlib.redirect_stderr(io.StringIO()):
            _script("data_prep/make_demo_data.py").main(
                ["--output", str(scratch / "demo"), "--num-samples", str(args.num_samples), "--shard-size",
                 str(max(1, args.num_samples // 4)), "--image-size", "64"])
        paths = expand_inputs([str(scratch / "demo")])
    tok = args.tokenizer
    if tok is None:
        caps = [s.caption for p in paths for s in iter_samples(p) if s.caption]
        tok = str(train_tokenizer(caps, scratch / "tok", cfg.vae.vocab_size, cfg.vae.pad_id, cfg.vae.mask_id))
    vae = args.vae
    if vae is None:
        vae = str(save_vae_checkpoint(scratch / "vae.pt", UnifiedVAE(cfg.vae), cfg, tok, 0))
    image_size = cfg.vae.image_size

    results = {"host": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "platform": platform.platform(), "cuda": torch.cuda.is_available()},
               "config": args.config, "inputs": len(paths), "image_size": image_size}
    results["decode_resize"] = bench_decode(paths, image_size)
    print("decode_resize", results["decode_resize"], flush=True)
    mds = None
    for w in args.workers:
        out = scratch / f"mds_w{w}"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        results[f"encode_workers_{w}"] = bench_encode(paths, out, vae, tok, w)
        print(f"encode_workers_{w}", results[f"encode_workers_{w}"], flush=True)
        mds = out
    results["loader"], batches = bench_loader(mds, cfg, cfg.train.micro_batch_size)
    print("loader", results["loader"], flush=True)
    if args.trainer_steps > 0:
        results["trainer"] = bench_trainer(cfg, batches, args.trainer_steps)
        results["loader_margin"] = round(results["loader"]["samples_per_s"] / results["trainer"]["samples_per_s"], 1)
        print("trainer", results["trainer"], flush=True)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
