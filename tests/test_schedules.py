"""Noise schedules: monotonicity, endpoints, analytic rates vs finite differences (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from mdm_dist.config import load_config
from mdm_dist.diffusion.schedules import LogLinearNoise, VPSchedule, from_config

KINDS = ["linear", "cosine"]


@pytest.mark.parametrize("kind", KINDS)
def test_alpha_bar_monotone_and_in_range(kind):
    vp = VPSchedule(kind)
    t = torch.linspace(0, 1, 2001, dtype=torch.float64)
    a = vp.alpha_bar(t)
    assert torch.all(a[1:] <= a[:-1])  # non-increasing (constant only on the clamped end)
    assert torch.all(a[1:-10] < a[:-11])  # strictly decreasing away from t = 1
    assert torch.all((a > 0) & (a < 1))
    s2 = vp.sigma2(t)
    assert torch.all(s2 > 0)
    torch.testing.assert_close(a + s2, torch.ones_like(a), rtol=0, atol=1e-12)
    ls = vp.log_snr(t)
    assert torch.all(ls[1:] <= ls[:-1]) and torch.isfinite(ls).all()


@pytest.mark.parametrize("kind", KINDS)
def test_endpoints(kind):
    vp = VPSchedule(kind)
    assert float(vp.alpha_bar(0.0)) == pytest.approx(1.0, abs=1e-7)
    assert float(vp.sigma(0.0)) == pytest.approx(vp.sigma_min, rel=1e-6)  # > 0: the clamp
    assert vp.alpha_bar_min <= float(vp.alpha_bar(1.0)) < 1e-4  # pure noise, but > 0
    assert float(vp.sigma(1.0)) == pytest.approx(1.0, abs=1e-4)
    assert math.isfinite(float(vp.beta(1.0))) and float(vp.beta(0.0)) > 0
    if kind == "linear":  # beta(t) = b0 + t (b1 - b0), log abar(1) = -(b0 + b1) / 2
        assert float(vp.beta(0.0)) == pytest.approx(0.1)
        assert float(vp.beta(1.0)) == pytest.approx(20.0)
        assert float(torch.log(vp.alpha_bar(1.0))) == pytest.approx(-10.05, rel=1e-9)
    else:  # Nichol & Dhariwal: abar = cos^2(theta) / cos^2(theta0); clamped to abar_min at t_max < 1
        assert vp.t_max < 1.0
        assert float(vp.alpha_bar(1.0)) == pytest.approx(vp.alpha_bar_min, rel=1e-6)
        th = (0.5 + 0.008) / 1.008 * math.pi / 2
        th0 = 0.008 / 1.008 * math.pi / 2
        assert float(vp.alpha_bar(0.5)) == pytest.approx(math.cos(th) ** 2 / math.cos(th0) ** 2, rel=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_beta_is_minus_dlog_alpha_bar(kind):
    vp = VPSchedule(kind)
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    h = 1e-6
    fd = -(torch.log(vp.alpha_bar(t + h)) - torch.log(vp.alpha_bar(t - h))) / (2 * h)
    torch.testing.assert_close(vp.beta(t), fd, rtol=1e-6, atol=1e-8)


def test_dtype_follows_input_and_float_gives_float64():
    vp = VPSchedule("cosine")
    assert vp.alpha_bar(torch.rand(3)).dtype == torch.float32
    assert vp.beta(torch.rand(3, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert vp.sigma(0.3).dtype == torch.float64
    # near t = 0, sigma keeps its precision in float32 (computed in float64, no 1 - abar cancellation)
    t = torch.tensor([1e-5], dtype=torch.float32)
    assert float(vp.sigma2(t)) == pytest.approx(float(vp._sigma2_raw(t.double())), rel=1e-5)


def test_loglinear_noise():
    n = LogLinearNoise(1e-3)
    t = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
    torch.testing.assert_close(n.sigma(t), -torch.log(1 - (1 - 1e-3) * t))
    torch.testing.assert_close(n.mask_prob(t), (1 - 1e-3) * t)  # 1 - exp(-sigma) = (1 - eps) t
    assert float(n.sigma(0.0)) == 0.0 and math.isfinite(float(n.sigma(1.0)))
    tc = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    h = 1e-6
    fd = (n.sigma(tc + h) - n.sigma(tc - h)) / (2 * h)
    torch.testing.assert_close(n.dsigma(tc), fd, rtol=1e-7, atol=1e-9)


def test_from_config_and_errors():
    cfg = load_config(None, overrides=["diffusion.schedule=linear", "diffusion.beta_end=15.0", "diffusion.sedd_eps=0.01"])
    sch = from_config(cfg.diffusion)
    assert sch.vp.kind == "linear" and sch.vp.beta_end == 15.0 and sch.text.eps == 0.01
    with pytest.raises(ValueError, match="linear, cosine"):
        VPSchedule("sigmoid")
    with pytest.raises(ValueError):
        LogLinearNoise(0.0)
