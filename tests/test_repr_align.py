"""Representation alignment (``model.repr_align_weight``): the backbone's states between layers,
the alignment term against a float64 hand computation (its target read from the clean image with
the text all MASK, no gradient through the target), and its config errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mdm_dist.config import ConfigError, load_config
from mdm_dist.diffusion import mdm_loss
from mdm_dist.models.mdm import build_model

TINY = [
    "model.d_model=32", "model.n_layers=2", "model.headdim=16", "model.d_state=8",
    "model.attention_every=1", "model.attn_heads=4",  # layers: Mamba, attention, Mamba
    "vae.image_size=16", "vae.channel_mult=[1,2]", "vae.base_channels=8", "vae.trunk_width=32", "vae.d_z=8",
    "vae.vocab_size=32", "vae.max_text_len=6",
]
ALIGN = ["model.repr_align_weight=0.7", "model.repr_align_layer=0", "model.repr_align_target_layer=1"]
B = 6


def tiny(*overrides, dtype=torch.float64):
    cfg = load_config(None, overrides=[*TINY, *overrides])
    torch.manual_seed(0)
    model = build_model(cfg, dtype=dtype)
    with torch.no_grad():  # zero-initialized heads would block every upstream gradient
        for head in (model.backbone.txt_out, model.backbone.img_out):
            nn.init.normal_(head.weight, std=0.1)
    return cfg, model


def make_batch(cfg, dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    n = (cfg.vae.image_size // 4) ** 2
    return {
        "ids": torch.randint(2, cfg.vae.vocab_size, (B, cfg.vae.max_text_len), generator=g),
        "category": torch.randint(0, cfg.model.num_categories, (B,), generator=g),
        "img_mu": torch.randn(B, n, cfg.vae.d_z, generator=g, dtype=dtype),
        "img_logvar": torch.full((B, n, cfg.vae.d_z), -80.0, dtype=dtype),  # the sample is the mean
    }


FIXED = {"task": ["joint", "t2i", "i2t", "t2i", "joint", "i2t"],
         "drop": torch.tensor([False, True, False, False, False, True])}


def manual_states(bb, txt, img, t_txt, t_img, category):
    """The image tokens' states after every layer: embed, then the layers one by one (no skips)."""
    x = bb.embed(txt, img, t_txt, t_img, category)
    orders = bb.scan_orders(x.device)
    pos = bb.layout.image_positions()
    states = []
    for kind, layer in zip(bb.layer_kinds, bb.layers):
        x = layer(x) if kind == "attn" else layer(x, orders)
        states.append(x[:, pos])
    return states


def test_hidden_states_are_the_states_between_layers():
    cfg, model = tiny()
    bb = model.backbone
    assert bb.layer_kinds == ["mamba", "attn", "mamba"]
    g = torch.Generator().manual_seed(0)
    n = bb.layout.grid_h * bb.layout.grid_w
    args = (torch.randn(2, 6, 8, generator=g, dtype=torch.float64), torch.randn(2, n, 8, generator=g, dtype=torch.float64),
            torch.rand(2, generator=g, dtype=torch.float64), torch.rand(2, generator=g, dtype=torch.float64),
            torch.tensor([0, 4]))
    with torch.no_grad():
        txt, img, hidden = bb(*args, hidden_at=(0, 1, 2))
        ref = manual_states(bb, *args)
        for i in range(3):
            torch.testing.assert_close(hidden[i], ref[i], rtol=1e-12, atol=1e-12)
        plain = bb(*args)
        assert len(plain) == 2 and torch.equal(plain[0], txt) and torch.equal(plain[1], img)
    with pytest.raises(ValueError, match="hidden_at: layer 3 does not exist"):
        bb(*args, hidden_at=(3,))


class Recorder(nn.Module):
    """Wraps the real backbone; keeps each call's inputs, hidden_at and grad mode."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = []

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, *args, hidden_at=(), **kw):
        self.calls.append(([a.detach().clone() for a in args], tuple(hidden_at), torch.is_grad_enabled()))
        return self.inner(*args, hidden_at=hidden_at, **kw)


def _cos(a, b):
    return (a * b).sum(-1) / (a.square().sum(-1).sqrt() * b.square().sum(-1).sqrt())


def test_alignment_term_matches_a_hand_computation_and_its_gradient_skips_the_target():
    cfg, model = tiny(*ALIGN)
    bb = model.backbone
    model.backbone = Recorder(bb)
    batch = make_batch(cfg)
    out = mdm_loss(model, batch, cfg, generator=torch.Generator().manual_seed(0), fixed=FIXED)

    (t_args, t_hidden, t_grad), (s_args, s_hidden, s_grad) = model.backbone.calls
    assert (t_hidden, t_grad) == ((1,), False) and (s_hidden, s_grad) == ((0,), True)
    # the target's inputs, for the samples whose image is generated (joint, t2i): text all MASK
    # (the encoder's mean), the clean latents, t = (1, 0), the categories as given (condition
    # dropout does not reach them)
    active = torch.tensor([True, True, False, True, True, False])
    with torch.no_grad():
        z_mask = model.vae.encode_text(torch.full_like(batch["ids"][active], cfg.vae.mask_id))[0]
    torch.testing.assert_close(t_args[0], z_mask)
    torch.testing.assert_close(t_args[1], batch["img_mu"][active], rtol=0, atol=1e-12)
    assert torch.equal(t_args[2], torch.ones(4, dtype=torch.float64)) and torch.equal(t_args[3], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(t_args[4], batch["category"][active])

    # by hand: 1 - cos(MLP(student state after layer 0), target state after layer 1), mean over the
    # image tokens, mean over the samples whose image is generated (joint, t2i)
    with torch.no_grad():
        target = manual_states(bb, *t_args)[1]
    student = manual_states(bb, *s_args)[0]
    lin1, lin2 = bb.align_proj[0], bb.align_proj[2]
    h = student @ lin1.weight.T + lin1.bias
    proj = (h * torch.sigmoid(h)) @ lin2.weight.T + lin2.bias
    expect = (1.0 - _cos(proj[active], target).mean(-1)).mean()
    torch.testing.assert_close(out["align"].double(), expect, rtol=1e-6, atol=1e-7)
    assert 0.0 < float(out["align"].detach()) < 2.0
    d = cfg.diffusion
    total = (d.lambda_rec_txt * out["rec_txt"] + cfg.vae.beta_kl * out["kl"]
             + d.lambda_se * (out["se_txt"] + out["se_img"]) + 0.7 * out["align"])
    torch.testing.assert_close(out["total"], total)

    # the term's gradient in the backbone is the hand computation's with the target held fixed
    params = [p for p in bb.parameters()]
    got = torch.autograd.grad(out["align"], params, allow_unused=True)
    ref = torch.autograd.grad(expect, params, allow_unused=True)
    for (name, _), a, r in zip(bb.named_parameters(), got, ref):
        a = torch.zeros_like(_) if a is None else a
        r = torch.zeros_like(_) if r is None else r
        torch.testing.assert_close(a.double(), r.double(), rtol=1e-5, atol=1e-8, msg=lambda m: f"{name}: {m}")
    grads = dict(zip((n for n, _ in bb.named_parameters()), got))
    assert grads["align_proj.2.weight"].abs().sum() > 0 and grads["layers.0.mixers.0.in_proj.weight"].abs().sum() > 0
    assert grads["img_out.weight"] is None  # the term reads states before the output heads


def test_alignment_adds_a_term_and_changes_nothing_else():
    """Same parameters, same draws: every other term is identical with and without alignment (the
    target's pass draws no random numbers)."""
    cfg0, m0 = tiny()
    cfg1, m1 = tiny(*ALIGN)
    missing, unexpected = m1.load_state_dict(m0.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("backbone.align_proj") for k in missing)
    assert m0.backbone.align_proj is None
    batch = make_batch(cfg0)
    o0 = mdm_loss(m0, batch, cfg0, generator=torch.Generator().manual_seed(5))
    o1 = mdm_loss(m1, batch, cfg1, generator=torch.Generator().manual_seed(5))
    assert set(o1) == set(o0) | {"align"}
    for k in o0:
        if k != "total":
            assert torch.equal(o0[k], o1[k]), k
    torch.testing.assert_close(o1["total"], o0["total"] + 0.7 * o1["align"])


def test_alignment_under_bf16_autocast_is_finite_and_trains_the_projector():
    cfg, model = tiny(*ALIGN, dtype=torch.float32)
    batch = {k: (v.float() if v.is_floating_point() else v) for k, v in make_batch(cfg).items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mdm_loss(model, batch, cfg, generator=torch.Generator().manual_seed(0), fixed=FIXED)
    assert out["align"].dtype == torch.float32 and torch.isfinite(out["total"])
    out["total"].backward()
    assert model.backbone.align_proj[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("override, match", [
    ("model.repr_align_weight=-0.1", "model.repr_align_weight"),
    ("model.repr_align_weight=nan", "model.repr_align_weight"),
    ("model.repr_align_layer=3", r"model.repr_align_layer' = 3; allowed values: 0 \.\. 2"),
    ("model.repr_align_target_layer=-1", "model.repr_align_target_layer"),
])
def test_alignment_config_errors(override, match):
    weight = [] if "weight" in override else ["model.repr_align_weight=0.5"]
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides=[*TINY, *weight, override])
    # with the weight at 0 the layers are not read
    if "layer" in override:
        load_config(None, overrides=[*TINY, override])


def test_alignment_with_no_generated_image_is_an_exact_zero_in_the_graph():
    """A batch of captioning samples only still makes the target call (on one sample: matched
    collectives under ZeRO-3 / sequence parallelism) and gives the projector a zero gradient."""
    cfg, model = tiny(*ALIGN)
    model.backbone = Recorder(model.backbone)
    out = mdm_loss(model, make_batch(cfg), cfg, generator=torch.Generator().manual_seed(0), fixed={"task": "i2t"})
    assert "se_img" not in out and float(out["align"].detach()) == 0.0
    assert len(model.backbone.calls) == 2 and model.backbone.calls[0][0][1].shape[0] == 1
    out["total"].backward()
    proj_grad = model.backbone.inner.align_proj[0].weight.grad
    assert proj_grad is not None and proj_grad.abs().sum() == 0
