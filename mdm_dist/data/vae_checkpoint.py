"""The VAE-stage checkpoint: what ``launch/train_vae.py`` saves and ``data_prep/encode_laion.py``
loads.

One ``torch.save`` file holding a plain dict::

    format      "mdm_dist.vae/1"
    state_dict  UnifiedVAE.state_dict() (float32)
    config      the resolved Config as a dict (Config.to_dict(): every section, after overrides)
    tokenizer   path of the tokenizer directory the VAE was trained with (absolute)
    step        optimizer steps taken (the state_dict includes the image latent standardization
                buffers ``image_latent_shift``/``image_latent_scale``; a checkpoint without them
                loads with the identity, and a warning)
    metrics     the final evaluation metrics (psnr, token_acc, ...)

The MDM config that later uses the checkpoint must have the same ``vae`` section; the encoder
stores image latents with exactly these weights.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from mdm_dist.config import config_from_dict
from mdm_dist.models.vae import UnifiedVAE

FORMAT = "mdm_dist.vae/1"
LATENT_STAT_BUFFERS = ("image_latent_shift", "image_latent_scale")


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
    missing, unexpected = vae.load_state_dict(ckpt["state_dict"], strict=False)
    missing = tolerate_missing_latent_stats(missing, str(path))  # older checkpoints: the identity
    if missing or unexpected:
        raise ValueError(f"{path}: its state_dict does not fit its own vae config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}; retrain the VAE stage (launch/train_vae.py)")
    return vae.to(device).eval(), cfg, ckpt


def tolerate_missing_latent_stats(missing: list[str], source: str) -> list[str]:
    """``missing`` (keys of a ``load_state_dict(strict=False)``) without the image latent
    standardization buffers, with a warning when some were missing: weights saved before the
    buffers existed load with the identity (their latents were never standardized)."""
    stats = [k for k in missing if k.rsplit(".", 1)[-1] in LATENT_STAT_BUFFERS]
    if stats:
        warnings.warn(f"{source} has no {', '.join(stats)} (saved before the image latent standardization): "
                      f"the identity is used, as these weights were trained")
    return [k for k in missing if k not in stats]
