"""The condition-reliance probe: ratio exactly 1 for a model that ignores its condition, != 1
for one that reads it, and its "true" loss is mdm_loss on the untouched batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mdm_dist.diffusion import mdm_loss
from mdm_dist.eval.conditioning import condition_reliance
from test_objectives import make_batch, tiny


class Blind(nn.Module):
    """Text output from the text input only, image output from the image input only."""

    def __init__(self, d_z):
        super().__init__()
        self.t = nn.Linear(d_z, d_z)
        self.i = nn.Linear(d_z, d_z)

    def forward(self, txt, img, t_txt, t_img, category):
        return self.t(txt), self.i(img)


class Reader(Blind):
    """Each output also sees the other modality's mean latent."""

    def forward(self, txt, img, t_txt, t_img, category):
        return self.t(txt + 5 * img.mean(1, keepdim=True)), self.i(img + 5 * txt.mean(1, keepdim=True))


def test_ratio_is_one_when_the_condition_is_ignored_and_not_when_read():
    cfg, model = tiny()
    batch = make_batch(cfg, pixels=False)
    torch.manual_seed(0)
    model.backbone = Blind(cfg.vae.d_z)
    blind = condition_reliance(model, cfg, batch)
    for task in ("i2t", "t2i"):
        assert blind[task]["ratio"] == pytest.approx(1.0, abs=1e-6), (task, blind)
    model.backbone = Reader(cfg.vae.d_z)
    model.backbone.load_state_dict(Blind(cfg.vae.d_z).state_dict())
    read = condition_reliance(model, cfg, batch)
    for task in ("i2t", "t2i"):
        assert abs(read[task]["ratio"] - 1.0) > 1e-3, (task, read)
    # "true" is the plain loss of the task at the fixed times, with the same draws
    b = batch["ids"].shape[0]
    ref = []
    for t in (0.3, 0.7):
        fixed = {"task": "i2t", "drop": torch.zeros(b, dtype=torch.bool),
                 "t_txt": torch.full((b,), t), "t_img": torch.full((b,), t)}
        with torch.no_grad():
            terms = mdm_loss(model, batch, cfg, generator=torch.Generator().manual_seed(0), fixed=fixed)
        ref.append(float(terms["se_txt"]))
    assert read["i2t"]["true"] == pytest.approx(sum(ref) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        condition_reliance(model, cfg, {k: v[:1] for k, v in batch.items()})


def test_reliance_never_masks_image_tokens():
    """With model.image_mask_prob = 1 (every generated image masked in training), the probe still
    runs the backbone with every image token visible: the model as the samplers use it."""
    from test_objectives import CallLog

    cfg, model = tiny("model.image_mask_prob=1.0", "model.image_mask_ratio=0.9")
    model.backbone = CallLog(model.backbone)
    condition_reliance(model, cfg, make_batch(cfg, pixels=False))
    keeps = [call[4] for call in model.backbone.calls]
    assert keeps and all(k is not None and bool(k.all()) for k in keeps)
