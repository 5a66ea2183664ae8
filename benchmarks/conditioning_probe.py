"""How fast does a config learn to use its conditions? A single-process training loop that
prints the condition reliance (mdm_dist/eval/conditioning.py) as it goes and, with a demo corpus,
the held-out text-to-image and captioning figures at the end.

    python benchmarks/conditioning_probe.py --data outputs/demo/mds --vae outputs/demo/vae/vae.pt \\
        [--corpus outputs/demo/corpus --tokenizer outputs/demo/tokenizer] [--config configs/tiny.yaml] \\
        [--steps 800] [--batch 16] [--lr 1e-3] [--min-lr 3e-4 --warmup 50] [--weight-decay 0.03]
        [--every 200] [--eval-every N] [--plot PNG] [--per-sample-noise] [--decay-groups] [--dtype bfloat16]
        [--set diffusion.task_probs={...} ...]

It is the loop behind the probe figures of benchmarks/demo_results.md: AdamW at a constant lr
unless ``--min-lr`` gives the trainer's warm-up + cosine schedule (no ZeRO, no sequence
parallelism: the question is what the objective and the model learn per sample, not how the
distributed trainer runs), gradient clipping at train.grad_clip (``--set train.optimizer=muon``
takes the trainer's Muon + AdamW, clipped before Muon as there: mdm_dist/train/optim.py),
the UnifiedVAE from ``--vae`` with its image path frozen as in pretraining. ``--per-sample-noise``
and ``--decay-groups`` take the trainer's two other choices: every sample's draws from its own
generator seeded by (train.seed, step, key) (mdm_dist/train/noise.py), and no weight decay on
1-D parameters (mdm_dist/train/optim.py: param_groups). ``--dtype bfloat16`` runs the loss under
torch.autocast(bfloat16) with fp32 weights, as the trainer does under ``train.dtype: bfloat16``
(DeepSpeed's torch_autocast); the reports and the held-out sampling stay in fp32. Each report line:
step, seconds, and for i2t and t2i the loss with the true conditions and the ratio shuffled /
true on a fixed batch of 128 samples (1.00 = the condition is ignored).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


CURVE_LINES = {"text_to_image": "text-to-image", "text_to_image_shape": "text-to-image: shape",
               "text_to_image_colour": "text-to-image: colour", "captioning": "captioning"}


def plot_heldout_curve(curve: list[tuple[int, dict]], path: str | Path, title: str) -> Path:
    """PNG of the held-out figures (``CURVE_LINES``) against the training step; ``curve`` holds
    (step, figures) pairs, figures as in the ``heldout`` report lines."""
    from mdm_dist.viz import line_plot

    steps_at = [s for s, _ in curve]
    return line_plot({label: (steps_at, [q[k] for _, q in curve]) for k, label in CURVE_LINES.items()}, path,
                     xlabel="training step", ylabel="held-out fraction right", title=title)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--data", required=True, nargs="+", help="MDS stream folder(s)")
    ap.add_argument("--vae", required=True, help="vae.pt of launch/train_vae.py")
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--every", type=int, default=200, help="report every N steps")
    ap.add_argument("--eval-every", type=int, default=0, metavar="N",
                    help="with --corpus: also score the held-out figures every N steps (default: at the end only)")
    ap.add_argument("--plot", default=None, metavar="PNG",
                    help="with --corpus: plot the held-out figures against the step (the first --guidance scale)")
    ap.add_argument("--corpus", default=None, help="demo corpus: also score held-out t2i / i2t at the end")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (with --corpus)")
    ap.add_argument("--num-eval", type=int, default=64)
    ap.add_argument("--guidance", type=float, nargs="+", default=[None], metavar="W",
                    help="classifier-free guidance scale(s) of the held-out sampling (default: the config's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--min-lr", type=float, default=None,
                    help="cosine decay from --lr to this at --steps (default: constant lr)")
    ap.add_argument("--warmup", type=int, default=0, help="linear warm-up steps (with --min-lr)")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    ap.add_argument("--per-sample-noise", action="store_true",
                    help="the trainer's per-sample draws (mdm_dist/train/noise.py) instead of one generator")
    ap.add_argument("--decay-groups", action="store_true",
                    help="the trainer's AdamW groups: no weight decay on 1-D parameters (default: decay on all)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="compute dtype of the training loss (bfloat16: autocast, fp32 weights)")
    args = ap.parse_args(argv)
    if args.corpus and not args.tokenizer:
        ap.error("--corpus needs --tokenizer")
    if args.eval_every < 0:
        ap.error(f"--eval-every must be >= 0, got {args.eval_every}")
    if args.eval_every and not args.corpus:
        ap.error("--eval-every needs --corpus (and --tokenizer): the held-out figures come from the demo corpus")
    if args.plot and not args.corpus:
        ap.error("--plot needs --corpus (and --tokenizer): it plots the held-out figures")

    # every import and every input of the held-out scoring up front: a bad path fails now, not
    # after the training loop
    from mdm_dist.config import ConfigError, load_config
    from mdm_dist.data.loader import MDMCollator, build_dataset, build_loader
    from mdm_dist.data.tokenizer import CaptionTokenizer
    from mdm_dist.data.vae_checkpoint import load_vae_checkpoint
    from mdm_dist.diffusion import mdm_loss
    from mdm_dist.eval.conditioning import condition_reliance, probe_batch
    from mdm_dist.eval.heldout import evaluate, heldout_images, heldout_records
    from mdm_dist.models.mdm import build_model
    from mdm_dist.train.engine import LossModule, load_pretrained_vae
    from mdm_dist.train.noise import SampleNoise
    from mdm_dist.train.optim import build_optimizer, param_groups, set_lr
    from mdm_dist.train.schedule import lr_at

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    try:
        cfg = load_config(args.config, args.set)
        model = build_model(cfg)
        load_pretrained_vae(model, args.vae, cfg)
        if args.corpus:
            tok = CaptionTokenizer(args.tokenizer)
            vae, _, _ = load_vae_checkpoint(args.vae)
            records = heldout_records(Path(args.corpus), args.num_eval)
            images = heldout_images(Path(args.corpus), records, cfg.vae.image_size)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"conditioning_probe: error: {e}", file=sys.stderr)
        return 2
    model.vae.freeze_for_pretraining()
    params = [p for p in model.parameters() if p.requires_grad]
    loss_module = LossModule(model, cfg)
    if cfg.train.optimizer == "muon":  # the trainer's groups and optimizer (mdm_dist/train/optim.py)
        opt = build_optimizer(model, dataclasses.replace(cfg.train, lr=args.lr, weight_decay=args.weight_decay))
    else:
        groups = param_groups(model, args.weight_decay) if args.decay_groups else params
        opt = torch.optim.AdamW(groups, lr=args.lr, betas=tuple(cfg.train.betas), weight_decay=args.weight_decay)
    fixed_batch = probe_batch(args.data, cfg, 128, seed=args.seed + 99)  # also prepares streaming
    coll = MDMCollator(cfg.vae.max_text_len, cfg.vae.pad_id)
    ds = build_dataset(args.data, batch_size=args.batch, shuffle=True, seed=args.seed + 1)

    curve: list[tuple[int, dict]] = []  # (step, figures at the first guidance scale)

    def heldout(at_step: int) -> None:
        """The held-out text-to-image and captioning figures of the model as it is now, per guidance
        scale; the model's training flag is restored."""
        keys = ("guidance_scale", "caption_guidance_scale",  # the scales as sampled
                "text_to_image", "text_to_image_colour", "text_to_image_shape", "captioning", "captioning_colour",
                "captioning_shape", "classifier_on_vae_reconstructions")
        was_training = model.training
        model.eval()
        for i, w in enumerate(args.guidance):
            q, _ = evaluate(model, vae, tok, records, images, None, w, None, args.seed)
            print(json.dumps({"step": at_step, "heldout": {k: q[k] for k in keys}}), flush=True)
            if i == 0:
                curve.append((at_step, q))
        model.train(was_training)

    g = torch.Generator().manual_seed(args.seed)
    step, t0 = 0, time.time()
    while step < args.steps:
        for batch in build_loader(ds, args.batch, coll):
            if args.min_lr is not None:  # the trainer's schedule (mdm_dist/train/schedule.py)
                set_lr(opt, lr_at(step, args.lr, args.min_lr, args.warmup, args.steps))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
                if args.per_sample_noise:  # the trainer's loss call (mdm_dist/train/engine.py: train_step)
                    noise = SampleNoise(batch["key"], cfg.train.seed, step)
                    loss = loss_module(batch, noise.fixed(cfg, model.vae.num_image_tokens, "cpu"), noise)["total"]
                else:
                    loss = mdm_loss(model, batch, cfg, generator=g)["total"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)  # before Muon too, as the trainer
            opt.step()
            step += 1
            if step % args.every == 0 or step == args.steps:
                r = condition_reliance(model, cfg, fixed_batch)
                print(json.dumps({"step": step, "seconds": round(time.time() - t0, 1),
                                  **{f"{k}_loss": round(v["true"], 4) for k, v in r.items()},
                                  **{f"{k}_ratio": round(v["ratio"], 3) for k, v in r.items()}}), flush=True)
            if args.eval_every and step % args.eval_every == 0:
                heldout(step)
            if step >= args.steps:
                break
    if args.corpus and (not args.eval_every or args.steps % args.eval_every):
        heldout(step)
    if args.plot:
        plot_heldout_curve(curve, args.plot, f"held-out figures, {len(records)} prompts / images")
        print(f"conditioning_probe: wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
