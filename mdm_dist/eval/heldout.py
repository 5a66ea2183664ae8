"""Sample a pretrained MDM on the demo corpus's held-out set and score it against the ground truth.

    python -m mdm_dist.eval.heldout --export RUN/export --vae VAE_DIR/vae.pt \
        --tokenizer TOKENIZER_DIR --corpus CORPUS_DIR --out OUT [--num 96] [--steps N] [--guidance W]
        [--caption-guidance W] [--best-of N] [--data MDS_DIR ...]

Held-out set: ``CORPUS/eval.jsonl`` (data_prep/make_demo_data.py: captions and ground truth of
scenes whose keys are never in the training shards). Its images are re-drawn from their random
streams exactly as the corpus draws them (checked against the stored ground truth) and
preprocessed like the training images (PNG -> ``decode_image`` at ``vae.image_size``).

* **text-to-image**: each held-out caption is a prompt; the generated image latents are decoded by
  the VAE-stage decoder (``--vae``: the checkpoint that encoded the MDS shards, whose latent space
  the MDM generates in; pretraining with ``train.vae_checkpoint`` keeps the MDM's copy of the
  image path frozen and equal to it), and :func:`mdm_dist.eval.classifier.classify` decides
  whether the image shows the prompted colour and shape. With ``--best-of N`` each prompt gets N
  candidates and the one the model's own captioner finds the prompt most likely under is scored
  (``mdm_dist.diffusion.sample_best_of``); ``text_to_image_plain`` is then the figure over all N
  candidates, plain sampling's.
* **captioning**: each held-out image is encoded by the VAE-stage encoder (as the MDS shards
  were), the MDM generates a caption conditioned on the latent means, and
  :func:`mdm_dist.eval.captions.caption_names` decides whether it names the true colour and shape.
* sanity figures: the classifier on the real held-out images and on their VAE reconstructions.

Writes ``OUT/text_to_image.png`` (generated images, prompt and verdict over each),
``OUT/image_to_text.png`` (held-out images with their generated captions),
``OUT/captions.json`` / ``.md`` (generated beside true captions) and ``OUT/quality.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mdm_dist.eval.captions import caption_names, named_attributes
from mdm_dist.eval.classifier import classify_batch

EVAL_SPLIT = 1  # data_prep/make_demo_data.py draws held-out sample i from default_rng([seed, 1, i])


def heldout_records(corpus: Path, num: int) -> list[dict]:
    path = Path(corpus) / "eval.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: draw the corpus with data_prep/make_demo_data.py")
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    if not recs:
        raise ValueError(f"{path} holds no held-out samples (make_demo_data.py --num-eval 0?)")
    return recs[:num]


def heldout_images(corpus: Path, records: list[dict], image_size: int) -> np.ndarray:
    """The held-out images (n, S, S, 3) uint8 as the model's pipeline sees them: drawn from each
    sample's own random stream like make_demo_data.py, at the corpus's resolution, PNG-encoded and
    decoded by the training pipeline's ``decode_image``."""
    from PIL import Image

    from mdm_dist.data.raw import decode_image
    from mdm_dist.data.shapes import SCENE_TEMPLATES, random_scene, render_scene

    manifest = json.loads((Path(corpus) / "manifest.json").read_text())
    out = []
    for rec in records:
        index = int(rec["key"].removeprefix("eval"))
        rng = np.random.default_rng([manifest["seed"], EVAL_SPLIT, index])
        spec = random_scene(rng)
        rng.integers(len(SCENE_TEMPLATES))  # the caption template draw, as make_demo_data.draw does
        truth = {k: rec[k] for k in spec.to_dict()}
        if spec.to_dict() != truth:
            raise RuntimeError(f"held-out sample {rec['key']}: re-drawn scene {spec.to_dict()} differs from "
                               f"eval.jsonl's {truth}; data_prep/make_demo_data.py's draw() changed")
        buf = io.BytesIO()
        Image.fromarray(render_scene(spec, manifest["image_size"], jitter=rng)).save(buf, format="PNG")
        out.append(decode_image(buf.getvalue(), image_size)[0])
    return np.stack(out)


def load_mdm(export_dir: Path, weights: str = "raw"):
    """(MDM in eval mode, Config) from an export folder of launch/pretrain.py."""
    from safetensors.torch import load_file

    from mdm_dist.config import load_config
    from mdm_dist.data.vae_checkpoint import tolerate_missing_latent_stats
    from mdm_dist.models.mdm import build_model

    export_dir = Path(export_dir)
    f = export_dir / ("model_ema.safetensors" if weights == "ema" else "model.safetensors")
    if not f.is_file():
        raise FileNotFoundError(f"{f} does not exist: run launch/pretrain.py to the end (it exports there)")
    cfg = load_config(export_dir / "config.yaml")
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(load_file(str(f)), strict=False)
    missing = tolerate_missing_latent_stats(missing, str(f))
    if missing or unexpected:
        raise ValueError(f"{f} does not fit {export_dir / 'config.yaml'}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval(), cfg


def _rate(flags: list[bool]) -> float:
    return float(np.mean(flags)) if flags else 0.0


@torch.no_grad()
def evaluate(model, vae, tok, records: list[dict], images: np.ndarray, steps: int | None, guidance: float | None,
             sampler: str | None, seed: int = 0, caption_guidance: float | None = None,
             text_temperature: float | None = None, best_of: int = 1) -> tuple[dict, dict]:
    """(quality figures, per-sample outputs) of t2i and i2t on the held-out set.

    ``guidance``: the CFG scale of both modes (None: the config's, per mode);
    ``caption_guidance``: the i2t scale when it differs (None: ``guidance``);
    ``text_temperature``: captioning's sampling temperature (None: the config's);
    ``best_of``: text-to-image keeps the best of this many candidates per prompt by the model's
    own caption likelihood (``mdm_dist.diffusion.sample_best_of``; 1: plain sampling)."""
    from mdm_dist.data.raw import to_tensor_range
    from mdm_dist.diffusion import sample, sample_best_of
    from mdm_dist.diffusion.samplers import default_guidance

    cfg = model.cfg
    L = cfg.vae.max_text_len
    if caption_guidance is None:
        caption_guidance = guidance
    w_t2i = default_guidance(cfg.diffusion, "t2i") if guidance is None else float(guidance)
    w_i2t = default_guidance(cfg.diffusion, "i2t") if caption_guidance is None else float(caption_guidance)
    temp = cfg.diffusion.text_temperature if text_temperature is None else float(text_temperature)
    kw = dict(steps=steps, sampler=sampler)
    colours = [r["colour"] for r in records]
    shapes = [r["shape"] for r in records]
    x = to_tensor_range(images)
    times = {}

    t0 = time.time()
    ids = torch.from_numpy(np.stack([tok.encode_fixed(r["caption"], L) for r in records])).long()
    if best_of > 1:
        t2i = sample_best_of(model, ids, best_of, guidance_scale=w_t2i, generator=torch.Generator().manual_seed(seed),
                             **kw)
    else:
        t2i = sample(model, "t2i", ids=ids, guidance_scale=w_t2i, generator=torch.Generator().manual_seed(seed), **kw)
    gen_images = vae.decode_image(t2i["img_latents"].float()).clamp(-1, 1)
    times["t2i_s"] = time.time() - t0
    preds = classify_batch(gen_images)
    if best_of > 1:  # every candidate is a plain sample: their mean is plain sampling's figure
        cands = t2i["candidate_latents"]
        cand_preds = classify_batch(vae.decode_image(cands.flatten(0, 1).float()).clamp(-1, 1))
        cand_records = [r for r in records for _ in range(best_of)]
        plain_ok = [p.matches(r["colour"], r["shape"]) for p, r in zip(cand_preds, cand_records)]
    else:
        plain_ok = None

    t0 = time.time()
    mu, _ = vae.encode_image(x)
    i2t = sample(model, "i2t", img_latents=mu, guidance_scale=w_i2t, generator=torch.Generator().manual_seed(seed + 1),
                 text_temperature=temp, **kw)
    captions = [tok.decode([int(i) for i in row]) for row in i2t["ids"]]
    times["i2t_s"] = time.time() - t0

    real = classify_batch(x)
    recon = vae.decode_image(mu).clamp(-1, 1)
    recon_preds = classify_batch(recon)

    t2i_ok = [p.matches(c, s) for p, c, s in zip(preds, colours, shapes)]
    i2t_ok = [caption_names(g, c, s) for g, c, s in zip(captions, colours, shapes)]
    quality = {
        "num_prompts": len(records),
        "text_to_image": _rate(t2i_ok),
        "text_to_image_colour": _rate([p.colour == c for p, c in zip(preds, colours)]),
        "text_to_image_shape": _rate([p.shape == s for p, s in zip(preds, shapes)]),
        # best of n: the same figure over every candidate, i.e. plain sampling's (n x the prompts)
        "text_to_image_plain": _rate(plain_ok) if plain_ok is not None else None,
        "captioning": _rate(i2t_ok),
        # the true colour is among the colours the caption names (words, so "green," counts)
        "captioning_colour": _rate([c in named_attributes(g)[0] for g, c in zip(captions, colours)]),
        "captioning_shape": _rate([s in named_attributes(g)[1] for g, s in zip(captions, shapes)]),
        "captioning_exact": _rate([g.strip() == r["caption"].strip() for g, r in zip(captions, records)]),
        "classifier_on_real": _rate([p.matches(c, s) for p, c, s in zip(real, colours, shapes)]),
        "classifier_on_vae_reconstructions": _rate([p.matches(c, s) for p, c, s in zip(recon_preds, colours, shapes)]),
        "spec_seen_in_train": _rate([bool(r.get("spec_in_train")) for r in records]),
        "sampler": sampler or cfg.diffusion.sampler,
        "sample_steps": steps or cfg.diffusion.sample_steps,
        "guidance_scale": w_t2i,
        "best_of": int(best_of),
        "caption_guidance_scale": w_i2t,
        "text_temperature": temp,
        "timings": times,
    }
    outputs = {"gen_images": gen_images, "real_images": x, "preds": preds, "captions": captions,
               "t2i_ok": t2i_ok, "i2t_ok": i2t_ok}
    return quality, outputs


def _printable(text: str) -> str:
    """A label matplotlib's default font can draw (a young model emits byte-fallback pieces)."""
    return "".join(c if c.isprintable() and ord(c) < 0x250 else "?" for c in text)


def write_outputs(out: Path, records: list[dict], quality: dict, o: dict, max_grid: int = 32) -> None:
    from mdm_dist.train.samples import write_captions
    from mdm_dist.viz import image_grid

    out.mkdir(parents=True, exist_ok=True)
    n = min(max_grid, len(records))
    labels = [f"{'OK' if o['t2i_ok'][i] else 'NO'} {records[i]['caption'][:34]}\n"
              f"seen: {o['preds'][i].colour} {o['preds'][i].shape}" for i in range(n)]
    image_grid(o["gen_images"][:n], out / "text_to_image.png", ncol=8, labels=labels,
               title=f"text-to-image on held-out prompts: {quality['text_to_image']:.0%} show the prompted colour and shape")
    labels = [f"{'OK' if o['i2t_ok'][i] else 'NO'} {_printable(o['captions'][i])[:38]}" for i in range(n)]
    image_grid(o["real_images"][:n], out / "image_to_text.png", ncol=8, labels=labels,
               title=f"captioning of held-out images: {quality['captioning']:.0%} name the true colour and shape")
    rows = [{"key": r["key"], "true": r["caption"], "generated": g, "names_colour_and_shape": ok}
            for r, g, ok in zip(records, o["captions"], o["i2t_ok"])]
    write_captions(rows, out / "captions")
    (out / "quality.json").write_text(json.dumps(quality, indent=2) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--export", required=True, help="export folder of launch/pretrain.py (RUN_DIR/export)")
    ap.add_argument("--vae", required=True, help="vae.pt of launch/train_vae.py (decodes images, encodes held-out images)")
    ap.add_argument("--tokenizer", required=True, help="tokenizer directory")
    ap.add_argument("--corpus", required=True, help="the demo corpus directory (eval.jsonl, manifest.json)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--num", type=int, default=96, help="held-out samples to score (default 96)")
    ap.add_argument("--weights", choices=("raw", "ema"), default="raw")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default diffusion.sample_steps)")
    ap.add_argument("--guidance", type=float, default=None,
                    help="CFG scale of both modes (default: diffusion.guidance_scale, and for captioning "
                         "diffusion.caption_guidance_scale when set)")
    ap.add_argument("--caption-guidance", type=float, default=None, help="CFG scale of captioning only")
    ap.add_argument("--text-temperature", type=float, default=None,
                    help="captioning's sampling temperature (default diffusion.text_temperature; 0 = greedy)")
    ap.add_argument("--sampler", choices=("dpm2", "ddim", "euler"), default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--best-of", type=int, default=1, metavar="N",
                    help="text-to-image keeps the best of N candidates per prompt, ranked by the model's own "
                         "caption likelihood (mdm_dist.diffusion.sample_best_of; default 1: plain sampling)")
    ap.add_argument("--data", nargs="+", default=None,
                    help="MDS stream(s): also measure condition reliance (mdm_dist/eval/conditioning.py) on 128 samples")
    args = ap.parse_args(argv)
    if args.best_of < 1:
        ap.error(f"--best-of must be >= 1 (1 = plain sampling), got {args.best_of}")

    from mdm_dist.data.tokenizer import CaptionTokenizer
    from mdm_dist.data.vae_checkpoint import load_vae_checkpoint

    try:
        model, cfg = load_mdm(Path(args.export), args.weights)
        vae, _, _ = load_vae_checkpoint(args.vae)
        tok = CaptionTokenizer(args.tokenizer)
        records = heldout_records(Path(args.corpus), args.num)
    except (FileNotFoundError, ValueError) as e:
        print(f"heldout: error: {e}", file=sys.stderr)
        return 2
    images = heldout_images(Path(args.corpus), records, cfg.vae.image_size)
    quality, outputs = evaluate(model, vae, tok, records, images, args.steps, args.guidance, args.sampler, args.seed,
                                caption_guidance=args.caption_guidance, text_temperature=args.text_temperature,
                                best_of=args.best_of)
    quality["weights"] = args.weights
    if args.data:
        from mdm_dist.eval.conditioning import condition_reliance, probe_batch

        quality["condition_reliance"] = condition_reliance(model, cfg, probe_batch(args.data, cfg))
    write_outputs(Path(args.out), records, quality, outputs)
    print(json.dumps({k: v for k, v in quality.items() if k != "timings"}, indent=1))
    print(f"wrote text_to_image.png, image_to_text.png, captions.json/.md, quality.json to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
