"""Single-process CPU demo of the whole model: VAE stage, MDM diffusion training, both samplers.

    python launch/overfit_demo.py --config configs/tiny.yaml --output outputs/demo

What it runs, all real, all on a small corpus drawn on the spot (mdm_dist/data/shapes.py):
1. draws ``--samples`` captioned images of coloured shapes and builds a word-level vocabulary of
   their captions (the SentencePiece tokenizer and the MDS pipeline are the data issue's work);
2. trains the UnifiedVAE (L2 + CE + beta KL) and writes a reconstruction grid;
3. freezes the image encoder, stores the image latent moments, and trains the tiny MDM with the
   paper's objective (``mdm_loss``: every term logged), writing a loss curve of every term;
4. samples text-to-image for the training captions and image-to-text captions for the training
   images with the configured sampler, and writes the grid, the captions and a JSON report.

This is a staging demo for the model code: the distributed trainer (``launch/pretrain.py``) and
the end-to-end demo on the MDS corpus replace it as the README's first command when they land.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdm_dist.config import ConfigError, load_config  # noqa: E402
from mdm_dist.data.shapes import render, random_spec  # noqa: E402
from mdm_dist.diffusion import mdm_loss, sample  # noqa: E402
from mdm_dist.models.mdm import build_model  # noqa: E402
from mdm_dist.viz import image_grid, loss_curves  # noqa: E402

SPECIALS = ["<pad>", "<mask>", "<unk>"]


class WordVocab:
    """Whitespace word vocabulary with the VAE's special ids (pad 0, mask 1, unk 2)."""

    def __init__(self, captions: list[str], size: int):
        words = sorted({w for c in captions for w in c.replace(",", " ,").split()})
        if len(words) + len(SPECIALS) > size:
            raise ValueError(f"the captions need {len(words) + len(SPECIALS)} ids; vae.vocab_size is {size}")
        self.itos = SPECIALS + words
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def encode(self, caption: str, length: int) -> list[int]:
        ids = [self.stoi.get(w, 2) for w in caption.replace(",", " ,").split()][:length]
        return ids + [0] * (length - len(ids))

    def decode(self, ids) -> str:
        words = [self.itos[i] for i in ids if i >= len(SPECIALS) and i < len(self.itos)]
        return " ".join(words).replace(" ,", ",")


def make_corpus(n: int, image_size: int, seed: int):
    rng = np.random.default_rng(seed)
    specs = [random_spec(rng) for _ in range(n)]
    captions = [s.caption(i) for i, s in enumerate(specs)]
    images = np.stack([render(s, image_size, jitter=rng) for s in specs])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return specs, captions, x


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--output", default="outputs/demo")
    ap.add_argument("--samples", type=int, default=32, help="corpus size")
    ap.add_argument("--vae-steps", type=int, default=400)
    ap.add_argument("--steps", type=int, default=400, help="MDM training steps")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    timings, report = {}, {"config": args.config}

    t0 = time.time()
    specs, captions, images = make_corpus(args.samples, cfg.vae.image_size, args.seed)
    vocab = WordVocab(captions, cfg.vae.vocab_size)
    ids = torch.tensor([vocab.encode(c, cfg.vae.max_text_len) for c in captions])
    timings["corpus_s"] = time.time() - t0

    # ---- 1. VAE stage ------------------------------------------------------------------------
    t0 = time.time()
    model = build_model(cfg)
    vae = model.vae
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    history: dict[str, list[float]] = {}
    bar = tqdm(range(args.vae_steps), desc="VAE", unit="step")
    for _ in bar:
        idx = torch.randint(0, args.samples, (args.batch,), generator=gen)
        terms = vae.loss(images=images[idx], ids=ids[idx], generator=gen)
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        opt.step()
        bar.set_postfix(rec_img=f"{terms['rec_img'].item():.4f}", acc=f"{terms['token_acc'].item():.2f}")
    with torch.no_grad():
        final = vae.loss(images=images, ids=ids, generator=gen)
        mu, logvar = vae.encode_image(images)
        recon = vae.decode_image(mu).clamp(-1, 1)
    report["vae"] = {k: float(final[k]) for k in ("rec_img", "rec_txt", "psnr", "token_acc")}
    image_grid(torch.cat([images[:8], recon[:8]]), out / "vae_reconstructions.png", ncol=8,
               title="top: real, bottom: VAE reconstruction")
    timings["vae_s"] = time.time() - t0

    # ---- 2. MDM diffusion training -----------------------------------------------------------
    t0 = time.time()
    vae.freeze_image_encoder()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=0.0, betas=tuple(cfg.train.betas))
    category = torch.zeros(args.samples, dtype=torch.long)
    bar = tqdm(range(args.steps), desc="MDM", unit="step")
    for _ in bar:
        idx = torch.randint(0, args.samples, (args.batch,), generator=gen)
        batch = {"ids": ids[idx], "img_mu": mu[idx], "img_logvar": logvar[idx], "category": category[idx]}
        terms = mdm_loss(model, batch, cfg, generator=gen)
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        opt.step()
        for k, v in terms.items():
            history.setdefault(k, []).append(float(v))
        bar.set_postfix(loss=f"{terms['total'].item():.3f}")
    loss_curves(history, out / "loss_curves.png")
    report["mdm_loss_first_last"] = {k: [v[0], float(np.mean(v[-20:]))] for k, v in history.items()}
    timings["mdm_s"] = time.time() - t0

    # ---- 3. Sampling: text -> image and image -> text ----------------------------------------
    t0 = time.time()
    n = min(16, args.samples)
    t2i = sample(model, "t2i", ids=ids[:n], category=category[:n], generator=gen)
    i2t = sample(model, "i2t", img_latents=mu[:n], category=category[:n], generator=gen)
    image_grid(t2i["images"], out / "text_to_image.png", ncol=4, labels=[c[:28] for c in captions[:n]])
    generated = [vocab.decode(row.tolist()) for row in i2t["ids"]]
    pairs = [{"true": captions[i], "generated": generated[i]} for i in range(n)]
    (out / "captions.json").write_text(json.dumps(pairs, indent=2))
    hit = sum(s.colour in g and s.shape in g for s, g in zip(specs[:n], generated))
    report["caption_names_colour_and_shape"] = hit / n
    timings["sample_s"] = time.time() - t0
    report["timings"] = timings
    (out / "demo_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"wrote {out}/: vae_reconstructions.png, loss_curves.png, text_to_image.png, captions.json, demo_report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
