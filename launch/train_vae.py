"""Train the UnifiedVAE stage (L2 + CE + beta KL) on image-caption shards.

    python launch/train_vae.py --config configs/vae_tiny.yaml --data data/demo --output outputs/vae \
        [--tokenizer data/tokenizer] [--set train.max_steps=400 ...]

Multi-process (data parallel, gloo/nccl through torch.distributed) under any launcher that sets
RANK / WORLD_SIZE / LOCAL_RANK, e.g. ``deepspeed --num_accelerators 2 launch/train_vae.py ...``
or ``torchrun --nproc_per_node 2 launch/train_vae.py ...``: the VAE is small, so it is replicated
(DistributedDataParallel), not ZeRO-sharded.

What it does:
1. reads every sample of ``--data`` (webdataset tars, parquet, image folders: mdm_dist/data/raw.py),
   decodes and centre-crops to ``vae.image_size``; bad samples are skipped and counted. The VAE
   stage holds its corpus in memory (a few thousand small images; this is the stage before the
   MDS pipeline, whose inputs it needs);
2. tokenizes captions with ``--tokenizer``, or, without it, trains a SentencePiece tokenizer on
   the captions into OUTPUT/tokenizer (vocabulary <= vae.vocab_size);
3. holds out ``--val-samples`` samples, trains ``train.max_steps`` steps with linear warmup and
   cosine decay (``train.lr`` -> ``train.min_lr``), batch ``train.global_batch_size``
   (``micro_batch_size`` per step per rank, gradients accumulated); with ``train.time_budget_s``
   fewer, if they do not fit in that many seconds (mdm_dist/train/budget.py). ``train.optimizer``:
   ``adamw``, or ``muon`` (Muon at ``train.muon_lr`` on the hidden conv filters and trunk matrices,
   AdamW at ``train.lr`` on the rest: ``mdm_dist.train.optim.build_vae_optimizer``); the gradient is
   clipped at ``train.grad_clip`` first;
4. measures the per-dimension mean and std of the training images' latents and stores them in the
   VAE (``UnifiedVAE.set_image_latent_stats``): ``encode_image`` then gives the diffusion
   backbone unit-variance latents, ``decode_image`` undoes it;
5. writes OUTPUT/vae.pt (mdm_dist/data/vae_checkpoint.py: state_dict, resolved config, tokenizer
   path), OUTPUT/config.yaml, OUTPUT/vae_reconstructions.png (held-out originals over their
   reconstructions from the posterior mean) and OUTPUT/vae_metrics.json (held-out PSNR in dB,
   token accuracy, losses, timings; under several ranks each rank's parameter sum, checked equal).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdm_dist.config import ConfigError, dump_config, load_config  # noqa: E402
from mdm_dist.data.raw import (  # noqa: E402
    InputError, Skip, clean_caption, decode_image, expand_inputs, iter_samples, to_tensor_range,
)
from mdm_dist.data.tokenizer import CaptionTokenizer, train_tokenizer  # noqa: E402
from mdm_dist.data.vae_checkpoint import save_vae_checkpoint  # noqa: E402
from mdm_dist.models.vae import UnifiedVAE  # noqa: E402
from mdm_dist.train.budget import StepBudget  # noqa: E402
from mdm_dist.train.optim import build_vae_optimizer, set_lr  # noqa: E402
from mdm_dist.train.schedule import lr_at  # noqa: E402


def load_corpus(paths: list[str], image_size: int, quiet: bool = False) -> tuple[np.ndarray, list[str], dict[str, int]]:
    """All decodable samples: uint8 images (n, S, S, 3), captions, and skip counts by reason."""
    images, captions, skipped = [], [], {}
    for path in paths:
        for s in tqdm(iter_samples(path), desc=f"read {Path(path).name}", unit="img", leave=False, disable=quiet):
            try:
                if s.reason:
                    raise Skip(s.reason, s.detail)
                caption = clean_caption(s.caption)
                img, _ = decode_image(s.image, image_size)
            except Skip as e:
                skipped[e.reason] = skipped.get(e.reason, 0) + 1
                print(f"skip {e.reason}: {s.source} key {s.key}: {e.detail}", file=sys.stderr)
                continue
            images.append(img)
            captions.append(caption)
    if not images:
        raise InputError(f"no usable samples in {', '.join(paths)}")
    return np.stack(images), captions, skipped


@torch.no_grad()
def measure_latent_stats(vae: UnifiedVAE, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Set ``vae``'s image latent standardization from the raw posterior means of ``images``
    (the training split); returns (shift, scale), each (d_z,)."""
    was_training = vae.training
    vae.eval()
    mus = [vae.encode_image_raw(images[i:i + batch])[0].float() for i in range(0, len(images), batch)]
    vae.train(was_training)
    return vae.set_image_latent_stats(torch.cat(mus))


@torch.no_grad()
def evaluate(vae: UnifiedVAE, images: torch.Tensor, ids: torch.Tensor, batch: int = 256) -> dict[str, float]:
    """Held-out reconstruction from the posterior mean: PSNR (dB, pixels in [-1, 1], peak-to-peak
    2, over the whole set's MSE), token accuracy (all positions, PAD included, as trained) and
    caption accuracy (positions before the first PAD only), losses with sampled latents."""
    vae.eval()
    se, acc, acc_txt, n_txt = 0.0, 0.0, 0.0, 0
    for i in range(0, len(images), batch):
        x, t = images[i:i + batch], ids[i:i + batch]
        mu, _ = vae.encode_image(x)
        se += float((vae.decode_image(mu) - x).square().mean(dim=(1, 2, 3)).sum())
        tmu, _ = vae.encode_text(t)
        pred = vae.decode_text(tmu).argmax(-1)
        acc += float((pred == t).float().mean(dim=1).sum())
        real = t != vae.cfg.pad_id
        acc_txt += float(((pred == t) & real).sum())
        n_txt += int(real.sum())
    n = len(images)
    mse = se / n
    loss = vae.loss(images=images[:batch], ids=ids[:batch], generator=torch.Generator().manual_seed(0))
    vae.train()
    return {
        "psnr": 10 * math.log10(4.0 / max(mse, 1e-12)), "mse": mse, "token_acc": acc / n,
        "caption_token_acc": acc_txt / max(1, n_txt), "rec_img": float(loss["rec_img"]),
        "rec_txt": float(loss["rec_txt"]), "kl": float(loss["kl"]), "num_samples": n,
    }


def init_distributed() -> tuple[int, int]:
    """(rank, world size); starts a process group when a launcher set WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--config", default="configs/vae_tiny.yaml")
    ap.add_argument("--data", nargs="+", required=True, metavar="PATH", help="tars, folders, parquet or globs")
    ap.add_argument("--output", required=True)
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir; default: train one into OUTPUT/tokenizer")
    ap.add_argument("--val-samples", type=int, default=256, help="held-out samples for the metrics (default 256)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        paths = expand_inputs(args.data)
    except (ConfigError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rank, world = init_distributed()
    v, t = cfg.vae, cfg.train
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(t.seed)
    timings: dict[str, float] = {}

    t0 = time.time()
    images, captions, skipped = load_corpus(paths, v.image_size, quiet=rank != 0)
    if args.tokenizer:
        tok_dir = Path(args.tokenizer)
    else:
        tok_dir = out / "tokenizer"
        if rank == 0:
            train_tokenizer(captions, tok_dir, vocab_size=v.vocab_size, pad_id=v.pad_id, mask_id=v.mask_id,
                            unk_id=({0, 1, 2} - {v.pad_id, v.mask_id}).pop())
        if world > 1:
            torch.distributed.barrier()
    tok = CaptionTokenizer(tok_dir)
    cfg.data.tokenizer = str(tok_dir.resolve())  # the saved config names the tokenizer it was trained with
    try:
        tok.check_vae(v)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ids = torch.from_numpy(np.stack([tok.encode_fixed(c, v.max_text_len) for c in captions]))
    x = to_tensor_range(images)
    n_val = min(args.val_samples, len(x) // 5)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(t.seed))
    val, train = perm[:n_val], perm[n_val:]
    timings["load_s"] = time.time() - t0

    vae = UnifiedVAE(v)
    model = vae
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(vae)
    opt = build_vae_optimizer(vae, t)
    accum = max(1, t.global_batch_size // (t.micro_batch_size * world))
    gen = torch.Generator().manual_seed(t.seed * 1000 + rank)  # each rank draws its own batches
    budget = StepBudget(t.time_budget_s, t.max_steps, warmup_steps=t.warmup_steps)
    t0 = time.time()
    bar = tqdm(total=t.max_steps, desc="VAE", unit="step", disable=rank != 0)
    history = []
    step = 0
    budget.start(time.perf_counter())
    while step < budget.max_steps:
        t_step = time.perf_counter()
        set_lr(opt, lr_at(step, t.lr, t.min_lr, t.warmup_steps, budget.max_steps, budget.anchor))
        opt.zero_grad(set_to_none=True)
        for _ in range(accum):
            idx = train[torch.randint(0, len(train), (t.micro_batch_size,), generator=gen)]
            if world > 1:  # DDP syncs gradients only of a call through the wrapper
                terms = _ddp_loss(model, x[idx], ids[idx], gen)
            else:
                terms = vae.loss(images=x[idx], ids=ids[idx], generator=gen)
            (terms["total"] / accum).backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(vae.parameters(), t.grad_clip)
        opt.step()
        if step % max(1, t.log_every) == 0 or step == budget.max_steps - 1:
            history.append({"step": step, **{k: float(terms[k].detach()) for k in ("total", "rec_img", "rec_txt", "kl", "psnr", "token_acc")}})
            bar.set_postfix(psnr=f"{terms['psnr'].item():.1f}", acc=f"{terms['token_acc'].item():.2f}")
        step += 1
        bar.update(1)
        now = time.perf_counter()
        decided = budget.after_step(step, now - t_step, now)
        if decided:
            bar.total = budget.max_steps
            bar.refresh()
            if rank == 0:
                tqdm.write(decided)
        if budget.spent(step, now):
            if rank == 0:
                tqdm.write(f"time budget of {t.time_budget_s:.0f} s spent at step {step} of {budget.max_steps}: "
                           "stopping here")
            break
    bar.close()
    timings["train_s"] = time.time() - t0
    replica_sums = None
    if world > 1:  # DDP keeps replicas equal; check it cheaply before rank 0 saves its copy
        check = torch.stack([sum(p.detach().double().sum() for p in vae.parameters())])
        sums = [torch.zeros_like(check) for _ in range(world)]
        torch.distributed.all_gather(sums, check)
        if not all(torch.equal(s, sums[0]) for s in sums):
            raise RuntimeError(f"VAE replicas diverged across ranks: parameter sums {[float(s) for s in sums]}")
        replica_sums = [float(s) for s in sums]
    timings["steps_per_s"] = step / max(timings["train_s"], 1e-9)

    if rank == 0:
        from mdm_dist.viz import image_grid

        t0 = time.time()
        shift, scale = measure_latent_stats(vae, x[train])
        timings["latent_stats_s"] = time.time() - t0
        metrics = evaluate(vae, x[val], ids[val])
        metrics["image_latent_shift"] = [round(float(v), 5) for v in shift]
        metrics["image_latent_scale"] = [round(float(v), 5) for v in scale]
        with torch.no_grad():
            show = x[val[:8]]
            recon = vae.decode_image(vae.encode_image(show)[0]).clamp(-1, 1)
        image_grid(torch.cat([show, recon]), out / "vae_reconstructions.png", ncol=8,
                   title=f"held-out: real (top), reconstruction (bottom); PSNR {metrics['psnr']:.1f} dB")
        ckpt = save_vae_checkpoint(out / "vae.pt", vae, cfg, tok_dir, step, metrics)
        dump_config(cfg, out / "config.yaml")
        report = {"metrics": metrics, "train_samples": len(train), "val_samples": n_val, "skipped": skipped,
                  "world_size": world, "replica_param_sums": replica_sums, "tokenizer": str(tok_dir.resolve()),
                  "tokenizer_vocab": tok.vocab_size, "timings": timings, "history": history,
                  "steps": step, "configured_steps": t.max_steps, "time_budget_s": t.time_budget_s,
                  "budget_plans": budget.plans}
        (out / "vae_metrics.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps({"metrics": metrics, "timings": timings}, indent=2))
        print(f"wrote {ckpt}, {out}/vae_reconstructions.png, {out}/vae_metrics.json")
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


def _ddp_loss(ddp_model, images, ids, gen):
    """UnifiedVAE.loss through DDP: DDP only syncs gradients of a forward() call, so the VAE's
    ``forward`` is pointed at ``loss`` for the call (the VAE defines no forward of its own)."""
    vae = ddp_model.module
    vae.forward = vae.loss
    try:
        return ddp_model(images=images, ids=ids, generator=gen)
    finally:
        del vae.forward


if __name__ == "__main__":
    sys.exit(main())
