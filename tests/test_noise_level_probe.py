"""benchmarks/noise_level_probe.py: its DDIM from a noised start against the exact flow of a point
mass (an oracle eps), and its plot."""

import sys

import torch
from PIL import Image

from test_train_pretrain import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

from noise_level_probe import denoise_from  # noqa: E402

from mdm_dist.diffusion.schedules import VPSchedule  # noqa: E402
from mdm_dist.viz import line_plot  # noqa: E402


def test_denoise_from_follows_the_exact_flow_of_a_point_mass():
    # data = one point z0: eps(z, t) = (z - sqrt(abar) z0) / sigma exactly, so every DDIM step keeps
    # x0_hat = z0 and the initial eps: the end is sqrt(abar(t_eps)) z0 + sigma(t_eps) eps0
    vp = VPSchedule("cosine")
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    t_eps = 1e-3
    for t0 in (0.3, 0.8, 1.0):
        def oracle(z, t):
            return (z - float(vp.alpha_bar(t)) ** 0.5 * z0) / float(vp.sigma(t))

        z = denoise_from(oracle, z0, t0, 7, t_eps, vp, torch.Generator().manual_seed(1))
        eps0 = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1), dtype=z0.dtype)
        expect = float(vp.alpha_bar(t_eps)) ** 0.5 * z0 + float(vp.sigma(t_eps)) * eps0
        torch.testing.assert_close(z, expect, rtol=1e-9, atol=1e-9)


def test_line_plot_writes_a_png(tmp_path):
    path = line_plot({"shape": ([0.0, 0.5, 0.9], [0.4, 0.7, 0.8]), "colour": ([0.0, 0.9], [0.9, 1.0])},
                     tmp_path / "p.png", xlabel="x", ylabel="y", title="t")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100
