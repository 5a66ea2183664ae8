"""At which noise level does a demo model decide an image's colour and shape?

    .venv/bin/python benchmarks/noise_level_probe.py --run outputs/demo [--t0 0.2 0.4 0.55 0.7 0.85 1]

For each start time t0: the held-out images' latents are noised to t0 and denoised with their
captions by the demo's own text-to-image sampler from there (``sample(..., t_start=t0)``, SDEdit;
DDIM by default), decoded, and scored by the pixel classifier (mdm_dist/eval/classifier.py).
t0 = 1 is plain text-to-image. Where the prompted shape survives from a start time but not from
a noisier one, the model decides shape between the two: what the caption must carry there is what
the model has not learnt. Prints one JSON line per t0, writes ``noise_level_probe.json`` and a
PNG plot (accuracy against alpha_bar(t0)) next to the run.

Then, at the same start times, whether the model's prediction uses the
caption's shape and colour words at all (``mdm_dist.eval.conditioning.caption_word_reliance``):
the error of its clean-latent estimate with each caption's shape (colour) word replaced by the
next shape (colour), over the error with the true caption; 1.00 = the word is ignored. Written
to the same JSON (``word_reliance``) and plotted in ``noise_level_probe_words.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a launch/demo.py output folder")
    ap.add_argument("--t0", type=float, nargs="+", default=[0.2, 0.4, 0.55, 0.7, 0.85, 1.0])
    ap.add_argument("--num", type=int, default=100, help="held-out samples")
    ap.add_argument("--steps", type=int, default=25, help="sampler steps from t0 = 1 (fewer from lower t0, at least 4)")
    ap.add_argument("--sampler", choices=("dpm2", "ddim", "euler"), default="ddim")
    ap.add_argument("--guidance", type=float, default=None, help="default: the config's guidance_scale")
    ap.add_argument("--weights", choices=("raw", "ema"), default="raw")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from mdm_dist.data.raw import to_tensor_range
    from mdm_dist.data.shapes import COLOURS, SHAPES
    from mdm_dist.data.tokenizer import CaptionTokenizer
    from mdm_dist.data.vae_checkpoint import load_vae_checkpoint
    from mdm_dist.diffusion import sample
    from mdm_dist.diffusion.schedules import from_config
    from mdm_dist.eval.captions import swap_attribute
    from mdm_dist.eval.classifier import classify_batch
    from mdm_dist.eval.conditioning import caption_word_reliance
    from mdm_dist.eval.heldout import heldout_images, heldout_records, load_mdm
    from mdm_dist.viz import line_plot

    bad = [t for t in args.t0 if not 0.0 < t <= 1.0]
    if bad:
        ap.error(f"--t0 values must lie in (0, 1], got {bad}")
    run = args.run
    model, cfg = load_mdm(run / "run" / "export", args.weights)
    vae, _, _ = load_vae_checkpoint(str(run / "vae" / "vae.pt"))
    tok = CaptionTokenizer(str(run / "tokenizer"))
    recs = heldout_records(run / "corpus", args.num)
    x = to_tensor_range(heldout_images(run / "corpus", recs, cfg.vae.image_size))
    w = cfg.diffusion.guidance_scale if args.guidance is None else args.guidance
    vp = from_config(cfg.diffusion).vp
    # each caption, and the same with its shape (colour) word replaced by the next shape (colour)
    colours = list(COLOURS)
    variants = {"true": [r["caption"] for r in recs],
                "shape_swapped": [swap_attribute(r["caption"], "shape", SHAPES[(SHAPES.index(r["shape"]) + 1) % len(SHAPES)])
                                  for r in recs],
                "colour_swapped": [swap_attribute(r["caption"], "colour", colours[(colours.index(r["colour"]) + 1) % len(colours)])
                                   for r in recs]}
    variants = {k: torch.from_numpy(np.stack([tok.encode_fixed(c, cfg.vae.max_text_len) for c in v])).long()
                for k, v in variants.items()}
    ids = variants["true"]
    rows = []
    with torch.no_grad():
        z0, _ = vae.encode_image(x)
        for t0 in tqdm(args.t0, desc="start times", unit="t0"):
            steps = max(4, round(args.steps * t0))
            z = sample(model, "t2i", ids=ids, img_latents=z0, t_start=t0, steps=steps, sampler=args.sampler,
                       guidance_scale=w, generator=torch.Generator().manual_seed(args.seed))["img_latents"]
            preds = classify_batch(vae.decode_image(z.float()).clamp(-1, 1))
            row = dict(t0=t0, alpha_bar=float(vp.alpha_bar(t0)), steps=steps,
                       shape=float(np.mean([p.shape == r["shape"] for p, r in zip(preds, recs)])),
                       colour=float(np.mean([p.colour == r["colour"] for p, r in zip(preds, recs)])))
            rows.append(row)
            tqdm.write(json.dumps(row))
        # does the prediction use the caption's shape / colour word?
        words = caption_word_reliance(model, cfg, z0, variants, tuple(args.t0), seed=args.seed)
        for row in words:
            tqdm.write(json.dumps({k: round(v, 4) for k, v in row.items()}))
    report = dict(run=str(run), guidance=w, sampler=args.sampler, num=len(recs), rows=rows, word_reliance=words)
    (run / "noise_level_probe.json").write_text(json.dumps(report, indent=1) + "\n")
    line_plot({"shape": ([r["alpha_bar"] for r in rows], [r["shape"] for r in rows]),
               "colour": ([r["alpha_bar"] for r in rows], [r["colour"] for r in rows])},
              run / "noise_level_probe.png", xlabel="alpha_bar(t0) of the start (0 = pure noise)",
              ylabel="held-out images with the prompted attribute",
              title="denoised from noised real latents with the caption")
    line_plot({f"{k} word swapped": ([r["alpha_bar"] for r in words], [r[f"{k}_swapped_ratio"] for r in words])
               for k in ("shape", "colour")},
              run / "noise_level_probe_words.png", xlabel="alpha_bar of the noised latents (0 = pure noise)",
              ylabel="x0 error, swapped / true caption",
              title="does the prediction use the caption's words? (1 = ignored)")
    print(f"wrote {run / 'noise_level_probe.json'}, {run / 'noise_level_probe.png'} and {run / 'noise_level_probe_words.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
