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


def test_swap_attribute_replaces_only_that_word():
    from mdm_dist.eval.captions import swap_attribute

    assert swap_attribute("three red circles on the left", "shape", "cross") == "three red crosses on the left"
    assert swap_attribute("a small Red square at the left", "colour", "blue") == "a small blue square at the left"
    assert swap_attribute("there is one green triangle", "shape", "square") == "there is one green square"
    assert swap_attribute("a white image with two blue squares", "colour", "red") == "a white image with two red squares"
    with pytest.raises(ValueError, match="allowed: colour, shape"):
        swap_attribute("a red circle", "size", "large")
    with pytest.raises(ValueError, match="unknown shape"):
        swap_attribute("a red circle", "shape", "star")


def test_caption_word_reliance_against_a_hand_computation():
    """Blind to the text: every ratio exactly 1; reading it: != 1; the true error equals the
    same noising and x0 estimate written out by hand in float64."""
    import math

    from mdm_dist.diffusion.schedules import from_config
    from mdm_dist.eval.conditioning import caption_word_reliance

    cfg, model = tiny("diffusion.image_prediction=v")
    g = torch.Generator().manual_seed(0)
    n, L = 16, cfg.vae.max_text_len
    z0 = torch.randn(3, n, cfg.vae.d_z, generator=g)
    ids = torch.randint(2, cfg.vae.vocab_size, (3, L), generator=g)
    caps = {"true": ids, "other": torch.roll(ids, 1, 0)}
    torch.manual_seed(0)
    model.backbone = Blind(cfg.vae.d_z)
    rows = caption_word_reliance(model, cfg, z0, caps, (0.3, 0.8, 1.0), reps=2, seed=3)
    assert [r["other_ratio"] for r in rows] == [1.0, 1.0, 1.0]
    vp = from_config(cfg.diffusion).vp
    gen = torch.Generator().manual_seed(3)
    for r, t in zip(rows, (0.3, 0.8, 1.0)):
        ab = float(vp.alpha_bar(torch.tensor(t, dtype=torch.float64)))
        assert r["t"] == t and r["alpha_bar"] == pytest.approx(ab, rel=1e-12)
        ref = 0.0
        for _ in range(2):
            eps = torch.randn(z0.shape, generator=gen)
            z_t = (math.sqrt(ab) * z0.double() + math.sqrt(1 - ab) * eps.double())
            with torch.no_grad():
                v = model.backbone.i(z_t.float()).double()
            ref += float((math.sqrt(ab) * z_t - math.sqrt(1 - ab) * v - z0.double()).square().mean()) / 2
        assert r["true"] == pytest.approx(ref, rel=1e-4)
    model.backbone = Reader(cfg.vae.d_z)
    rows = caption_word_reliance(model, cfg, z0, caps, (0.3,), reps=1)
    assert abs(rows[0]["other_ratio"] - 1.0) > 1e-3
    with pytest.raises(ValueError, match="'true'"):
        caption_word_reliance(model, cfg, z0, {"other": ids}, (0.3,))
    with pytest.raises(ValueError, match="times must lie"):
        caption_word_reliance(model, cfg, z0, caps, (0.0,))
