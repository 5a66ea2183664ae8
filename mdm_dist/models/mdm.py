"""MDM: the UnifiedVAE and the Mamba diffusion backbone as one module, and ``build_model``.

``build_model(cfg, device="meta")`` constructs every parameter on the meta device (no memory), so
a 7B config can be inspected or sharded before anything is allocated; ``materialize(model, dev)``
then allocates on ``dev`` and runs every module's ``reset_parameters`` (children before parents,
so a parent's custom init wins over its children's defaults).
"""

from __future__ import annotations

import torch
from torch import nn

from mdm_dist.config import Config
from mdm_dist.models.backbone import MDMBackbone
from mdm_dist.models.mamba2 import keep_fp32_
from mdm_dist.models.vae import UnifiedVAE


class MDM(nn.Module):
    """Holds ``vae`` (UnifiedVAE) and ``backbone`` (MDMBackbone); the losses and samplers live in
    ``mdm_dist.diffusion`` and call ``model.backbone(...)`` and the VAE's encode/decode methods."""

    def __init__(self, cfg: Config, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        self.vae = UnifiedVAE(cfg.vae, device=device, dtype=dtype)
        self.backbone = MDMBackbone(cfg.model, cfg.vae, device=device, dtype=dtype)

    def forward(self, txt, img, t_txt, t_img, category, img_sc=None):
        return self.backbone(txt, img, t_txt, t_img, category, img_sc=img_sc)

    def reset_parameters(self) -> None:
        init_weights(self)


def init_weights(module: nn.Module) -> None:
    """Call ``reset_parameters`` on every submodule, children before parents."""
    for child in module.children():
        init_weights(child)
    if hasattr(module, "reset_parameters") and not isinstance(module, MDM):
        module.reset_parameters()


def build_model(cfg: Config, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> MDM:
    """Build an MDM. ``device="meta"`` allocates nothing (for inspection and ZeRO-3 sharding)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.device(device):
        model = MDM(cfg, device=device, dtype=dtype)
    if device.type != "meta":
        init_weights(model)
    keep_fp32_(model)
    return model


def materialize(model: MDM, device: str | torch.device = "cpu") -> MDM:
    """Allocate a meta-built model on ``device`` and initialize every parameter."""
    model.to_empty(device=device)
    init_weights(model)
    keep_fp32_(model)
    return model


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
