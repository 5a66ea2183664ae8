"""Objectives: score entropy against a brute-force formula and at its optimum, the absorbing
forward process, the DSM weight, and mdm_loss on the real tiny MDM (terms, gradients, tasks,
condition dropout, determinism)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mdm_dist.config import load_config
from mdm_dist.diffusion import absorb, draw_tasks, dsm_image_weight, mdm_loss, score_entropy_absorbing
from mdm_dist.diffusion.objectives import absorbing_log_scores
from mdm_dist.diffusion.schedules import LogLinearNoise, VPSchedule, from_config

MASK = 1



# ----------------------------------------------------------------------------------------------
# Score entropy
# ----------------------------------------------------------------------------------------------


def brute_force_se(s, x0, xt, sigma, mask_id):
    """The spec's formula, literally, in float64 loops."""
    B, L, V = s.shape
    out = torch.zeros(B, L, dtype=torch.float64)
    for b in range(B):
        r = 1.0 / (math.exp(float(sigma[b])) - 1.0)
        for i in range(L):
            if int(xt[b, i]) != mask_id:
                continue
            total = sum(math.exp(float(s[b, i, y])) for y in range(V) if y != mask_id)
            out[b, i] = total - r * float(s[b, i, int(x0[b, i])]) + r * (math.log(r) - 1.0)
    return out


def random_case(B=3, L=5, V=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, L, V, generator=g, dtype=dtype) * 2
    x0 = torch.randint(0, V - 1, (B, L), generator=g)
    x0[x0 >= MASK] += 1  # never MASK
    xt = torch.where(torch.rand(B, L, generator=g) < 0.6, torch.full_like(x0, MASK), x0)
    sigma = torch.rand(B, generator=g, dtype=torch.float64) * 3 + 0.01
    return s, x0, xt, sigma


@pytest.mark.parametrize("seed", range(3))
def test_score_entropy_matches_brute_force_and_is_nonnegative(seed):
    s, x0, xt, sigma = random_case(seed=seed)
    got = score_entropy_absorbing(s, x0, xt, sigma, MASK)
    ref = brute_force_se(s, x0, xt, sigma, MASK)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    assert (got >= 0).all()
    assert (got[xt != MASK] == 0).all() and (got[xt == MASK] > 0).all()
    # float32 input: computed in float32, close to the float64 reference
    got32 = score_entropy_absorbing(s.float(), x0, xt, sigma.float(), MASK)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), ref, rtol=1e-4, atol=1e-4)


def test_score_entropy_ignores_the_mask_column():
    s, x0, xt, sigma = random_case()
    s2 = s.clone()
    s2[..., MASK] = 50.0
    torch.testing.assert_close(score_entropy_absorbing(s2, x0, xt, sigma, MASK),
                               score_entropy_absorbing(s, x0, xt, sigma, MASK))


def test_score_entropy_optimum_is_zero_with_zero_gradient():
    s, x0, xt, sigma = random_case()
    log_r = -torch.log(torch.expm1(sigma))  # log r, r = 1 / (e^sigma - 1), rounded as the loss does
    opt = torch.full_like(s, float("-inf"))
    opt.scatter_(-1, x0[..., None], 0.0)
    opt = opt + log_r[:, None, None]  # s_y0 = log r, others -inf
    opt.requires_grad_(True)
    loss = score_entropy_absorbing(opt, x0, xt, sigma, MASK)
    assert (loss == 0).all()
    loss.sum().backward()
    assert torch.isfinite(opt.grad).all() and (opt.grad == 0).all()
    # a perturbation of the optimum (finite logits) increases the loss
    near = torch.where(torch.isinf(opt.detach()), torch.full_like(s, -30.0), opt.detach())
    for delta in (0.1, -0.1):
        bumped = near.clone()
        bumped.scatter_add_(-1, x0[..., None], torch.full_like(x0[..., None], delta, dtype=s.dtype))
        assert (score_entropy_absorbing(bumped, x0, xt, sigma, MASK)[xt == MASK] > 0).all()


def test_score_entropy_safe_when_sigma_is_zero():
    """Samples whose text is a clean condition have sigma = 0 and nothing masked."""
    s, x0, xt, sigma = random_case()
    xt[0] = x0[0]
    sigma[0] = 0.0
    s.requires_grad_(True)
    loss = score_entropy_absorbing(s, x0, xt, sigma, MASK)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and (loss[0] == 0).all()
    assert torch.isfinite(s.grad).all() and (s.grad[0] == 0).all()


# ----------------------------------------------------------------------------------------------
# Forward processes and weights
# ----------------------------------------------------------------------------------------------


def test_absorbing_mask_frequency_matches_one_minus_exp_minus_sigma():
    noise = LogLinearNoise(1e-3)
    t = torch.tensor([0.0, 0.05, 0.3, 0.7, 1.0])
    sigma = noise.sigma(t)
    n = 40_000
    ids = torch.randint(2, 100, (5, n), generator=torch.Generator().manual_seed(0))
    xt = absorb(ids, sigma, MASK, torch.rand(5, n, generator=torch.Generator().manual_seed(1)))
    freq = (xt == MASK).double().mean(1)
    p = 1 - torch.exp(-sigma.double())
    tol = 5 * torch.sqrt(p * (1 - p) / n) + 1e-12  # 5 binomial standard deviations
    assert ((freq - p).abs() <= tol).all(), (freq, p)
    assert torch.equal(xt[xt != MASK], ids[xt != MASK])  # unmasked tokens are untouched


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_dsm_weight(kind):
    vp = VPSchedule(kind)
    t = torch.cat([torch.tensor([0.0, 1e-6, 1e-3]), torch.linspace(0.01, 1, 100)])
    w = dsm_image_weight(t, vp, "elbo", 5.0)
    assert torch.isfinite(w).all() and (w > 0).all() and (w <= 5.0).all()
    assert float(dsm_image_weight(torch.tensor([0.5]), vp, "elbo", 5.0)) == pytest.approx(1.0, rel=1e-6)
    assert float(w[2]) == 5.0  # clamped near t = 0 (unclamped ~ 1 / t)
    # unclamped, it is -d log SNR / dt normalized at 0.5
    h = 1e-6
    tc = torch.tensor([0.3, 0.6], dtype=torch.float64)
    dlog = -(vp.log_snr(tc + h) - vp.log_snr(tc - h)) / (2 * h)
    ref = dlog / (-(vp.log_snr(0.5 + h) - vp.log_snr(0.5 - h)) / (2 * h))
    torch.testing.assert_close(dsm_image_weight(tc, vp, "elbo", 1e9), ref.clamp(max=1e9), rtol=1e-5, atol=0)
    assert torch.equal(dsm_image_weight(t, vp, "eps", 5.0), torch.ones_like(t))
    torch.testing.assert_close(dsm_image_weight(tc, vp, "v", 1e9), 1.0 / vp.alpha_bar(tc), rtol=1e-6, atol=0)
    assert float(dsm_image_weight(torch.tensor([1.0]), vp, "v", 5.0)) <= 5.0
    with pytest.raises(ValueError, match="elbo, eps, v"):
        dsm_image_weight(t, vp, "snr", 5.0)


def test_draw_tasks_follows_the_config():
    cfg = load_config(None, overrides=["diffusion.task_probs={joint: 0.5, t2i: 0.3, i2t: 0.2}", "diffusion.p_uncond=0.1"])
    n = 50_000
    d = draw_tasks(cfg, n, "cpu", torch.Generator().manual_seed(0))
    freq = torch.bincount(d["task"], minlength=3).double() / n
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), atol=0.01, rtol=0)
    assert abs(float(d["drop"].double().mean()) - 0.1) < 0.01
    for k in ("t_txt", "t_img"):
        assert d[k].min() >= cfg.diffusion.t_eps and d[k].max() <= 1.0
        assert abs(float(d[k].mean()) - 0.5) < 0.01
    only = load_config(None, overrides=["diffusion.task_probs={t2i: 1.0}"])
    assert (draw_tasks(only, 100, "cpu")["task"] == 1).all()


@pytest.mark.parametrize("modality,k", [("image", 2.0), ("image", 3.0), ("image", 0.5), ("text", 2.0)])
def test_time_power_gives_the_stated_density(modality, k):
    """t = t_eps + (1 - t_eps) u ** (1 / k): the empirical CDF against the hand formula
    P(t <= x) = ((x - t_eps) / (1 - t_eps)) ** k (Kolmogorov-Smirnov distance), the mean against
    t_eps + (1 - t_eps) k / (k + 1); the other modality's times stay uniform."""
    key, other = ("t_img", "t_txt") if modality == "image" else ("t_txt", "t_img")
    cfg = load_config(None, overrides=[f"diffusion.{modality}_time_power={k}"])
    te, n = cfg.diffusion.t_eps, 40_000
    d = draw_tasks(cfg, n, "cpu", torch.Generator().manual_seed(1))
    t = d[key].double().sort().values
    assert t.min() >= te and t.max() <= 1.0
    cdf = ((t - te) / (1 - te)).clamp(0, 1) ** k
    emp = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert float((emp - cdf).abs().max()) < 1.63 / n ** 0.5  # KS critical value at 1%
    assert abs(float(t.mean()) - (te + (1 - te) * k / (k + 1))) < 0.01
    assert abs(float(d[other].double().mean()) - 0.5) < 0.01
    # the same uniforms as k = 1 (the power only maps them): the draws stay aligned across settings
    u = draw_tasks(load_config(None), n, "cpu", torch.Generator().manual_seed(1))[key].double()
    torch.testing.assert_close(d[key].double(), te + (1 - te) * ((u - te) / (1 - te)).clamp(0, 1) ** (1 / k),
                               atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# mdm_loss on the real tiny MDM
# ----------------------------------------------------------------------------------------------

TINY = [
    "model.d_model=32", "model.n_layers=2", "model.headdim=16", "model.d_state=8",
    "vae.image_size=16", "vae.base_channels=8", "vae.trunk_width=32", "vae.d_z=8",
    "vae.vocab_size=32", "vae.max_text_len=6",
]
B = 6


def tiny(*overrides, seed=0):
    from mdm_dist.models.mdm import build_model

    cfg = load_config(None, overrides=[*TINY, *overrides])
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():  # the output heads are zero-initialized; give them weights so every
        for head in (model.backbone.txt_out, model.backbone.img_out):  # parameter gets a gradient
            nn.init.normal_(head.weight, std=0.1)
    return cfg, model


def make_batch(cfg, seed=0, pixels=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, cfg.vae.vocab_size, (B, cfg.vae.max_text_len), generator=g)
    batch = {"ids": ids, "category": torch.randint(0, cfg.model.num_categories, (B,), generator=g)}
    if pixels:
        batch["images"] = torch.rand(B, 3, cfg.vae.image_size, cfg.vae.image_size, generator=g) * 2 - 1
    else:
        n = (cfg.vae.image_size // 4) ** 2  # channel_mult [1, 2] -> /2, patch 2
        batch["img_mu"] = torch.randn(B, n, cfg.vae.d_z, generator=g)
        batch["img_logvar"] = torch.full((B, n, cfg.vae.d_z), -4.0)
    return batch


def loss_of(model, batch, cfg, seed=0, **kw):
    return mdm_loss(model, batch, cfg, generator=torch.Generator().manual_seed(seed), **kw)


ALL = {"task": ["joint", "t2i", "i2t", "joint", "t2i", "i2t"]}


@pytest.mark.parametrize("text_process, objective", [("absorbing", "se"), ("gaussian", "se"), ("gaussian", "ddpm")])
def test_mdm_loss_terms_finite_and_gradients_reach_every_parameter(text_process, objective):
    cfg, model = tiny(f"diffusion.text_process={text_process}", f"diffusion.objective={objective}")
    batch = make_batch(cfg)
    out = loss_of(model, batch, cfg, fixed=ALL)
    assert set(out) == {"rec_img", "rec_txt", "kl", "se_txt", "se_img", "total"}
    for k, v in out.items():
        assert v.dim() == 0 and v.dtype == torch.float32 and torch.isfinite(v), k
    d = cfg.diffusion
    expect = (d.lambda_rec_img * out["rec_img"] + d.lambda_rec_txt * out["rec_txt"]
              + cfg.vae.beta_kl * out["kl"] + d.lambda_se * (out["se_txt"] + out["se_img"]))
    torch.testing.assert_close(out["total"], expect)
    out["total"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, missing


def test_objective_ddpm_differs_from_se():
    cfg_se, model = tiny("diffusion.text_process=gaussian", "diffusion.objective=se")
    cfg_dd = load_config(None, overrides=[*TINY, "diffusion.text_process=gaussian", "diffusion.objective=ddpm"])
    batch = make_batch(cfg_se)
    a, b = loss_of(model, batch, cfg_se, fixed=ALL), loss_of(model, batch, cfg_dd, fixed=ALL)
    for k in ("rec_img", "rec_txt", "kl"):  # same draws: the VAE terms agree
        torch.testing.assert_close(a[k], b[k])
    assert not torch.allclose(a["se_txt"], b["se_txt"]) and not torch.allclose(a["se_img"], b["se_img"])
    # and under ddpm the image term is the plain eps MSE, under se the weighted one
    t = torch.full((B,), 0.02)
    a = loss_of(model, batch, cfg_se, fixed={"task": "t2i", "t_img": t})
    b = loss_of(model, batch, cfg_dd, fixed={"task": "t2i", "t_img": t})
    w = dsm_image_weight(t, from_config(cfg_se.diffusion).vp, "elbo", cfg_se.diffusion.max_image_weight)
    torch.testing.assert_close(a["se_img"], w[0] * b["se_img"])


def test_tasks_decide_which_terms_exist():
    cfg, model = tiny()
    batch = make_batch(cfg)
    out = loss_of(model, batch, cfg, fixed={"task": "t2i"})
    assert "se_txt" not in out and "se_img" in out
    out["total"].backward()  # the omitted term still leaves every parameter in the graph
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    out = loss_of(model, batch, cfg, fixed={"task": "i2t"})
    assert "se_img" not in out and "se_txt" in out
    out = loss_of(model, make_batch(cfg, pixels=False), cfg)
    assert "rec_img" not in out and {"rec_txt", "kl", "total"} <= set(out)


class Recorder(nn.Module):
    """Wraps the real backbone and keeps its inputs and outputs."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.seen = None

    def forward(self, *args):
        out = self.inner(*args)
        self.seen = (args, out)
        return out


@pytest.mark.parametrize("text_score", ["conditional", "free"])
def test_conditions_dropout_and_text_normalization(text_score):
    cfg, model = tiny(f"diffusion.text_score={text_score}")
    model.backbone = Recorder(model.backbone)
    batch = make_batch(cfg)
    L, mask_id, null = cfg.vae.max_text_len, cfg.vae.mask_id, cfg.model.num_categories
    g = torch.Generator().manual_seed(5)
    n = model.vae.num_image_tokens
    fixed = {
        "task": ["joint", "t2i", "i2t", "t2i", "i2t", "joint"],
        "drop": torch.tensor([False, False, False, True, True, True]),
        "t_txt": torch.rand(B, generator=g) * 0.9 + 0.05,
        "t_img": torch.rand(B, generator=g) * 0.9 + 0.05,
        "mask_noise": torch.rand(B, L, generator=g),
        "eps_img": torch.randn(B, n, cfg.vae.d_z, generator=g),
    }
    out = loss_of(model, batch, cfg, fixed=fixed)
    (txt, img, t_txt, t_img, cat), (txt_out, img_out) = model.backbone.seen
    assert torch.equal(t_txt[[1]], torch.zeros(1)) and torch.equal(t_img[[2]], torch.zeros(1))  # clean conditions
    assert float(t_txt[3]) == 1.0 and float(t_img[4]) == 1.0  # dropped conditions: pure noise
    assert torch.equal(img[4], fixed["eps_img"][4])
    torch.testing.assert_close(t_txt[[0, 2, 4, 5]], fixed["t_txt"][[0, 2, 4, 5]])
    assert torch.equal(cat[3:], torch.full((3,), null)) and torch.equal(cat[:3], batch["category"][:3])
    # the text term, recomputed: dsigma(t) / L * sum of the masked positions' score entropy,
    # averaged over the samples whose text is generated (joint and i2t: 0, 2, 4, 5)
    sched = from_config(cfg.diffusion)
    tt = torch.where(torch.tensor([False, True, False, True, False, False]), torch.tensor([0.0, 0, 0, 1, 0, 0]), fixed["t_txt"])
    sigma = sched.text.sigma(tt)
    xt = absorb(batch["ids"], sigma, mask_id, fixed["mask_noise"])
    xt[3] = mask_id  # the dropped t2i text condition is all-MASK
    assert (xt[1] == batch["ids"][1]).all()
    logits = model.vae.decode_text(txt_out).double()
    if text_score == "free":  # the logits are the log-scores (SEDD)
        se = score_entropy_absorbing(logits, batch["ids"], xt, sigma, mask_id)
    else:  # log-scores log p + log r: the score entropy is r * (-log p(y0)) at masked positions
        logits[..., mask_id] = float("-inf")
        logp = logits.log_softmax(-1).gather(-1, batch["ids"][..., None]).squeeze(-1)
        r = 1.0 / torch.expm1(sigma.double().clamp_min(1e-12))[:, None]
        se = torch.where(xt == mask_id, -r * logp, torch.zeros_like(logp))
    per = sched.text.dsigma(tt) * se.sum(-1) / L
    torch.testing.assert_close(out["se_txt"], per[[0, 2, 4, 5]].mean().float())


def test_conditional_log_scores_carry_the_exact_mass():
    """log_softmax(logits) + log r: sum_y exp(s_y) over y != MASK is r exactly, so the score
    entropy is r * (-log p(y0)); sigma = 0 stays finite."""
    s, x0, xt, sigma = random_case(seed=4)
    ls = absorbing_log_scores(s, sigma, MASK)
    r = 1.0 / torch.expm1(sigma)
    keep = torch.ones(s.shape[-1], dtype=torch.bool)
    keep[MASK] = False
    torch.testing.assert_close(ls[..., keep].exp().sum(-1), r[:, None].expand(x0.shape), rtol=1e-10, atol=0)
    assert torch.isinf(ls[..., MASK]).all()
    se = score_entropy_absorbing(ls, x0, xt, sigma, MASK)
    p = torch.softmax(s[..., keep], -1)
    idx = torch.where(x0 > MASK, x0 - 1, x0)  # column of x0 among the non-MASK entries
    ref = torch.where(xt == MASK, -r[:, None] * p.gather(-1, idx[..., None]).squeeze(-1).log(), torch.zeros_like(se))
    torch.testing.assert_close(se, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(se, brute_force_se(ls, x0, xt, sigma, MASK), rtol=1e-9, atol=1e-9)
    z = absorbing_log_scores(s, torch.zeros_like(sigma), MASK)
    assert torch.isfinite(z[..., keep]).all()


@pytest.mark.parametrize("weighting", ["v", "elbo"])
def test_v_prediction_image_term(weighting):
    """image_prediction v: the head's output is v = sqrt(abar) eps - sigma z0; the term is the
    v-MSE (weighting v) or the weighted eps-MSE of eps_hat = sqrt(abar) v_hat + sigma z_t."""
    cfg, model = tiny("diffusion.image_prediction=v", f"diffusion.image_weighting={weighting}")
    model.backbone = Recorder(model.backbone)
    nn.init.normal_(model.backbone.inner.img_out.weight, std=0.3)  # a non-zero prediction
    batch = make_batch(cfg, pixels=False)
    g = torch.Generator().manual_seed(2)
    n = model.vae.num_image_tokens
    t = torch.rand(B, generator=g) * 0.98 + 0.01
    eps = torch.randn(B, n, cfg.vae.d_z, generator=g)
    out = loss_of(model, batch, cfg, fixed={"task": "t2i", "t_img": t, "eps_img": eps})
    (_, z_t, _, t_img, _), (_, v_hat) = model.backbone.seen
    vp = from_config(cfg.diffusion).vp
    a = vp.alpha_bar(t.double()).sqrt()[:, None, None]
    sg = vp.sigma(t.double())[:, None, None]
    z0 = (z_t.double() - sg * eps.double()) / a  # the clean latents the loss drew
    v = a * eps.double() - sg * z0
    if weighting == "v":
        per = (v_hat.double() - v).square().mean((1, 2))
    else:
        eps_hat = a * v_hat.double() + sg * z_t.double()
        w = dsm_image_weight(t, vp, "elbo", cfg.diffusion.max_image_weight).double()
        per = w * (eps_hat - eps.double()).square().mean((1, 2))
    torch.testing.assert_close(out["se_img"].double(), per.mean(), rtol=1e-4, atol=1e-6)


def test_fixed_noise_is_deterministic():
    cfg, model = tiny()
    batch = make_batch(cfg)
    a, b, c = loss_of(model, batch, cfg, seed=1), loss_of(model, batch, cfg, seed=1), loss_of(model, batch, cfg, seed=2)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["total"], c["total"])


def test_errors():
    cfg, model = tiny()
    batch = make_batch(cfg)
    bad = dict(batch, ids=batch["ids"].clone())
    bad["ids"][0, 0] = cfg.vae.mask_id
    with pytest.raises(ValueError, match="MASK"):
        mdm_loss(model, bad, cfg)
    with pytest.raises(ValueError, match="img_mu"):
        mdm_loss(model, {"ids": batch["ids"]}, cfg)


class CallLog(nn.Module):
    """Wraps the real backbone and keeps every call's inputs (keyword img_sc too) and outputs."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = []

    def forward(self, *args, img_sc=None, img_keep=None):
        out = self.inner(*args, img_sc=img_sc, img_keep=img_keep)
        self.calls.append((args, img_sc, out, torch.is_grad_enabled(), img_keep))
        return out


@pytest.mark.parametrize("prediction", ["v", "eps"])
def test_self_conditioning_feeds_the_models_own_estimate(prediction):
    """model.self_condition: a first no-grad call makes the clean-image estimate; the second call
    gets it exactly where sc < 0.5 and the image is generated, zeros elsewhere (i2t, sc >= 0.5)."""
    from mdm_dist.diffusion.objectives import image_x0_estimate

    cfg, model = tiny("model.self_condition=true", f"diffusion.image_prediction={prediction}")
    nn.init.normal_(model.backbone.img_sc_in.weight, std=0.1)  # zero-initialized: make it matter
    model.backbone = CallLog(model.backbone)
    batch = make_batch(cfg, pixels=False)
    sc = torch.tensor([0.1, 0.9, 0.2, 0.3, 0.7, 0.4])  # tasks joint t2i i2t joint t2i i2t
    out = loss_of(model, batch, cfg, fixed={**ALL, "sc": sc})
    (args1, sc1, (_, img1), grad1, _), (args2, sc2, _, grad2, _) = model.backbone.calls
    assert sc1 is None and not grad1 and grad2
    for a, b in zip(args1, args2):
        assert torch.equal(a, b)
    z_img, t_img = args1[1], args1[3]
    vp = from_config(cfg.diffusion).vp
    est = image_x0_estimate(img1.float(), z_img.float(), t_img, vp, prediction)
    use = torch.tensor([True, False, False, True, False, False])
    torch.testing.assert_close(sc2[use], est[use])
    assert torch.equal(sc2[~use], torch.zeros_like(sc2[~use]))
    if prediction == "v":  # x0 = sqrt(abar) z_t - sigma v, by hand in float64
        a = vp.alpha_bar(t_img.double())[:, None, None]
        ref = a.sqrt() * z_img.double() - (1 - a).sqrt() * img1.double()
        torch.testing.assert_close(est.double(), ref, rtol=1e-5, atol=1e-6)
    out["total"].backward()
    assert model.backbone.inner.img_sc_in.weight.grad.abs().sum() > 0


def test_self_conditioning_starts_as_a_no_op():
    """Zero-initialized, the self-conditioning input changes nothing: the loss equals that of the
    same weights without it, under the same draws (its own draw comes after all the others)."""
    cfg_sc, with_sc = tiny("model.self_condition=true")
    cfg, plain = tiny()
    missing, unexpected = plain.load_state_dict(with_sc.state_dict(), strict=False)
    assert not missing and all(k.startswith("backbone.img_sc_in.") for k in unexpected) and unexpected
    batch = make_batch(cfg)
    a, b = loss_of(with_sc, batch, cfg_sc, seed=3), loss_of(plain, batch, cfg, seed=3)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="self_condition"):
        plain.backbone(torch.zeros(1, 6, 8), torch.zeros(1, 16, 8), torch.zeros(1), torch.zeros(1),
                       torch.zeros(1, dtype=torch.long), img_sc=torch.zeros(1, 16, 8))


# ----------------------------------------------------------------------------------------------
# Masked image tokens (model.image_mask_prob, MDT)
# ----------------------------------------------------------------------------------------------


def test_image_masking_hides_exactly_the_drawn_tokens_of_generated_images():
    """img_keep is False exactly where the sample's image is generated, its img_mask draw is below
    image_mask_prob and its token's draw below image_mask_ratio; the self-conditioning call sees
    the same mask; the loss still covers every token (a hand-made v-MSE over all of them)."""
    cfg, model = tiny("model.image_mask_prob=0.6", "model.image_mask_ratio=0.25", "model.self_condition=true",
                      "diffusion.image_prediction=v", "diffusion.image_weighting=v")
    model.backbone = CallLog(model.backbone)
    batch = make_batch(cfg, pixels=False)
    n = batch["img_mu"].shape[1]
    g = torch.Generator().manual_seed(4)
    u_m = torch.tensor([0.1, 0.5, 0.0, 0.7, 0.59, 0.3])  # tasks joint t2i i2t joint t2i i2t
    u_tok = torch.rand(B, n, generator=g)
    eps = torch.randn(B, n, cfg.vae.d_z, generator=g)
    t_img = torch.full((B,), 0.6)
    out = loss_of(model, batch, cfg, fixed={**ALL, "img_mask": u_m, "img_mask_tokens": u_tok, "eps_img": eps,
                                           "t_img": t_img, "drop": torch.zeros(B, dtype=torch.bool)})
    (_, _, _, _, keep1), (args2, _, (_, img_out), _, keep2) = model.backbone.calls
    masked_sample = torch.tensor([True, True, False, False, True, False])
    expect = ~(masked_sample[:, None] & (u_tok < 0.25))
    assert torch.equal(keep1, expect) and torch.equal(keep2, expect)
    assert (~expect).sum() > 0
    # the image term: v-MSE over every token of the generated images (joint, t2i), masked or not
    vp = from_config(cfg.diffusion).vp
    z_t = args2[1].float()  # z0 is the VAE's sample of img_mu (logvar -4): recovered from z_t and eps
    a, s_ = vp.alpha_bar(t_img.double()).sqrt().float()[:, None, None], vp.sigma(t_img.double()).float()[:, None, None]
    z0 = (z_t - s_ * eps) / a
    v = a * eps - s_ * z0
    per = (img_out.float() - v).square().mean(dim=(1, 2))
    active = torch.tensor([True, True, False, True, True, False])
    torch.testing.assert_close(out["se_img"], per[active].mean(), rtol=1e-5, atol=1e-6)


def test_hidden_image_tokens_do_not_see_their_latents():
    """A hidden token's latent cannot reach any output; a visible token's does; all-visible equals
    no img_keep; img_keep on a backbone without masking is an error naming the config key."""
    cfg, model = tiny("model.image_mask_prob=0.5")
    bb = model.backbone
    g = torch.Generator().manual_seed(0)
    n = bb.layout.grid_h * bb.layout.grid_w
    txt, img = torch.randn(2, 6, 8, generator=g), torch.randn(2, n, 8, generator=g)
    args = (txt, img, torch.rand(2, generator=g), torch.rand(2, generator=g), torch.zeros(2, dtype=torch.long))
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[0, 3] = keep[1, 0] = False
    with torch.no_grad():
        base = bb(*args, img_keep=keep)
        img2 = img.clone()
        img2[0, 3] += 5.0
        img2[1, 0] -= 5.0
        hidden_changed = bb(txt, img2, *args[2:], img_keep=keep)
        img3 = img.clone()
        img3[0, 4] += 5.0
        visible_changed = bb(txt, img3, *args[2:], img_keep=keep)
        for a, b in zip(base, hidden_changed):
            assert torch.equal(a, b)
        assert not torch.allclose(base[1], visible_changed[1])
        for a, b in zip(bb(*args), bb(*args, img_keep=torch.ones_like(keep))):
            assert torch.equal(a, b)
    _, plain = tiny()
    with pytest.raises(ValueError, match="image_mask_prob"):
        plain.backbone(*args, img_keep=keep)


def test_image_masking_off_draws_nothing_and_trains_the_mask_embedding_when_on():
    """image_mask_prob = 0 builds no mask embedding and passes no img_keep; > 0 gives the mask
    embedding a gradient; every masked-token draw comes after the others (same t, eps, tasks)."""
    cfg0, m0 = tiny()
    assert m0.backbone.img_mask is None
    m0.backbone = CallLog(m0.backbone)
    loss_of(m0, make_batch(cfg0), cfg0)
    assert m0.backbone.calls[0][4] is None
    cfg, model = tiny("model.image_mask_prob=1.0", "model.image_mask_ratio=0.5")
    out = loss_of(model, make_batch(cfg), cfg, fixed=ALL)
    out["total"].backward()
    assert model.backbone.img_mask.grad.abs().sum() > 0


@pytest.mark.parametrize("key, value", [("image_mask_prob", -0.1), ("image_mask_prob", 1.5),
                                        ("image_mask_ratio", 0.0), ("image_mask_ratio", 1.0)])
def test_image_masking_config_errors(key, value):
    from mdm_dist.config import ConfigError

    with pytest.raises(ConfigError, match=f"model.{key}"):
        load_config(None, overrides=[*TINY, f"model.{key}={value}"])
