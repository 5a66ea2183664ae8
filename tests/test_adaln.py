"""adaLN conditioning (``model.adaln``): the conditioning vector, the modulated Mamba and attention
blocks against hand computations in float64, and a zero-initialized start equal to the backbone
without it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mdm_dist.config import load_config
from mdm_dist.models.attention import AttentionBlock
from mdm_dist.models.mdm import build_model

TINY = [
    "model.d_model=32", "model.n_layers=2", "model.headdim=16", "model.d_state=8",
    "model.attention_every=1", "model.attn_heads=4",
    "vae.image_size=16", "vae.channel_mult=[1,2]", "vae.base_channels=8", "vae.trunk_width=32", "vae.d_z=8",
    "vae.vocab_size=32", "vae.max_text_len=6",
]
F64 = torch.float64


def tiny(*overrides):
    cfg = load_config(None, overrides=[*TINY, *overrides])
    torch.manual_seed(0)
    model = build_model(cfg, dtype=F64)
    with torch.no_grad():
        for head in (model.backbone.txt_out, model.backbone.img_out):
            nn.init.normal_(head.weight, std=0.1)
    return cfg, model


def inputs(bb, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = bb.layout.grid_h * bb.layout.grid_w
    return (torch.randn(b, bb.layout.text_len, 8, generator=g, dtype=F64), torch.randn(b, n, 8, generator=g, dtype=F64),
            torch.rand(b, generator=g, dtype=F64), torch.rand(b, generator=g, dtype=F64), torch.tensor([0, 2, 4])[:b])


def randomize_ada(model, std=0.2):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ada." in name:
                p.normal_(std=std)


def test_zero_initialized_adaln_computes_the_backbone_without_it():
    _, plain = tiny()
    _, ada = tiny("model.adaln=true")
    missing, unexpected = ada.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing
    assert all(".ada." in k or "txt_pool" in k for k in missing)
    args = inputs(ada.backbone)
    with torch.no_grad():
        for a, b in zip(plain.backbone(*args), ada.backbone(*args)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        randomize_ada(ada)
        assert not torch.allclose(plain.backbone(*args)[1], ada.backbone(*args)[1])


def test_condition_vector_by_hand():
    _, model = tiny("model.adaln=true")
    bb = model.backbone
    txt, _, t_txt, t_img, cat = inputs(bb)
    with torch.no_grad():
        h = txt @ bb.txt_pool_in.weight.T + bb.txt_pool_in.bias + bb.txt_pos
        pooled = ((h * torch.sigmoid(h)) @ bb.txt_pool_out.weight.T + bb.txt_pool_out.bias).mean(dim=1)
        expect = bb.time_txt(t_txt) + bb.time_img(t_img) + bb.category.weight[cat] + pooled
        torch.testing.assert_close(bb.condition(txt, t_txt, t_img, cat), expect, rtol=1e-12, atol=1e-12)


def test_modulated_blocks_by_hand_and_the_caption_reaches_every_image_token():
    _, model = tiny("model.adaln=true")
    randomize_ada(model)
    bb = model.backbone
    assert bb.layer_kinds == ["mamba", "attn", "mamba"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, bb.layout.length, 32, generator=g, dtype=F64)
    cond = torch.randn(3, 32, generator=g, dtype=F64)
    orders = bb.scan_orders(x.device)
    with torch.no_grad():
        # Mamba block: x + (1 + gate) * mixer(norm(x) (1 + scale) + shift)
        blk = bb.layers[0]
        shift, scale, gate = (F.silu(cond) @ blk.ada.weight.T + blk.ada.bias).unsqueeze(1).chunk(3, dim=-1)
        hin = blk.norm(x) * (1 + scale) + shift
        assert len(blk.directions) == 4 and blk.combine == "mean"
        branch = sum(mix(hin, scan_order=orders[name]) for mix, name in zip(blk.mixers, blk.directions)) / 4
        expect = x + (1 + gate) * branch
        torch.testing.assert_close(blk(x, orders, cond=cond), expect, rtol=1e-12, atol=1e-12)
        # attention block: both halves modulated
        att = bb.layers[1]
        m = (F.silu(cond) @ att.ada.weight.T + att.ada.bias).unsqueeze(1).chunk(6, dim=-1)
        y = x + (1 + m[2]) * att.attn(att.norm1(x) * (1 + m[1]) + m[0])
        expect = y + (1 + m[5]) * att.mlp(att.norm2(y) * (1 + m[4]) + m[3])
        torch.testing.assert_close(att(x, cond=cond), expect, rtol=1e-12, atol=1e-12)
    # without attention blocks the caption still reaches every image token, through cond
    _, pure = tiny("model.adaln=true", "model.attention_every=0", "model.scan_mode=cycle",
                   "model.image_directions=[row]")
    randomize_ada(pure)
    args = list(inputs(pure.backbone))
    with torch.no_grad():
        base = pure.backbone(*args)[1]
        args[0] = args[0].clone()
        args[0][:, -1] += 1.0  # the last text token; in a row scan the image comes after the text
        changed = pure.backbone(*args)[1]
    assert (changed - base).abs().amax(dim=-1).gt(0).all()


def test_cond_errors():
    _, model = tiny("model.adaln=true")
    bb = model.backbone
    x = torch.zeros(2, bb.layout.length, 32, dtype=F64)
    orders = bb.scan_orders(x.device)
    with pytest.raises(ValueError, match="needs cond"):
        bb.layers[0](x, orders)
    with pytest.raises(ValueError, match="needs cond"):
        bb.layers[1](x)
    plain = AttentionBlock(32, 4).double()
    with pytest.raises(ValueError, match="without adaln"):
        plain(x, cond=torch.zeros(2, 32, dtype=F64))


def test_adaln_gradients_reach_the_pooled_caption_and_every_modulation():
    cfg, model = tiny("model.adaln=true")
    from mdm_dist.diffusion import mdm_loss

    g = torch.Generator().manual_seed(0)
    batch = {"ids": torch.randint(2, 32, (4, 6), generator=g),
             "img_mu": torch.randn(4, 16, 8, generator=g, dtype=F64), "img_logvar": torch.full((4, 16, 8), -9.0, dtype=F64)}
    out = mdm_loss(model, batch, cfg, generator=torch.Generator().manual_seed(1), fixed={"task": ["t2i", "i2t", "t2i", "joint"]})
    out["total"].backward()
    names = [n for n, _ in model.backbone.named_parameters() if ".ada." in n or "txt_pool" in n]
    assert len(names) == 3 * 2 + 2 * 2
    grads = {n: p.grad for n, p in model.backbone.named_parameters()}
    for name in names:  # zero-initialized maps: only they learn at the first step (adaLN-Zero)
        assert grads[name] is not None
        assert (grads[name].abs().sum() > 0) == (".ada." in name), name
    model.zero_grad()
    randomize_ada(model)
    mdm_loss(model, batch, cfg, generator=torch.Generator().manual_seed(1),
             fixed={"task": ["t2i", "i2t", "t2i", "joint"]})["total"].backward()
    for name, p in model.backbone.named_parameters():
        if name in names:
            assert p.grad.abs().sum() > 0, name
