"""mdm_dist.train pieces without processes: LR schedule, per-sample noise, EMA arithmetic, AdamW groups."""

import math

import pytest
import torch
from torch import nn

from mdm_dist.config import load_config
from mdm_dist.train.ema import EMA
from mdm_dist.train.engine import param_groups
from mdm_dist.train.noise import SampleNoise
from mdm_dist.train.schedule import lr_at


def test_lr_warmup_then_cosine_to_min():
    lrs = [lr_at(s, 1.0, 0.1, 10, 110) for s in range(120)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0  # linear warmup reaches lr at the last warmup step
    assert lrs[10] == 1.0 and math.isclose(lrs[60], 0.55) and math.isclose(lrs[110], 0.1) and lrs[119] == 0.1
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


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
