"""mdm_dist.train pieces without processes: LR schedule, per-sample noise, EMA arithmetic, AdamW groups."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from mdm_dist.config import load_config
from mdm_dist.train.ema import EMA
from mdm_dist.train.optim import param_groups
from mdm_dist.train.noise import SampleNoise
from mdm_dist.train.schedule import lr_at

REPO = Path(__file__).resolve().parents[1]


def test_lr_warmup_then_cosine_to_min():
    lrs = [lr_at(s, 1.0, 0.1, 10, 110) for s in range(120)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0  # linear warmup reaches lr at the last warmup step
    assert lrs[10] == 1.0 and math.isclose(lrs[60], 0.55) and math.isclose(lrs[110], 0.1) and lrs[119] == 0.1
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    # an anchor at the warmup's end with progress 0 is the plain cosine; a later one continues it
    assert [lr_at(s, 1.0, 0.1, 10, 110, (10, 0.0)) for s in range(120)] == lrs
    anchored = [lr_at(s, 1.0, 0.1, 10, 210, (60, 0.5)) for s in range(60, 215)]
    assert math.isclose(anchored[0], lrs[60]) and math.isclose(anchored[150], 0.1) and anchored[-1] == 0.1
    assert math.isclose(lr_at(135, 1.0, 0.1, 10, 210, (60, 0.5)), 0.1 + 0.45 * (1 + math.cos(math.pi * 0.75)))


def test_per_sample_noise_independent_of_batch_composition():
    cfg = load_config(None, ["vae.max_text_len=6", "vae.d_z=8"])
    a = SampleNoise(["x", "y", "z"], seed=0, step=3).fixed(cfg, 4, "cpu")
    b = SampleNoise(["z", "q"], seed=0, step=3).fixed(cfg, 4, "cpu")
    for k in a:
        torch.testing.assert_close(a[k][2], b[k][0], rtol=0, atol=0)
    c = SampleNoise(["z"], seed=0, step=4).fixed(cfg, 4, "cpu")
    assert not torch.equal(a["eps_img"][2], c["eps_img"][0])  # a new step draws new noise
    mu, lv = torch.zeros(2, 4, 8), torch.zeros(2, 4, 8)
    za = SampleNoise(["x", "z"], 0, 1).vae_sample(mu, lv)
    zb = SampleNoise(["z"], 0, 1).vae_sample(mu[:1], lv[:1])
    torch.testing.assert_close(za[1], zb[0], rtol=0, atol=0)
    assert "sc" not in a
    sc_cfg = load_config(None, ["vae.max_text_len=6", "vae.d_z=8", "model.self_condition=true"])
    d = SampleNoise(["x", "y", "z"], seed=0, step=3).fixed(sc_cfg, 4, "cpu")  # self-conditioning's coin
    assert d["sc"].shape == (3,) and ((d["sc"] >= 0) & (d["sc"] < 1)).all()
    for k in a:  # drawn after the others: they do not change
        torch.testing.assert_close(a[k], d[k], rtol=0, atol=0)
    assert "img_mask" not in a and "img_mask_tokens" not in a
    m_cfg = load_config(None, ["vae.max_text_len=6", "vae.d_z=8", "model.image_mask_prob=0.5"])
    e = SampleNoise(["x", "y", "z"], seed=0, step=3).fixed(m_cfg, 4, "cpu")  # masked tokens' draws
    assert e["img_mask"].shape == (3,) and e["img_mask_tokens"].shape == (3, 4)
    for k in a:
        torch.testing.assert_close(a[k], e[k], rtol=0, atol=0)


def _one_by_one(cfg, keys, seed, step, num_image_tokens):
    """The per-sample draws asked for one by one, each sample alone (the former implementation of
    ``SampleNoise.fixed``): the batched draws must equal these exactly."""
    from mdm_dist.diffusion import draw_tasks
    from mdm_dist.train.noise import sample_seed

    L, dz, T = cfg.vae.max_text_len, cfg.vae.d_z, num_image_tokens
    rows = []
    for k in keys:
        g = torch.Generator().manual_seed(sample_seed(seed, step, k))
        d = draw_tasks(cfg, 1, "cpu", g)
        d["mask_noise"] = torch.rand((1, L), generator=g)
        d["eps_img"] = torch.randn((1, T, dz), generator=g)
        if cfg.diffusion.text_process == "gaussian":
            d["eps_txt"] = torch.randn((1, L, dz), generator=g)
        if cfg.model.self_condition:
            d["sc"] = torch.rand((1,), generator=g)
        if cfg.model.image_mask_prob > 0:
            d["img_mask"] = torch.rand((1,), generator=g)
            d["img_mask_tokens"] = torch.rand((1, T), generator=g)
        rows.append(d)
    return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}


@pytest.mark.parametrize("sets", [
    [],  # the demo's config: 12 text tokens, 16 image tokens of 16
    ["vae.max_text_len=6", "vae.d_z=8", "model.self_condition=true", "model.image_mask_prob=0.5",
     "diffusion.text_process=gaussian", "diffusion.image_time_power=3.0"],
])
def test_batched_sample_noise_equals_the_draws_one_by_one(sets):
    cfg = load_config(REPO / "configs" / "tiny.yaml", sets)
    keys = [f"k{i}" for i in range(7)]
    got = SampleNoise(keys, seed=5, step=11).fixed(cfg, 16, "cpu")
    ref = _one_by_one(cfg, keys, 5, 11, 16)
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype, k
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)


def test_ema_update_and_state():
    m = nn.Linear(3, 2)
    ema = EMA(m, decay=0.5)
    w0 = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(2.0)
    ema.update()
    torch.testing.assert_close(ema.shadow["weight"], w0 + 1.0)
    assert set(ema.shadow) == {"weight", "bias"}  # every parameter, none left out
    other = EMA(m, decay=0.5)
    other.load_state_dict(ema.state_dict())
    torch.testing.assert_close(other.shadow["weight"], w0 + 1.0)


def test_ema_warmup_schedule():
    """Update k uses min(decay, (1 + k) / (10 + k)); the count survives a state round trip."""
    m = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(0.0)
    ema = EMA(m, decay=0.9, warmup=True)
    ref = 0.0
    for k in range(1, 40):
        with torch.no_grad():
            m.weight.fill_(float(k))
        d = min(0.9, (1 + k) / (10 + k))
        assert ema.current_decay() == pytest.approx(d)
        ema.update()
        ref = d * ref + (1 - d) * k
        assert float(ema.shadow["weight"]) == pytest.approx(ref, rel=1e-6)
    other = EMA(m, decay=0.9, warmup=True)
    other.load_state_dict(ema.state_dict())
    assert other.current_decay() == pytest.approx(41 / 50) and other.updates == 39


def test_adamw_groups_skip_decay_for_vectors_and_marked():
    m = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    m[0].weight._no_weight_decay = False
    extra = nn.Parameter(torch.zeros(2, 2))
    extra._no_weight_decay = True
    m.register_parameter("marked", extra)
    decay, no_decay = param_groups(m, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])] and decay["weight_decay"] == 0.1
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0


# ----------------------------------------------------------------------------------------------
# Muon on the hidden matrices + AdamW on the rest (mdm_dist/train/optim.py)
# ----------------------------------------------------------------------------------------------

MUON_TINY = ["model.d_model=32", "model.headdim=8", "model.d_state=8", "model.chunk_size=8", "model.n_layers=2",
             "model.attention_every=1", "model.attn_heads=4", "vae.image_size=16", "vae.channel_mult=[1,2]",
             "vae.base_channels=8", "vae.trunk_width=32", "vae.vocab_size=40", "vae.max_text_len=6", "vae.d_z=8",
             "train.optimizer=muon", "train.lr=1e-3", "train.muon_lr=0.05", "train.weight_decay=0.1"]


def _muon_model():
    from mdm_dist.models.mdm import build_model

    cfg = load_config(None, MUON_TINY)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.vae.freeze_for_pretraining()
    return cfg, model


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    from mdm_dist.train.optim import build_optimizer, uses_muon

    cfg, model = _muon_model()
    names = {n for n, p in model.named_parameters() if p.requires_grad and uses_muon(n, p)}
    # layers 0 and 2 Mamba, layers 1 and 3 attention + MLP, layer 2 Mamba, layer 3 attention + MLP; both time MLPs
    # (one Mamba mixer per scan direction: the default config scans 4)
    expected = {f"backbone.layers.{i}.mixers.{k}.{w}.weight" for i in (0, 2) for k in range(4)
                for w in ("in_proj", "out_proj")}
    expected |= {f"backbone.layers.{i}.{w}.weight" for i in (1,) for w in ("attn.qkv", "attn.out", "mlp.0", "mlp.2")}
    expected |= {f"backbone.time_{s}.mlp.{j}.weight" for s in ("txt", "img") for j in (0, 2)}
    assert names == expected
    opt = build_optimizer(model, cfg.train)
    muon = [g for g in opt.param_groups if g["use_muon"]]
    assert len(muon) == 1 and {id(p) for p in muon[0]["params"]} == {
        id(p) for n, p in model.named_parameters() if n in expected}
    assert muon[0]["lr"] == 0.05 and muon[0]["lr_scale"] == pytest.approx(50.0)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable  # every one, once
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trainable)


def test_muon_step_orthogonalizes_the_nesterov_momentum_and_adamw_matches_torch():
    """One step from fresh state: every Muon matrix moves by lr * (decay + U S V^T * sqrt(max(1, r/c)))
    with U, V the singular vectors (float64 SVD) of its Nesterov momentum and S near 1 (the
    Newton-Schulz quintic's band, for singular values not tiny against the Frobenius norm); every other parameter moves exactly as torch's AdamW moves it."""
    from mdm_dist.train.optim import build_optimizer, set_lr, uses_muon

    cfg, model = _muon_model()
    opt = build_optimizer(model, cfg.train)
    set_lr(opt, 0.5e-3)  # the schedule's value: Muon gets 0.5e-3 * 50
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(1)
    for _, p in named:
        p.grad = torch.randn(p.shape, generator=g)
    before = {n: p.detach().clone() for n, p in named}
    ref = {n: nn.Parameter(p.detach().clone()) for n, p in named if not uses_muon(n, p)}
    for n, p in ref.items():
        p.grad = dict(named)[n].grad.clone()
    decayed = [p for n, p in ref.items() if p.dim() >= 2 and not getattr(dict(named)[n], "_no_weight_decay", False)]
    ref_opt = torch.optim.AdamW([{"params": decayed, "weight_decay": 0.1},
                                 {"params": [p for p in ref.values() if all(p is not q for q in decayed)],
                                  "weight_decay": 0.0}], lr=0.5e-3, betas=tuple(cfg.train.betas), eps=1e-8)
    opt.step()
    ref_opt.step()
    lr_muon, beta = 0.5e-3 * 50, cfg.train.muon_momentum
    for n, p in named:
        if n in ref:
            torch.testing.assert_close(p.detach(), ref[n].detach(), rtol=1e-6, atol=1e-7, msg=n)
            continue
        step = (before[n] * (1 - lr_muon * 0.1) - p.detach()).double() / lr_muon  # the applied update
        grad = p.grad.double()
        nesterov = grad + beta * ((1 - beta) * grad - grad)  # grad.lerp(momentum, beta), momentum = (1 - beta) grad
        u, sv, vh = torch.linalg.svd(nesterov, full_matrices=False)
        core = u.T @ step @ vh.T
        rows, cols = p.shape
        scale = math.sqrt(max(1.0, rows / cols))
        diag = torch.diagonal(core) / scale
        off = core - torch.diag(torch.diagonal(core))
        assert off.abs().max() < 0.02 * scale, (n, off.abs().max())
        # five quintic steps lift every singular value above 1% of the Frobenius norm into the
        # band; smaller ones (near-singular square matrices) rise less, but keep their sign
        big = sv / sv.norm() > 0.01
        assert diag[big].min() > 0.6 and diag.max() < 1.25 and diag.min() > 0, (n, diag.min(), diag.max())
        assert big.float().mean() > 0.8, n


def test_muon_config_is_checked_and_deepspeed_clipping_is_off():
    from mdm_dist.config import ConfigError
    from mdm_dist.parallel.zero import deepspeed_config

    for overrides, message in [(["train.optimizer=lion"], "train.optimizer.*adamw.*muon"),
                               (["train.muon_momentum=1.0"], "train.muon_momentum.*in \\(0, 1\\)"),
                               (["train.muon_lr=0"], "train.muon_lr.*> 0"),
                               (["train.optimizer=muon", "parallel.zero_stage=2"], "zero_stage' = 3.*got 2")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides)
    cfg = load_config(None, ["train.optimizer=muon", "train.global_batch_size=4", "train.micro_batch_size=2"])
    ds = deepspeed_config(cfg, 2)  # the trainer clips before Muon instead (tests/test_parallel_zero.py)
    assert ds["gradient_clipping"] == 0.0 and ds["zero_optimization"]["reduce_scatter"] is False
    plain = load_config(None, ["train.global_batch_size=4", "train.micro_batch_size=2"])
    assert deepspeed_config(plain, 2)["gradient_clipping"] == plain.train.grad_clip


def _vae():
    from mdm_dist.models.vae import UnifiedVAE

    cfg = load_config(REPO / "configs/vae_tiny.yaml", ["vae.base_channels=8", "vae.trunk_width=32", "vae.trunk_layers=1",
                                                       "vae.d_z=8"])
    torch.manual_seed(0)
    return cfg, UnifiedVAE(cfg.vae)


def test_vae_muon_takes_the_hidden_filters_and_trunk_matrices():
    from mdm_dist.train.optim import uses_muon_vae

    cfg, vae = _vae()
    muon = {n for n, p in vae.named_parameters() if uses_muon_vae(n, p)}
    # every hidden conv filter (3x3 and the 1x1 skips) of both image stacks and the trunks' fc1 / fc2
    assert "image_encoder.stages.0.conv1.weight" in muon and "image_encoder.stages.2.skip.weight" in muon
    assert "image_decoder.stages.4.conv2.weight" in muon and "trunk_enc.layers.0.fc1.weight" in muon
    assert "trunk_dec.layers.0.fc2.weight" in muon
    for n in ("image_encoder.conv_in.weight", "image_encoder.conv_out.weight", "image_decoder.conv_in.weight",
              "image_decoder.conv_out.weight", "image_in.weight", "image_out.weight", "tok_emb.weight",
              "text_head.weight", "trunk_enc.moments.weight", "trunk_dec.z_in.weight", "pos_emb",
              "image_encoder.stages.0.conv1.bias", "image_encoder.stages.0.norm1.weight"):
        assert n not in muon, n
    assert all(p.ndim in (2, 4) for n, p in vae.named_parameters() if n in muon)
    assert len(muon) == sum(1 for n, p in vae.named_parameters() if ".stages." in n and p.ndim == 4) + 4


def test_vae_muon_steps_orthogonalized_momentum_of_conv_filters_and_adamw_matches_torch():
    """Two steps: every Muon parameter (conv filters viewed as (out, in*k*k)) moves by lr * U S V^T
    * sqrt(max(1, rows / cols)) with U, V the singular vectors (float64 SVD) of its Nesterov
    momentum (an EMA of both gradients, 0.95) and S in the quintic's band; every other parameter
    moves exactly as torch's AdamW (no weight decay) moves it."""
    from mdm_dist.train.optim import HiddenMuon, build_vae_optimizer, set_lr, uses_muon_vae

    cfg, vae = _vae()
    cfg.train.optimizer, cfg.train.muon_lr, cfg.train.lr = "muon", 0.02, 1e-3
    opt = build_vae_optimizer(vae, cfg.train)
    assert isinstance(opt, HiddenMuon)
    set_lr(opt, 0.5e-3)  # the schedule's value: Muon gets 0.5e-3 * 20
    named = [(n, p) for n, p in vae.named_parameters()]
    ref = {n: nn.Parameter(p.detach().clone()) for n, p in named if not uses_muon_vae(n, p)}
    ref_opt = torch.optim.AdamW(list(ref.values()), lr=0.5e-3, betas=tuple(cfg.train.betas), eps=1e-8, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    grads = [{n: torch.randn(p.shape, generator=g) for n, p in named} for _ in range(2)]
    beta, lr_muon = cfg.train.muon_momentum, 0.5e-3 * 20
    for k in range(2):
        before = {n: p.detach().clone() for n, p in named}
        for n, p in named:
            p.grad = grads[k][n].clone()
            if n in ref:
                ref[n].grad = grads[k][n].clone()
        opt.step()
        ref_opt.step()
        checked = 0
        for n, p in named:
            if n in ref:
                torch.testing.assert_close(p.detach(), ref[n].detach(), rtol=1e-6, atol=1e-7, msg=n)
                continue
            rows = p.shape[0]
            step = ((before[n] - p.detach()).double() / lr_muon).reshape(rows, -1)
            g0, g1 = grads[0][n].double().reshape(rows, -1), grads[k][n].double().reshape(rows, -1)
            mom = (1 - beta) * g0 if k == 0 else beta * (1 - beta) * g0 + (1 - beta) * g1
            nesterov = (1 - beta) * g1 + beta * mom
            u, sv, vh = torch.linalg.svd(nesterov, full_matrices=False)
            scale = math.sqrt(max(1.0, rows / step.shape[1]))
            core = u.T @ step @ vh.T
            diag = torch.diagonal(core) / scale
            assert (core - torch.diag(torch.diagonal(core))).abs().max() < 0.02 * scale, n
            big = sv / sv.norm() > 0.01
            assert diag[big].min() > 0.6 and diag.max() < 1.25 and diag.min() > 0, (n, diag.min(), diag.max())
            checked += 1
        assert checked >= 10


def test_vae_optimizer_adamw_is_torchs():
    from mdm_dist.train.optim import build_vae_optimizer

    cfg, vae = _vae()
    cfg.train.optimizer = "adamw"
    opt = build_vae_optimizer(vae, cfg.train)
    assert type(opt) is torch.optim.AdamW and opt.param_groups[0]["weight_decay"] == 0.0
