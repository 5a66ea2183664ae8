"""Does the model use its condition? The training loss with the true condition vs a shuffled one.

    python -m mdm_dist.eval.conditioning --export RUN/export --data data/mds [--num 128]

For ``i2t`` the text loss is computed twice on the same batch, noise and times: once with each
sample's own image as the condition, once with the images rolled by one sample (every caption
paired with another sample's image); for ``t2i`` the same with the captions rolled. The ratio
shuffled / true is 1.00 for a model that ignores its condition and grows as it learns to use it
(the demo's diagnosis in benchmarks/demo_results.md used this). Times are fixed at
``--times`` (default 0.3 and 0.7) and the figure is the mean over them. No image token is
masked (``model.image_mask_prob``): the model is measured as the samplers use it.

Prints one JSON object: ``{"i2t": {"true": ..., "shuffled": ..., "ratio": ...}, "t2i": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


@torch.no_grad()
def condition_reliance(model, cfg, batch: dict, times: tuple[float, ...] = (0.3, 0.7), seed: int = 0) -> dict:
    """{task: {"true", "shuffled", "ratio"}} for i2t (text loss, images rolled) and t2i (image
    loss, captions rolled), averaged over ``times``; the same random draws in both passes."""
    from mdm_dist.diffusion.objectives import mdm_loss

    b = batch["ids"].shape[0]
    if b < 2:
        raise ValueError("condition_reliance needs a batch of at least 2 samples (it pairs each with another)")
    perm = torch.roll(torch.arange(b), 1)
    was_training = model.training
    model.eval()
    out = {}
    for task, term in (("i2t", "se_txt"), ("t2i", "se_img")):
        res = []
        for shuffled in (False, True):
            bb = dict(batch)
            if shuffled and task == "i2t":
                bb["img_mu"], bb["img_logvar"] = batch["img_mu"][perm], batch["img_logvar"][perm]
            elif shuffled:
                bb["ids"] = batch["ids"][perm]
            total = 0.0
            for t in times:
                fixed = {"task": task, "drop": torch.zeros(b, dtype=torch.bool),
                         "t_txt": torch.full((b,), t), "t_img": torch.full((b,), t),
                         "img_mask": torch.ones(b)}  # no masked image tokens: the model as it samples
                terms = mdm_loss(model, bb, cfg, generator=torch.Generator().manual_seed(seed), fixed=fixed)
                total += float(terms[term])
            res.append(total / len(times))
        out[task] = {"true": res[0], "shuffled": res[1], "ratio": res[1] / res[0] if res[0] > 0 else float("nan")}
    model.train(was_training)
    return out


@torch.no_grad()
def caption_word_reliance(model, cfg, img_latents: torch.Tensor, captions: dict[str, torch.Tensor],
                          times: tuple[float, ...], reps: int = 4, seed: int = 0) -> list[dict]:
    """How much the text-to-image prediction depends on each caption variant, per noise level.

    ``img_latents`` (B, N, d_z): clean image latents; ``captions``: name -> ids (B, L), one entry
    named ``"true"`` (each image's own caption) and others (e.g. the same captions with the shape
    word swapped). At each time t in (0, 1] the latents are noised to t (``reps`` noise draws, the
    same for every variant) and the mean squared error of the model's clean-latent estimate (per
    latent value, no guidance) is measured with each caption variant. Returns one row per time:
    ``{"t", "alpha_bar", "<name>": mse, "<name>_ratio": mse / mse_true}``; a ratio of 1 means the
    model's prediction ignores what that variant changed."""
    from mdm_dist.diffusion.objectives import _vp_noise, image_x0_estimate
    from mdm_dist.diffusion.schedules import from_config

    if "true" not in captions:
        raise ValueError("captions needs a 'true' entry (each image's own caption)")
    bad = [t for t in times if not 0.0 < t <= 1.0]
    if bad:
        raise ValueError(f"times must lie in (0, 1], got {bad}")
    vp = from_config(cfg.diffusion).vp
    b = img_latents.shape[0]
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    z_txt = {k: model.vae.encode_text(v)[0] for k, v in captions.items()}  # the posterior means
    rows = []
    for t0 in times:
        t = torch.full((b,), float(t0))
        err = dict.fromkeys(captions, 0.0)
        for _ in range(reps):
            z_t = _vp_noise(img_latents, torch.randn(img_latents.shape, generator=g, dtype=img_latents.dtype), t, vp)
            for name, zt in z_txt.items():
                _, out = model.backbone(zt, z_t, torch.zeros(b), t, torch.zeros(b, dtype=torch.long))
                x0 = image_x0_estimate(out.float(), z_t.float(), t, vp, cfg.diffusion.image_prediction)
                err[name] += float((x0 - img_latents.float()).square().mean()) / reps
        row = {"t": float(t0), "alpha_bar": float(vp.alpha_bar(torch.tensor(float(t0), dtype=torch.float64)))} | err
        row |= {f"{k}_ratio": err[k] / err["true"] for k in captions if k != "true"}
        rows.append(row)
    model.train(was_training)
    return rows


def probe_batch(paths, cfg, num: int = 128, seed: int = 1234) -> dict:
    """A fixed batch of ``num`` samples drawn from the MDS stream(s) ``paths`` (shuffled with
    ``seed``), collated for ``cfg``; the dataset is released before returning."""
    from mdm_dist.data.loader import MDMCollator, build_dataset, build_loader, prepare_streaming_env

    prepare_streaming_env()
    ds = build_dataset(paths, batch_size=num, shuffle=True, seed=seed)
    batch = next(iter(build_loader(ds, num, MDMCollator(cfg.vae.max_text_len, cfg.vae.pad_id))))
    del ds
    return batch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--export", required=True, help="export folder of launch/pretrain.py (RUN_DIR/export)")
    ap.add_argument("--data", required=True, nargs="+", help="MDS stream folder(s) to draw the batch from")
    ap.add_argument("--num", type=int, default=128, help="samples in the batch (default 128)")
    ap.add_argument("--weights", choices=("raw", "ema"), default="raw")
    ap.add_argument("--times", type=float, nargs="+", default=[0.3, 0.7])
    args = ap.parse_args(argv)

    from mdm_dist.eval.heldout import load_mdm

    try:
        model, cfg = load_mdm(Path(args.export), args.weights)
        batch = probe_batch(args.data, cfg, args.num)
    except (FileNotFoundError, ValueError) as e:
        print(f"conditioning: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(condition_reliance(model, cfg, batch, tuple(args.times)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
