"""At which noise level does a demo model decide an image's colour and shape?

    .venv/bin/python benchmarks/noise_level_probe.py --run outputs/demo [--t0 0.2 0.4 0.55 0.7 0.85 1]

For each start time t0: the held-out images' latents are noised to t0 (z = sqrt(abar) z0 +
sigma eps), then denoised to t_eps with their captions (DDIM, classifier-free guidance as the
demo's text-to-image), decoded, and scored by the pixel classifier (mdm_dist/eval/classifier.py).
t0 = 1 is plain text-to-image. Where the prompted shape survives from a start time but not from
a noisier one, the model decides shape between the two: what the caption must carry there is what
the model has not learnt. Prints one JSON line per t0, writes ``noise_level_probe.json`` and a
PNG plot (accuracy against alpha_bar(t0)) next to the run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mdm_dist.diffusion.samplers import ddim_step, guide  # noqa: E402
from mdm_dist.diffusion.schedules import VPSchedule  # noqa: E402


def denoise_from(eps_fn: Callable, z0: torch.Tensor, t0: float, steps: int, t_eps: float, vp: VPSchedule,
                 generator: torch.Generator) -> torch.Tensor:
    """Noise ``z0`` to ``t0`` and run ``steps`` DDIM steps down to ``t_eps``; ``eps_fn(z, t)`` is the
    (guided) eps prediction. Returns the final latents."""
    eps = torch.randn(z0.shape, generator=generator, dtype=z0.dtype)
    z = float(vp.alpha_bar(t0)) ** 0.5 * z0 + float(vp.sigma(t0)) * eps
    ts = torch.linspace(t0, t_eps, steps + 1, dtype=torch.float64).tolist()
    for t, s in zip(ts[:-1], ts[1:]):
        z = ddim_step(z, eps_fn(z, t), t, s, vp)
    return z


def caption_eps_fn(model, ids: torch.Tensor, guidance: float, generator: torch.Generator) -> Callable:
    """The text-to-image eps of ``sample(model, "t2i")``: caption at t_txt = 0 against all-MASK text
    at t_txt = 1 with the null category, guided, v-predictions turned into eps."""
    cfg = model.cfg
    d, v = cfg.diffusion, cfg.vae
    vp = model_vp(model)
    b = ids.shape[0]
    z_txt = model.vae.sample(*model.vae.encode_text(ids), generator)
    u_txt = model.vae.sample(*model.vae.encode_text(torch.full_like(ids, v.mask_id)), generator)
    cat = torch.zeros(b, dtype=torch.long)
    null = torch.full_like(cat, cfg.model.num_categories)
    ones = torch.ones(b)

    def eps_fn(z: torch.Tensor, t: float) -> torch.Tensor:
        zz = torch.cat([z, z])
        _, out = model.backbone(torch.cat([z_txt, u_txt]), zz, torch.cat([0 * ones, ones]),
                                torch.cat([t * ones, t * ones]), torch.cat([cat, null]))
        out = out.to(z.dtype)
        if d.image_prediction == "v":
            out = float(vp.alpha_bar(t)) ** 0.5 * out + float(vp.sigma(t)) * zz
        return guide(out[:b], out[b:], guidance)

    return eps_fn


def model_vp(model) -> VPSchedule:
    from mdm_dist.diffusion.schedules import from_config

    return from_config(model.cfg.diffusion).vp


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a launch/demo.py output folder")
    ap.add_argument("--t0", type=float, nargs="+", default=[0.2, 0.4, 0.55, 0.7, 0.85, 1.0])
    ap.add_argument("--num", type=int, default=100, help="held-out samples")
    ap.add_argument("--steps", type=int, default=25, help="DDIM steps from t0 = 1 (fewer from lower t0, at least 4)")
    ap.add_argument("--guidance", type=float, default=None, help="default: the config's guidance_scale")
    ap.add_argument("--weights", choices=("raw", "ema"), default="raw")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from mdm_dist.data.raw import to_tensor_range
    from mdm_dist.data.tokenizer import CaptionTokenizer
    from mdm_dist.data.vae_checkpoint import load_vae_checkpoint
    from mdm_dist.eval.classifier import classify_batch
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
    vp = model_vp(model)
    ids = torch.from_numpy(np.stack([tok.encode_fixed(r["caption"], cfg.vae.max_text_len) for r in recs])).long()
    rows = []
    with torch.no_grad():
        z0, _ = vae.encode_image(x)
        eps_fn = caption_eps_fn(model, ids, w, torch.Generator().manual_seed(args.seed))
        for t0 in tqdm(args.t0, desc="start times", unit="t0"):
            steps = max(4, round(args.steps * t0))
            z = denoise_from(eps_fn, z0.float(), t0, steps, cfg.diffusion.t_eps, vp,
                             torch.Generator().manual_seed(args.seed + 1))
            preds = classify_batch(vae.decode_image(z).clamp(-1, 1))
            row = dict(t0=t0, alpha_bar=float(vp.alpha_bar(t0)), steps=steps,
                       shape=float(np.mean([p.shape == r["shape"] for p, r in zip(preds, recs)])),
                       colour=float(np.mean([p.colour == r["colour"] for p, r in zip(preds, recs)])))
            rows.append(row)
            tqdm.write(json.dumps(row))
    report = dict(run=str(run), guidance=w, num=len(recs), rows=rows)
    (run / "noise_level_probe.json").write_text(json.dumps(report, indent=1) + "\n")
    line_plot({"shape": ([r["alpha_bar"] for r in rows], [r["shape"] for r in rows]),
               "colour": ([r["alpha_bar"] for r in rows], [r["colour"] for r in rows])},
              run / "noise_level_probe.png", xlabel="alpha_bar(t0) of the start (0 = pure noise)",
              ylabel="held-out images with the prompted attribute",
              title="denoised from noised real latents with the caption")
    print(f"wrote {run / 'noise_level_probe.json'} and {run / 'noise_level_probe.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
