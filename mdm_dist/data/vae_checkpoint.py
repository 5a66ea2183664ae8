"""The VAE-stage checkpoint: what ``launch/train_vae.py`` saves and ``data_prep/encode_laion.py``
loads.

One ``torch.save`` file holding a plain dict::

    format      "mdm_dist.vae/1"
    state_dict  UnifiedVAE.state_dict() (float32)
    config      the resolved Config as a dict (Config.to_dict(): every section, after overrides)
    tokenizer   path of the tokenizer directory the VAE was trained with (absolute)
    step        optimizer steps taken
    metrics     the final evaluation metrics (psnr, token_acc, ...)

The MDM config that later uses the checkpoint must have the same ``vae`` section; the encoder
stores image latents with exactly these weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mdm_dist.config import config_from_dict
from mdm_dist.models.vae import UnifiedVAE

FORMAT = "mdm_dist.vae/1"


def save_vae_checkpoint(path: str | Path, vae: UnifiedVAE, cfg, tokenizer: str | Path, step: int,
                        metrics: dict[str, float] | None = None) -> Path:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({
        "format": FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in vae.state_dict().items()},
        "config": cfg.to_dict(),
        "tokenizer": str(Path(tokenizer).resolve()),
        "step": int(step),
        "metrics": dict(metrics or {}),
    }, tmp)
    tmp.replace(path)  # a crash mid-save never leaves a half-written checkpoint under the name
    return path


def load_vae_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[UnifiedVAE, Any, dict]:
    """-> (UnifiedVAE in eval mode on ``device``, its Config, the raw checkpoint dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VAE checkpoint {path} does not exist; train one with launch/train_vae.py")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} checkpoint (written by launch/train_vae.py)")
    cfg = config_from_dict(ckpt["config"], where=str(path))
    vae = UnifiedVAE(cfg.vae)
    vae.load_state_dict(ckpt["state_dict"])
    return vae.to(device).eval(), cfg, ckpt
