"""MDMBackbone and build_model: shapes, scan-switch wiring, gradients, meta construction."""

import pytest
import torch

from mdm_dist.config import load_config
from mdm_dist.models.mdm import MDM, build_model, count_parameters, materialize
from mdm_dist.models.scan import inverse_permutation

TINY = [
    "model.d_model=32", "model.n_layers=2", "model.headdim=16", "model.d_state=8", "model.chunk_size=8",
    "vae.image_size=16", "vae.channel_mult=[1,2]", "vae.base_channels=8", "vae.trunk_width=32",
    "vae.vocab_size=40", "vae.max_text_len=5", "vae.d_z=8",
]


def _cfg(*extra):
    return load_config(None, TINY + list(extra))


def _inputs(cfg, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_img = (cfg.vae.image_size // (2 ** (len(cfg.vae.channel_mult) - 1) * cfg.vae.patch_size)) ** 2
    return dict(
        txt=torch.randn(b, cfg.vae.max_text_len, cfg.vae.d_z, generator=g),
        img=torch.randn(b, n_img, cfg.vae.d_z, generator=g),
        t_txt=torch.rand(b, generator=g),
        t_img=torch.rand(b, generator=g),
        category=torch.randint(0, cfg.model.num_categories + 1, (b,), generator=g),
    )


def _randomize_heads(model):
    # The output heads start at zero (the untrained model predicts 0), which blocks gradients to
    # everything upstream; give them weights so the wiring can be checked.
    with torch.no_grad():
        for head in (model.backbone.txt_out, model.backbone.img_out):
            head.weight.normal_(std=0.1)


VARIANTS = {
    "multi": [],
    "cycle": ["model.scan_mode=cycle", "model.n_layers=4"],
    "shared": ["model.share_direction_weights=true", "model.direction_combine=sum"],
    "lateral_skip": ["model.lateral_pad=true", "model.long_skip=true", "model.n_layers=3", "model.num_tail_pad=2"],
    "hybrid": ["model.attention_every=1", "model.attn_heads=4"],
    "two_dirs": ["model.image_directions=[row, col_rev]", "model.num_tail_pad=0"],
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_shapes_dtypes_and_every_parameter_gets_gradient(variant):
    torch.manual_seed(0)
    cfg = _cfg(*VARIANTS[variant])
    model = build_model(cfg)
    _randomize_heads(model)
    inp = _inputs(cfg)
    txt_out, img_out = model.backbone(**inp)
    assert txt_out.shape == inp["txt"].shape and img_out.shape == inp["img"].shape
    assert txt_out.dtype == torch.float32 and torch.isfinite(txt_out).all() and torch.isfinite(img_out).all()
    (txt_out.square().sum() + img_out.square().sum()).backward()
    missing = [n for n, p in model.backbone.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient reaches {missing}"


def test_layer_structure():
    cfg = _cfg("model.n_layers=4", "model.attention_every=2")
    bb = build_model(cfg).backbone
    assert bb.layer_kinds == ["mamba", "mamba", "attn", "mamba", "mamba"]  # none after the last block
    assert len(bb.layers[0].mixers) == 4
    cyc = build_model(_cfg("model.scan_mode=cycle", "model.n_layers=5")).backbone
    assert [b.directions for b in cyc.layers] == [["row"], ["row_rev"], ["col"], ["col_rev"], ["row"]]
    shared = build_model(_cfg("model.share_direction_weights=true")).backbone
    assert len(shared.layers[0].mixers) == 1


def test_block_equals_explicit_permute_mix_unpermute():
    torch.manual_seed(1)
    cfg = _cfg("model.direction_combine=mean")
    bb = build_model(cfg).backbone
    blk = bb.layers[0]
    x = torch.randn(2, bb.layout.length, cfg.model.d_model)
    orders = bb.scan_orders(x.device)
    h = blk.norm(x)
    expect = torch.zeros_like(x)
    for mixer, name in zip(blk.mixers, blk.directions):
        order = orders[name]
        expect += mixer(h[:, order])[:, inverse_permutation(order)]
    torch.testing.assert_close(blk(x, orders), x + expect / 4, rtol=1e-5, atol=1e-5)


def _dependence(model, inp, out_idx, wrt):
    inp = {k: (v.clone().requires_grad_(True) if k == wrt else v) for k, v in inp.items()}
    out = model.backbone(**inp)[out_idx]
    (g,) = torch.autograd.grad(out.sum(), inp[wrt])
    return g.abs().sum().item()


def test_scan_directions_route_information_as_documented():
    # One block scanning only "row": text comes before the image, so text outputs cannot depend
    # on the image; with "row_rev" only, the image comes first and cannot depend on the text.
    torch.manual_seed(2)
    for direction, blind_out, blind_in in (("row", 0, "img"), ("row_rev", 1, "txt")):
        cfg = _cfg("model.n_layers=1", f"model.image_directions=[{direction}]", "model.num_tail_pad=0")
        model = build_model(cfg)
        _randomize_heads(model)
        inp = _inputs(cfg)
        assert _dependence(model, inp, blind_out, blind_in) == 0.0
        assert _dependence(model, inp, 1 - blind_out, "txt" if blind_in == "img" else "img") > 0.0
    # All four directions: everything sees everything.
    cfg = _cfg("model.n_layers=1")
    model = build_model(cfg)
    _randomize_heads(model)
    inp = _inputs(cfg)
    assert _dependence(model, inp, 0, "img") > 0 and _dependence(model, inp, 1, "txt") > 0


def test_conditioning_tokens_matter():
    torch.manual_seed(3)
    cfg = _cfg()
    model = build_model(cfg)
    _randomize_heads(model)
    inp = _inputs(cfg)
    base = model.backbone(**inp)[1]
    for key, new in (("t_img", inp["t_img"] * 0.5), ("category", (inp["category"] + 1) % 5)):
        changed = model.backbone(**{**inp, key: new})[1]
        assert not torch.allclose(base, changed)


def test_zero_init_heads_predict_zero():
    cfg = _cfg()
    out = build_model(cfg).backbone(**_inputs(cfg))
    assert out[0].abs().max() == 0 and out[1].abs().max() == 0


def test_meta_build_allocates_nothing_and_materializes():
    cfg = _cfg("model.lateral_pad=true", "model.attention_every=1")
    meta = build_model(cfg, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    assert count_parameters(meta) == count_parameters(build_model(cfg))
    model = materialize(meta, "cpu")
    assert not any(p.is_meta for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    _randomize_heads(model)
    out = model.backbone(**_inputs(cfg))
    assert torch.isfinite(out[0]).all() and out[1].abs().sum() > 0


def test_fp32_ssm_parameters_survive_bf16_build():
    cfg = _cfg()
    model = build_model(cfg, dtype=torch.bfloat16)
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] in ("A_log", "D", "dt_bias"):
            assert p.dtype == torch.float32, name
    assert model.backbone.txt_in.weight.dtype == torch.bfloat16
    out = model.backbone(**_inputs(cfg))
    assert torch.isfinite(out[1].float()).all()


def test_wrong_sequence_lengths_are_named():
    cfg = _cfg()
    inp = _inputs(cfg)
    inp["txt"] = inp["txt"][:, :-1]
    with pytest.raises(ValueError, match="vae.max_text_len"):
        build_model(cfg).backbone(**inp)
