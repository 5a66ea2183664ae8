"""Samplers: ODE solvers against the exact Gaussian flow, the absorbing text sampler against an
oracle, determinism, validity of outputs, CFG, errors, and all modes with the real tiny MDM."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mdm_dist.config import load_config
from mdm_dist.diffusion import sample
from mdm_dist.diffusion.samplers import absorbing_step, guide
from mdm_dist.diffusion.schedules import from_config



# ----------------------------------------------------------------------------------------------
# Stand-ins with the docs/model.md interfaces, small enough for exact math
# ----------------------------------------------------------------------------------------------

V, L, N, DZ = 8, 5, 6, 8  # vocab, text length, image tokens, latent width (N * DZ = 3 * 4 * 4)


class StubVAE(nn.Module):
    """d_z == vocab: text latents are one-hot ids and decode_text is the identity, so a backbone
    stand-in writes log-scores directly. Images (B, 3, 4, 4) <-> latents (B, 6, 8) by reshape."""

    num_image_tokens = N
    grid = (2, 3)

    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros((), dtype=dtype))  # fixes the sampler's dtype

    def encode_text(self, ids):
        mu = nn.functional.one_hot(ids, V).to(self.dummy.dtype)
        return mu, torch.full_like(mu, -30.0)

    def decode_text(self, z):
        return z

    def encode_image(self, x):
        mu = x.reshape(x.shape[0], N, DZ).to(self.dummy.dtype)
        return mu, torch.full_like(mu, -30.0)

    def decode_image(self, z):
        return z.reshape(z.shape[0], 3, 4, 4)

    @staticmethod
    def kl(mu, logvar):
        return 0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum(-1)

    @staticmethod
    def sample(mu, logvar, generator=None):
        return mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=generator, dtype=mu.dtype)


class GaussianOracle(nn.Module):
    """Exact eps for image latents z_0 ~ N(m, s^2 I). With z_t = sqrt(a) z_0 + sigma eps,
    p_t = N(sqrt(a) m, (a s^2 + sigma^2) I), so score = -(z - sqrt(a) m) / (a s^2 + sigma^2) and
    eps* = -sigma * score = sigma (z - sqrt(a) m) / (a s^2 + sigma^2). The text output is a
    category-dependent constant (for the CFG tests)."""

    def __init__(self, vp, m, s):
        super().__init__()
        self.vp, self.m, self.s = vp, m, s
        self.calls = 0

    def forward(self, txt, img, t_txt, t_img, category):
        self.calls += 1
        t = t_img.double()
        a = self.vp.alpha_bar(t)[:, None, None]
        sig = self.vp.sigma(t)[:, None, None]
        eps = sig * (img.double() - a.sqrt() * self.m) / (a * self.s**2 + sig**2)
        txt_out = category.to(txt.dtype)[:, None, None] * torch.linspace(-1, 1, V, dtype=txt.dtype)
        return txt_out.expand_as(txt).clone(), eps.to(img.dtype)


class VOracle(GaussianOracle):
    """The same exact flow, given as v = (eps - sigma z_t) / sqrt(abar) (image_prediction v)."""

    def forward(self, txt, img, t_txt, t_img, category):
        txt_out, eps = super().forward(txt, img, t_txt, t_img, category)
        t = t_img.double()
        a = self.vp.alpha_bar(t)[:, None, None]
        sig = self.vp.sigma(t)[:, None, None]
        return txt_out, ((eps.double() - sig * img.double()) / a.sqrt()).to(img.dtype)


class TextOracle(nn.Module):
    """Log-scores that put all the mass on ``target`` (B, L) ids (mask column included, which
    the sampler must ignore); the image output is 0."""

    def __init__(self, target, mask_id):
        super().__init__()
        self.target, self.mask_id = target, mask_id

    def forward(self, txt, img, t_txt, t_img, category):
        out = torch.full(txt.shape, -60.0, dtype=txt.dtype)
        out.scatter_(-1, self.target[..., None], 0.0)
        out[..., self.mask_id] = 10.0  # must never be produced
        return out, torch.zeros_like(img)


class StubMDM(nn.Module):
    def __init__(self, cfg, backbone, dtype=torch.float64):
        super().__init__()
        self.cfg, self.vae, self.backbone = cfg, StubVAE(dtype), backbone


def stub_cfg(*extra):
    return load_config(None, overrides=[f"vae.vocab_size={V}", f"vae.max_text_len={L}", f"vae.d_z={DZ}", *extra])


def gaussian_setup(schedule="cosine", m=0.7, s=0.5):
    cfg = stub_cfg(f"diffusion.schedule={schedule}")
    vp = from_config(cfg.diffusion).vp
    return cfg, vp, StubMDM(cfg, GaussianOracle(vp, m, s))


def exact_flow(z1, vp, m, s, t_end):
    """The PF ODE of a Gaussian keeps xi = (z_t - sqrt(a_t) m) / sqrt(a_t s^2 + sigma_t^2) fixed."""
    a1, s1 = float(vp.alpha_bar(1.0)), float(vp.sigma2(1.0))
    xi = (z1 - a1**0.5 * m) / (a1 * s**2 + s1) ** 0.5
    a, s2 = float(vp.alpha_bar(t_end)), float(vp.sigma2(t_end))
    return a**0.5 * m + (a * s**2 + s2) ** 0.5 * xi


def t2i(model, b, steps, sampler, seed=0, **kw):
    ids = torch.full((b, L), 3, dtype=torch.long)
    return sample(model, "t2i", ids=ids, steps=steps, sampler=sampler,
                  generator=torch.Generator().manual_seed(seed), **kw)


# ----------------------------------------------------------------------------------------------
# Continuous solvers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("sampler", ["dpm2", "ddim"])
def test_ode_solvers_recover_gaussian_data(schedule, sampler):
    m, s = 0.7, 0.5
    cfg, vp, model = gaussian_setup(schedule, m, s)
    z = t2i(model, 2000, 100, sampler)["img_latents"]  # 96k values: sampling error ~0.3%
    assert z.dtype == torch.float64
    assert float(z.mean()) == pytest.approx(m, rel=0.02)
    # DDIM is first order and contracts the spread of a Gaussian at every step (by
    # Cauchy-Schwarz); on the uniform t grid it is ~2.5% narrow at 100 steps, dpm2 ~0.1%
    assert float(z.std()) == pytest.approx(s, rel=0.02 if sampler == "dpm2" else 0.04)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_v_prediction_samples_the_same_flow(schedule):
    """A v-predicting model of the Gaussian data gives the eps-predicting model's samples."""
    m, s = 0.7, 0.5
    cfg_e, vp, model_e = gaussian_setup(schedule, m, s)
    cfg_v = stub_cfg(f"diffusion.schedule={schedule}", "diffusion.image_prediction=v")
    model_v = StubMDM(cfg_v, VOracle(vp, m, s))
    ze = t2i(model_e, 64, 20, "dpm2")["img_latents"]
    zv = t2i(model_v, 64, 20, "dpm2")["img_latents"]
    torch.testing.assert_close(zv, ze, rtol=1e-6, atol=1e-6)
    # read as eps instead (the bug this guards against), the same outputs give other samples
    wrong = StubMDM(cfg_e, VOracle(vp, m, s))
    assert not torch.allclose(t2i(wrong, 64, 20, "dpm2")["img_latents"], ze, atol=1e-2)


@pytest.mark.parametrize("schedule, steps", [("cosine", 10), ("linear", 20)])
def test_dpm2_is_second_order_and_beats_euler(schedule, steps):
    m, s = 0.7, 0.5
    cfg, vp, model = gaussian_setup(schedule, m, s)
    b = 64
    # the sampler's first draw is the initial image noise z_1: reproduce it for the exact flow
    z1 = torch.randn((b, N, DZ), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = exact_flow(z1, vp, m, s, cfg.diffusion.t_eps)
    err = {}
    for sampler in ("euler", "dpm2"):
        for n in (steps, 2 * steps):
            z = t2i(model, b, n, sampler)["img_latents"]
            err[sampler, n] = float((z - exact).square().mean().sqrt())
    for n in (steps, 2 * steps):
        assert err["dpm2", n] < err["euler", n] / 3
    # halving dt divides the error by ~2 (1st order) vs ~4 (2nd order). (The cosine's error
    # floors at ~3e-4 from 40 steps on: the abar clamp on [t_max, 1], see schedules.py.)
    assert err["euler", steps] / err["euler", 2 * steps] < 2.2
    assert err["dpm2", steps] / err["dpm2", 2 * steps] > 3.3


def test_t2i_from_given_latents_follows_the_exact_flow_from_t_start():
    """SDEdit (t_start < 1): the given latents are noised to t_start with the first draw, and the
    solver follows the Gaussian's exact flow from there (its invariant xi, as in exact_flow)."""
    m, s, t0 = 0.7, 0.5, 0.6
    cfg, vp, model = gaussian_setup("cosine", m, s)
    b = 64
    start = torch.randn((b, N, DZ), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    eps = torch.randn((b, N, DZ), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a0, s0 = float(vp.alpha_bar(t0)), float(vp.sigma2(t0))
    xi = (a0**0.5 * start + s0**0.5 * eps - a0**0.5 * m) / (a0 * s**2 + s0) ** 0.5
    a, s2 = float(vp.alpha_bar(cfg.diffusion.t_eps)), float(vp.sigma2(cfg.diffusion.t_eps))
    exact = a**0.5 * m + (a * s**2 + s2) ** 0.5 * xi
    z = t2i(model, b, 40, "dpm2", img_latents=start, t_start=t0)["img_latents"]
    assert float((z - exact).abs().max()) < 2e-3
    far = t2i(model, b, 40, "dpm2")["img_latents"]  # from pure noise: another end point
    assert float((far - exact).abs().max()) > 0.1
    for kw, msg in ((dict(t_start=0.5), "img_latents"), (dict(img_latents=start, t_start=0.0), "t_start must lie"),
                    (dict(img_latents=start[:, :2], t_start=0.5), "img_latents must have shape")):
        with pytest.raises(ValueError, match=msg):
            t2i(model, b, 4, "ddim", **kw)
    with pytest.raises(ValueError, match="mode='t2i'"):
        sample(model, "joint", batch_size=b, steps=4, t_start=0.5)


# ----------------------------------------------------------------------------------------------
# Absorbing text sampler
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 3, 16])
def test_text_sampler_returns_the_oracle_sequence(steps):
    cfg = stub_cfg()
    mask_id = cfg.vae.mask_id
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, V, (4, L), generator=g)
    target[target == mask_id] = 2
    model = StubMDM(cfg, TextOracle(target, mask_id))
    img = torch.zeros(4, 3, 4, 4)
    out = sample(model, "i2t", images=img, steps=steps, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out["ids"], target)
    out = sample(model, "joint", batch_size=4, steps=steps, sampler="ddim")
    assert torch.equal(out["ids"], target)


def test_absorbing_step_is_the_exact_posterior():
    mask_id, n, stay = 1, 40_000, 0.3
    p0 = torch.tensor([0.1, 0.0, 0.2, 0.05, 0.3, 0.15, 0.1, 0.1])  # p0[MASK] = 0
    logits = torch.log(p0.clamp_min(1e-30)) + 7.0  # log-scores = log p0 + const
    logits[mask_id] = 5.0  # the MASK column is ignored
    x = torch.full((1, n), mask_id)
    x[0, : n // 4] = 6  # already decoded: must stay
    out = absorbing_step(x, logits.expand(1, n, V), stay, mask_id, torch.Generator().manual_seed(0))
    assert (out[0, : n // 4] == 6).all()
    rest = out[0, n // 4:]
    m = rest.numel()
    frac_masked = (rest == mask_id).float().mean()
    assert abs(float(frac_masked) - stay) < 5 * (stay * (1 - stay) / m) ** 0.5
    freq = torch.bincount(rest[rest != mask_id], minlength=V).double()
    freq /= freq.sum()
    sd = (p0.double() * (1 - p0.double()) / (m * (1 - stay))).sqrt()
    assert ((freq - p0.double()).abs() <= 5 * sd + 1e-12).all()


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_absorbing_step_temperature_draws_from_the_tempered_posterior(temperature):
    mask_id, n = 1, 40_000
    p0 = torch.tensor([0.1, 0.0, 0.2, 0.05, 0.3, 0.15, 0.1, 0.1], dtype=torch.float64)
    logits = torch.log(p0.clamp_min(1e-30)).float() + 3.0
    x = torch.full((1, n), mask_id)
    out = absorbing_step(x, logits.expand(1, n, V), 0.0, mask_id, torch.Generator().manual_seed(1),
                         temperature=temperature)
    assert (out != mask_id).all()
    ref = p0 ** (1 / temperature)  # hand formula: p0^(1/T), renormalized (MASK has p0 = 0)
    ref /= ref.sum()
    freq = torch.bincount(out[0], minlength=V).double() / n
    sd = (ref * (1 - ref) / n).sqrt()
    assert ((freq - ref).abs() <= 5 * sd + 1e-12).all(), (freq, ref)


def test_absorbing_step_temperature_zero_is_greedy():
    mask_id = 1
    g = torch.Generator().manual_seed(0)
    log_scores = torch.randn(3, 7, V, generator=g)
    log_scores[..., mask_id] = 50.0  # the MASK column never wins, however large
    x = torch.full((3, 7), mask_id)
    x[0, 2] = 4  # decoded positions stay
    out = absorbing_step(x, log_scores, 0.0, mask_id, torch.Generator().manual_seed(5), temperature=0.0)
    expect = log_scores.clone()
    expect[..., mask_id] = float("-inf")
    expect = expect.argmax(-1)
    expect[0, 2] = 4
    assert torch.equal(out, expect)
    with pytest.raises(ValueError, match="temperature"):
        absorbing_step(x, log_scores, 0.0, mask_id, temperature=-1.0)


def test_sample_text_temperature_default_and_override():
    """The config's text_temperature is the default; 1.0 reproduces the exact sampler draw for
    draw, and greedy captions depend on the seed only through the unmasking order."""
    cfg = stub_cfg()
    model = StubMDM(cfg, GaussianOracle(from_config(cfg.diffusion).vp, 0.0, 1.0))
    base = sample(model, "joint", batch_size=16, steps=6, generator=torch.Generator().manual_seed(3))
    same = sample(model, "joint", batch_size=16, steps=6, generator=torch.Generator().manual_seed(3),
                  text_temperature=1.0)
    assert torch.equal(base["ids"], same["ids"])
    cfg.diffusion.text_temperature = 0.0
    greedy_cfg = sample(model, "joint", batch_size=16, steps=6, generator=torch.Generator().manual_seed(3))
    greedy_arg = sample(model, "joint", batch_size=16, steps=6, generator=torch.Generator().manual_seed(3),
                        text_temperature=0.0)
    assert torch.equal(greedy_cfg["ids"], greedy_arg["ids"])
    with pytest.raises(ValueError, match="text_temperature"):
        sample(model, "joint", batch_size=2, steps=2, text_temperature=-0.5)


def test_text_outputs_valid():
    cfg = stub_cfg()
    model = StubMDM(cfg, GaussianOracle(from_config(cfg.diffusion).vp, 0.0, 1.0))
    for seed in range(3):
        out = sample(model, "joint", batch_size=64, steps=8, generator=torch.Generator().manual_seed(seed))
        ids = out["ids"]
        assert ids.dtype == torch.long and ids.shape == (64, L)
        assert ((ids >= 0) & (ids < V)).all() and (ids != cfg.vae.mask_id).all()


# ----------------------------------------------------------------------------------------------
# Determinism, validity, CFG, errors
# ----------------------------------------------------------------------------------------------


def test_seeded_determinism():
    cfg, vp, model = gaussian_setup()
    a = sample(model, "joint", batch_size=8, steps=5, generator=torch.Generator().manual_seed(3))
    b = sample(model, "joint", batch_size=8, steps=5, generator=torch.Generator().manual_seed(3))
    c = sample(model, "joint", batch_size=8, steps=5, generator=torch.Generator().manual_seed(4))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["img_latents"], c["img_latents"])
    assert not torch.equal(a["ids"], c["ids"])


def test_outputs_valid_and_training_flag_restored():
    cfg, vp, model = gaussian_setup(m=3.0, s=2.0)  # latents far outside [-1, 1]
    model.train()
    out = sample(model, "joint", batch_size=6, steps=4, sampler="dpm2", category=torch.arange(6) % 4)
    assert model.training
    img = out["images"]
    assert img.shape == (6, 3, 4, 4) and torch.isfinite(img).all()
    assert img.min() >= -1 and img.max() <= 1 and (img == 1).any()
    assert out["img_latents"].shape == (6, N, DZ)
    model.eval()
    sample(model, "joint", batch_size=2, steps=1)
    assert not model.training


def test_cfg():
    torch.testing.assert_close(guide(torch.tensor(3.0), torch.tensor(1.0), 2.5), torch.tensor(6.0))
    cfg, vp, model = gaussian_setup()
    cat = torch.full((16,), 2)
    base = t2i(model, 16, 5, "dpm2", category=cat)
    model.backbone.calls = 0
    same = t2i(model, 16, 5, "dpm2", category=cat, guidance_scale=1.0)
    assert model.backbone.calls == 10  # w = 1: no unconditional pass (2 calls / dpm2 step)
    for k in base:
        assert torch.equal(base[k], same[k])
    # the text stand-in's log-scores are category * ramp (null = 4, cond = 2): guidance w with
    # log-scores s_u + w (s_c - s_u) = (4 + w (2 - 4)) ramp; w = 2 gives 0 (uniform), w = 3 gives
    # -2 ramp, so i2t captions concentrate on the lowest ids
    img = torch.zeros(512, 3, 4, 4)
    cat = torch.full((512,), 2)
    out = sample(model, "i2t", images=img, category=cat, steps=2, guidance_scale=3.0,
                 generator=torch.Generator().manual_seed(0))
    frac_low = (out["ids"] == 0).float().mean()
    ref = sample(model, "i2t", images=img, category=cat, steps=2, generator=torch.Generator().manual_seed(0))
    assert frac_low > 0.5 and float((ref["ids"] == 0).float().mean()) < 0.1


def test_caption_guidance_scale_applies_to_i2t_only():
    """diffusion.caption_guidance_scale is i2t's default scale; t2i keeps guidance_scale."""
    img = torch.zeros(256, 3, 4, 4)
    cat = torch.full((256,), 2)

    def i2t_ids(model, **kw):
        return sample(model, "i2t", images=img, category=cat, steps=2,
                      generator=torch.Generator().manual_seed(0), **kw)["ids"]

    cfg, vp, model = gaussian_setup()
    explicit = i2t_ids(model, guidance_scale=3.0)
    plain = i2t_ids(model)
    cfg_c = stub_cfg("diffusion.caption_guidance_scale=3.0")
    model_c = StubMDM(cfg_c, GaussianOracle(vp, 0.7, 0.5))
    assert torch.equal(i2t_ids(model_c), explicit) and not torch.equal(explicit, plain)
    assert torch.equal(i2t_ids(model_c, guidance_scale=1.0), plain)  # an explicit scale wins
    # t2i under the caption scale is the plain t2i (w = 1: one backbone call per dpm2 stage)
    model_c.backbone.calls = 0
    out = t2i(model_c, 16, 5, "dpm2", category=torch.full((16,), 2))
    assert model_c.backbone.calls == 10
    assert torch.equal(out["images"], t2i(model, 16, 5, "dpm2", category=torch.full((16,), 2))["images"])


def test_errors():
    cfg, vp, model = gaussian_setup()
    with pytest.raises(ValueError, match="joint, t2i, i2t"):
        sample(model, "uncond", batch_size=2)
    with pytest.raises(ValueError, match="needs ids"):
        sample(model, "t2i")
    with pytest.raises(ValueError, match="needs images"):
        sample(model, "i2t")
    with pytest.raises(ValueError, match="batch_size"):
        sample(model, "joint")
    with pytest.raises(ValueError, match="dpm2, ddim"):
        sample(model, "joint", batch_size=2, sampler="heun")
    with pytest.raises(ValueError, match="inconsistent"):
        sample(model, "t2i", ids=torch.zeros(3, L, dtype=torch.long), batch_size=2)


# ----------------------------------------------------------------------------------------------
# The real tiny MDM
# ----------------------------------------------------------------------------------------------

TINY = [
    "model.d_model=32", "model.n_layers=2", "model.headdim=16", "model.d_state=8",
    "vae.image_size=16", "vae.base_channels=8", "vae.trunk_width=32", "vae.d_z=8",
    "vae.vocab_size=32", "vae.max_text_len=6",
]


@pytest.mark.parametrize("text_process", ["absorbing", "gaussian"])
def test_all_modes_with_real_tiny_mdm(text_process):
    from mdm_dist.models.mdm import build_model

    cfg = load_config(None, overrides=[*TINY, f"diffusion.text_process={text_process}"])
    torch.manual_seed(0)
    model = build_model(cfg)
    for p in model.parameters():  # the output heads are zero-initialized: make them matter
        torch.nn.init.normal_(p, std=0.05) if p.dim() >= 2 else None
    b = 3
    ids = torch.randint(2, cfg.vae.vocab_size, (b, cfg.vae.max_text_len))
    images = torch.rand(b, 3, 16, 16) * 2 - 1
    n = model.vae.num_image_tokens
    for mode, kw in (("joint", {"batch_size": b}), ("t2i", {"ids": ids}), ("i2t", {"images": images})):
        for sampler, w in (("dpm2", 1.0), ("ddim", 2.0)):
            outs = [sample(model, mode, steps=3, sampler=sampler, guidance_scale=w,
                           generator=torch.Generator().manual_seed(0), **kw) for _ in range(2)]
            out = outs[0]
            assert out["images"].shape == (b, 3, 16, 16) and torch.isfinite(out["images"]).all()
            assert out["images"].abs().max() <= 1
            assert out["img_latents"].shape == (b, n, cfg.vae.d_z)
            assert out["ids"].shape == (b, cfg.vae.max_text_len)
            assert ((out["ids"] >= 0) & (out["ids"] < cfg.vae.vocab_size)).all()
            assert (out["ids"] != cfg.vae.mask_id).all()
            for k in out:
                assert torch.equal(out[k], outs[1][k]), (mode, sampler, k)
        if mode == "t2i":
            assert torch.equal(out["ids"], ids)


@pytest.mark.parametrize("mode, w, prediction", [("t2i", 2.0, "v"), ("joint", 1.0, "eps"), ("i2t", 1.0, "v")])
def test_self_conditioning_feeds_the_previous_estimate(mode, w, prediction):
    """model.self_condition: the first call that generates the image gets zeros, every later call
    the clean-image estimate of the call before it (guided, for both halves under guidance);
    captioning (the image is given) never self-conditions."""
    from mdm_dist.diffusion.objectives import image_x0_estimate
    from mdm_dist.models.mdm import build_model

    cfg = load_config(None, overrides=[*TINY, "model.self_condition=true", f"diffusion.image_prediction={prediction}"])
    torch.manual_seed(0)
    model = build_model(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05) if p.dim() >= 2 else None
    calls = []

    class Logged(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, img_sc=None):
            out = self.inner(*args, img_sc=img_sc)
            calls.append((args, img_sc, out))
            return out

    model.backbone = Logged(model.backbone)
    b = 2
    kw = {"t2i": {"ids": torch.randint(2, cfg.vae.vocab_size, (b, cfg.vae.max_text_len))},
          "joint": {"batch_size": b}, "i2t": {"images": torch.rand(b, 3, 16, 16) * 2 - 1}}[mode]
    sample(model, mode, steps=3, sampler="dpm2", guidance_scale=w, generator=torch.Generator().manual_seed(0), **kw)
    assert len(calls) == (3 if mode == "i2t" else 6)  # dpm2: two calls per step with an image to integrate
    vp = from_config(cfg.diffusion).vp
    prev = None
    for args, img_sc, (_, img_out) in calls:
        if mode == "i2t":
            assert img_sc is None
            continue
        expect = torch.zeros(b, *img_out.shape[1:], dtype=torch.float64) if prev is None else prev
        got = img_sc[:b]
        torch.testing.assert_close(got.double(), expect.double(), rtol=1e-5, atol=1e-5)  # float32 sampler
        if w != 1.0:
            assert torch.equal(img_sc[b:], img_sc[:b])
        pred = guide(img_out[:b], img_out[b:], w) if w != 1.0 else img_out
        prev = image_x0_estimate(pred.double(), args[1][:b].double(), args[3][:b], vp, prediction)


# ----------------------------------------------------------------------------------------------
# Best of n: text-to-image reranked by the model's own captioner
# ----------------------------------------------------------------------------------------------


class ImageReader(GaussianOracle):
    """The Gaussian oracle's image eps, and text log-scores that read the image and the caption:
    position i scores token y by ``gain * img[:, 0, y] * (i + 1) + nb * txt[:, (i + 1) % L, y]``
    (d_z == vocab, and the stub VAE's text latents are one-hot ids), so which caption is likely
    depends on the image and on the next token. Records the inputs of every call."""

    def __init__(self, vp, m, s, gain=3.0, nb=1.5):
        super().__init__(vp, m, s)
        self.gain, self.nb, self.seen = gain, nb, []

    def forward(self, txt, img, t_txt, t_img, category):
        self.seen.append(dict(txt=txt.clone(), img=img.clone(), t_txt=t_txt.clone(), t_img=t_img.clone(),
                              category=category.clone()))
        _, eps = super().forward(txt, img, t_txt, t_img, category)
        pos = torch.arange(1, L + 1, dtype=img.dtype)[None, :, None]
        out = self.gain * img[:, :1, :V] * pos + self.nb * txt.roll(-1, dims=1).to(img.dtype)
        return out.to(txt.dtype), eps


def reference_caption_score(img_latents, ids, gain, nb, mask_id):
    """sum_i log softmax_{y != MASK}(score_i)[ids_i], position i masked alone (so the next
    token, if it is not i itself, is the true one), one sample and one position at a time."""
    out = []
    for z, row in zip(img_latents.double(), ids.tolist()):
        total = 0.0
        for i, tok in enumerate(row):
            x = list(row)
            x[i] = mask_id
            nxt = x[(i + 1) % L]
            s = [gain * float(z[0, y]) * (i + 1) + (nb if y == nxt else 0.0) for y in range(V)]
            norm = torch.logsumexp(torch.tensor([s[y] for y in range(V) if y != mask_id], dtype=torch.float64), 0)
            total += s[tok] - float(norm)
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def reader_setup():
    cfg = stub_cfg()
    vp = from_config(cfg.diffusion).vp
    return cfg, StubMDM(cfg, ImageReader(vp, 0.3, 0.8))


def test_one_token_time_masks_one_token_in_l():
    from mdm_dist.diffusion.samplers import one_token_time

    d = stub_cfg().diffusion
    tnoise = from_config(d).text
    for length in (5, 12, 77):
        t = one_token_time(d, length)
        assert float(tnoise.mask_prob(t)) == pytest.approx(1.0 / length, rel=1e-9)
        assert t == pytest.approx(1.0 / length / (1 - tnoise.eps), rel=1e-9)  # log-linear: mask_prob = (1 - eps) t


def test_caption_pseudo_log_likelihood_reads_the_image_one_masked_word_at_a_time():
    from mdm_dist.diffusion import caption_pseudo_log_likelihood
    from mdm_dist.diffusion.samplers import one_token_time

    cfg, model = reader_setup()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, N, DZ, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (4, L), generator=g)
    ids[ids == cfg.vae.mask_id] = (cfg.vae.mask_id + 1) % V  # a caption never holds MASK
    model.train()
    got = caption_pseudo_log_likelihood(model, z, ids)
    assert model.training  # restored
    bb = model.backbone
    want = reference_caption_score(z, ids, bb.gain, bb.nb, cfg.vae.mask_id)
    assert got.dtype == torch.float64 and torch.allclose(got, want, rtol=1e-12, atol=1e-10), (got, want)
    assert len(bb.seen) == L
    t1 = one_token_time(cfg.diffusion, L)
    for i, seen in enumerate(bb.seen):  # position i masked alone, clean image at t = 0, text at t1
        masked = ids.clone()
        masked[:, i] = cfg.vae.mask_id
        assert torch.equal(seen["txt"].argmax(-1), masked) and torch.equal(seen["img"], z)
        assert torch.allclose(seen["t_txt"], torch.full((4,), t1)) and (seen["t_img"] == 0).all()
        assert (seen["category"] == 0).all()
    # a log-probability: <= 0; the neighbour term makes it differ from scoring every word with
    # the whole caption masked
    assert (got <= 0).all()
    assert not torch.allclose(got, reference_caption_score(z, ids, bb.gain, 0.0, cfg.vae.mask_id))


def test_best_of_keeps_the_candidate_the_captioner_prefers():
    from mdm_dist.diffusion import sample_best_of

    cfg, model = reader_setup()
    b, n = 3, 5
    ids = torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, 1, 1], [2, 2, 2, 2, 2]])
    ids[ids == cfg.vae.mask_id] = (cfg.vae.mask_id + 1) % V  # a caption never holds MASK
    out = sample_best_of(model, ids, n, steps=4, sampler="ddim", generator=torch.Generator().manual_seed(3))
    # the candidates: the same draws as one plain t2i call on every caption repeated n times
    cands = sample(model, "t2i", ids=ids.repeat_interleave(n, 0), steps=4, sampler="ddim",
                   generator=torch.Generator().manual_seed(3))
    want = reference_caption_score(cands["img_latents"], cands["ids"], model.backbone.gain, model.backbone.nb,
                                   cfg.vae.mask_id).view(b, n)
    assert torch.allclose(out["scores"], want, rtol=1e-12, atol=1e-10)
    assert torch.equal(out["chosen"], want.argmax(1))
    assert len(set(out["chosen"].tolist())) > 1  # the draws differ, so do the choices here
    for j in range(b):
        k = j * n + int(want[j].argmax())
        assert torch.equal(out["img_latents"][j], cands["img_latents"][k])
        assert torch.equal(out["images"][j], cands["images"][k])
    assert torch.equal(out["ids"], ids)
    assert torch.equal(out["candidate_latents"].reshape(b * n, N, DZ), cands["img_latents"])
    # best of 1 is plain sampling, draw for draw
    one = sample_best_of(model, ids, 1, steps=4, sampler="ddim", generator=torch.Generator().manual_seed(3))
    plain = sample(model, "t2i", ids=ids, steps=4, sampler="ddim", generator=torch.Generator().manual_seed(3))
    assert torch.equal(one["img_latents"], plain["img_latents"]) and (one["chosen"] == 0).all()


def test_best_of_errors():
    from mdm_dist.diffusion import caption_pseudo_log_likelihood, sample_best_of

    cfg, model = reader_setup()
    ids = torch.zeros(2, L, dtype=torch.long)
    with pytest.raises(ValueError, match="best-of n must be >= 1"):
        sample_best_of(model, ids, 0)
    with pytest.raises(ValueError, match="img_latents has 3 rows, ids 2"):
        caption_pseudo_log_likelihood(model, torch.zeros(3, N, DZ, dtype=torch.float64), ids)
    gcfg = stub_cfg("diffusion.text_process=gaussian")
    with pytest.raises(ValueError, match="needs diffusion.text_process: absorbing"):
        caption_pseudo_log_likelihood(StubMDM(gcfg, model.backbone), torch.zeros(2, N, DZ, dtype=torch.float64), ids)


def test_best_of_with_real_tiny_mdm_scores_each_candidate_as_alone():
    """The real model: a candidate's score does not depend on the batch it is scored in."""
    from mdm_dist.diffusion import caption_pseudo_log_likelihood, sample_best_of
    from mdm_dist.models.mdm import build_model

    cfg = load_config(None, overrides=TINY)
    torch.manual_seed(0)
    model = build_model(cfg)
    for p in model.parameters():  # the output heads are zero-initialized: make them matter
        torch.nn.init.normal_(p, std=0.05) if p.dim() >= 2 else None
    ids = torch.randint(2, cfg.vae.vocab_size, (2, cfg.vae.max_text_len))
    out = sample_best_of(model, ids, 3, steps=2, generator=torch.Generator().manual_seed(0))
    assert out["images"].shape == (2, 3, 16, 16) and out["scores"].shape == (2, 3)
    assert torch.isfinite(out["scores"]).all() and (out["scores"] <= 0).all()
    alone = torch.stack([caption_pseudo_log_likelihood(model, out["img_latents"][j:j + 1], ids[j:j + 1])[0]
                         for j in range(2)])
    assert torch.allclose(alone, out["scores"].gather(1, out["chosen"][:, None])[:, 0], rtol=1e-5, atol=1e-4)
