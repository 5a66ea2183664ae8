"""Samples during training: a text-to-image PNG grid from the current batch's captions and a table
of image-to-text captions (JSON + markdown) under ``<run_dir>/samples/``.

Every rank runs the sampler (under ZeRO-3 every forward gathers parameters collectively; under
sequence parallelism the ranks of a group hold slices of the same sequences), rank 0 writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from mdm_dist.diffusion import sample
from mdm_dist.viz import image_grid


class Decoder:
    """Token ids -> text: the SentencePiece tokenizer if ``data.tokenizer`` names one, else the ids."""

    def __init__(self, tokenizer_dir: str, pad_id: int, mask_id: int):
        self.tok = None
        self.pad_id, self.mask_id = pad_id, mask_id
        if tokenizer_dir:
            from mdm_dist.data.tokenizer import CaptionTokenizer

            self.tok = CaptionTokenizer(tokenizer_dir)

    def __call__(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.tok is not None:
            return self.tok.decode(ids)
        return " ".join(str(i) for i in ids if i not in (self.pad_id, self.mask_id))


def write_captions(rows: list[dict], stem: Path) -> None:
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    lines = ["| # | " + " | ".join(rows[0]) + " |", "|---|" + "---|" * len(rows[0])] if rows else []
    for i, r in enumerate(rows):
        lines.append(f"| {i} | " + " | ".join(str(v).replace("|", "\\|") for v in r.values()) + " |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


@torch.no_grad()
def training_samples(mdm, batch: dict, cfg, step: int, out_dir: Path, device, decode: Decoder,
                     n: int = 8, steps: int | None = None) -> list[Path]:
    n = min(n, batch["ids"].shape[0])
    ids = batch["ids"][:n].to(device)
    g = torch.Generator(device=device).manual_seed(cfg.train.seed + step)
    t2i = sample(mdm, "t2i", ids=ids, category=batch["category"][:n].to(device), steps=steps, generator=g)
    i2t = sample(mdm, "i2t", img_latents=batch["img_mu"][:n].to(device), category=batch["category"][:n].to(device),
                 steps=steps, generator=g)
    if dist.get_rank() != 0:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = image_grid(t2i["images"].cpu(), out_dir / f"step_{step:08d}_t2i.png", ncol=min(n, 4),
                     labels=[decode(r)[:40] for r in ids.cpu()], title=f"text-to-image, step {step}")
    rows = [{"key": batch["key"][i], "caption": batch["caption"][i], "generated": decode(i2t["ids"][i].cpu())}
            for i in range(n)]
    stem = out_dir / f"step_{step:08d}_captions"
    write_captions(rows, stem)
    return [png, stem.with_suffix(".json"), stem.with_suffix(".md")]
