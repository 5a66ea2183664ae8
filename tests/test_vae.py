"""UnifiedVAE: shapes, token layout, posterior math, gradients, overfitting, meta init, freezing."""

from __future__ import annotations

import math

import pytest
import torch
from einops import rearrange

from mdm_dist.config import VAEConfig
from mdm_dist.models.vae import UnifiedVAE

# Two small configs that differ in every dimension the stem has: number of stages, patch size,
# image size, widths (16 channels -> GroupNorm with 16 groups; 24 -> 8 groups).
CONFIGS = {
    "32px_p2_2stages": VAEConfig(
        image_size=32, base_channels=16, channel_mult=[1, 2], num_res_blocks=1, latent_channels=4,
        patch_size=2, d_z=8, trunk_width=32, trunk_layers=2, vocab_size=50, max_text_len=12,
    ),
    "16px_p1_3stages": VAEConfig(
        image_size=16, base_channels=12, channel_mult=[1, 2, 2], num_res_blocks=2, latent_channels=3,
        patch_size=1, d_z=6, trunk_width=24, trunk_layers=1, vocab_size=40, max_text_len=8,
    ),
}


def _batch(cfg: VAEConfig, b: int = 2, L: int | None = None, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g, dtype=dtype) * 2 - 1
    ids = torch.randint(0, cfg.vocab_size, (b, L or cfg.max_text_len), generator=g)
    return x, ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_shapes_and_dtypes(name, dtype):
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    vae = UnifiedVAE(cfg, dtype=dtype)
    down = 2 ** (len(cfg.channel_mult) - 1)
    g = cfg.image_size // (down * cfg.patch_size)
    assert vae.grid == (g, g) and vae.num_image_tokens == g * g
    B, N, dz = 2, g * g, cfg.d_z
    x, ids = _batch(cfg, B, dtype=dtype)

    mu, logvar = vae.encode_image(x)
    assert mu.shape == logvar.shape == (B, N, dz) and mu.dtype == logvar.dtype == dtype
    x_hat = vae.decode_image(vae.sample(mu, logvar))
    assert x_hat.shape == x.shape and x_hat.dtype == dtype

    for L in (cfg.max_text_len, cfg.max_text_len - 3):  # L <= max_text_len
        mu_t, logvar_t = vae.encode_text(ids[:, :L])
        assert mu_t.shape == logvar_t.shape == (B, L, dz) and mu_t.dtype == dtype
        logits = vae.decode_text(vae.sample(mu_t, logvar_t))
        assert logits.shape == (B, L, cfg.vocab_size) and logits.dtype == dtype

    kl = vae.kl(mu, logvar)
    assert kl.shape == (B, N) and kl.dtype == dtype  # >= float32
    z = vae.sample(mu, logvar, generator=torch.Generator().manual_seed(1))
    assert z.shape == mu.shape and z.dtype == dtype

    out = vae.loss(x, ids)
    assert set(out) == {"rec_img", "psnr", "kl_img", "rec_txt", "token_acc", "kl_txt", "kl", "total"}
    for v in out.values():
        assert v.shape == () and v.dtype == torch.float32 and torch.isfinite(v)


def test_text_too_long_and_bad_image_size_raise():
    cfg = CONFIGS["32px_p2_2stages"]
    vae = UnifiedVAE(cfg)
    with pytest.raises(ValueError, match="max_text_len"):
        vae.encode_text(torch.zeros(1, cfg.max_text_len + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="image_size"):
        UnifiedVAE(VAEConfig(image_size=30, channel_mult=[1, 2], patch_size=2))
    with pytest.raises(ValueError, match="needs images, ids or both"):
        vae.loss()


def test_logvar_is_clamped():
    cfg = VAEConfig(image_size=8, base_channels=8, channel_mult=[1], patch_size=1, d_z=4, trunk_width=16,
                    vocab_size=10, max_text_len=4, logvar_min=-0.01, logvar_max=0.01)
    vae = UnifiedVAE(cfg)
    with torch.no_grad():
        vae.trunk_enc.moments.bias.fill_(100.0)
        _, lv = vae.encode_text(torch.zeros(2, 4, dtype=torch.long))
        assert torch.all(lv == 0.01)
        vae.trunk_enc.moments.bias.fill_(-100.0)
        _, lv = vae.encode_image(torch.zeros(1, 3, 8, 8))
        assert torch.all(lv == -0.01)


# ----------------------------------------------------------------------------------------------
# Token layout
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_patchify_matches_references_and_round_trips(name):
    cfg = CONFIGS[name]
    vae = UnifiedVAE(cfg)
    p, gh, gw, C = cfg.patch_size, *vae.grid, cfg.latent_channels
    h = torch.randn(2, C, gh * p, gw * p, dtype=torch.float64)
    tokens = vae.patchify(h)
    assert tokens.shape == (2, gh * gw, C * p * p)
    # einops reference
    ref = rearrange(h, "b c (gh p1) (gw p2) -> b (gh gw) (c p1 p2)", p1=p, p2=p)
    assert torch.equal(tokens, ref)
    # explicit loop reference: token n = (i, j) row-major, feature (c, di, dj)
    loop = torch.empty_like(ref)
    for i in range(gh):
        for j in range(gw):
            for c in range(C):
                for di in range(p):
                    for dj in range(p):
                        loop[:, i * gw + j, (c * p + di) * p + dj] = h[:, c, i * p + di, j * p + dj]
    assert torch.equal(tokens, loop)
    assert torch.equal(vae.unpatchify(tokens), h)
    assert torch.equal(vae.patchify(vae.unpatchify(ref)), ref)


def test_encode_image_tokens_are_row_major():
    """Token n of encode_image depends only on the conv latent patch (n // gw, n % gw)."""
    cfg = CONFIGS["32px_p2_2stages"]
    torch.manual_seed(0)
    vae = UnifiedVAE(cfg, dtype=torch.float64)
    gh, gw = vae.grid
    p = cfg.patch_size
    lat = torch.randn(1, cfg.latent_channels, gh * p, gw * p, dtype=torch.float64)
    vae.image_encoder.forward = lambda x: lat  # isolate the token path from the conv stem
    mu0, _ = vae.encode_image(torch.zeros(1, 3, cfg.image_size, cfg.image_size))
    i, j = 1, 2
    lat[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p] += 1.0
    mu1, _ = vae.encode_image(torch.zeros(1, 3, cfg.image_size, cfg.image_size))
    changed = (mu1 - mu0).abs().amax(-1)[0] > 0
    assert changed.nonzero().flatten().tolist() == [i * gw + j]


# ----------------------------------------------------------------------------------------------
# Gaussian posterior
# ----------------------------------------------------------------------------------------------


def test_kl_matches_hand_formula_and_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 5, 7, generator=g, dtype=torch.float64) * 2
    logvar = torch.randn(3, 5, 7, generator=g, dtype=torch.float64) * 3
    kl = UnifiedVAE.kl(mu, logvar)
    assert kl.shape == (3, 5) and kl.dtype == torch.float64
    hand = torch.empty(3, 5, dtype=torch.float64)
    for b in range(3):
        for t in range(5):
            hand[b, t] = sum(
                0.5 * (m * m + math.exp(lv) - 1.0 - lv)
                for m, lv in zip(mu[b, t].tolist(), logvar[b, t].tolist())
            )
    torch.testing.assert_close(kl, hand, rtol=1e-12, atol=1e-12)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    prior = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    torch.testing.assert_close(kl, torch.distributions.kl_divergence(q, prior).sum(-1), rtol=1e-10, atol=1e-10)
    # float32 inputs give the float64 answer to float32 precision; bf16 is upcast to float32
    torch.testing.assert_close(UnifiedVAE.kl(mu.float(), logvar.float()), hand.float(), rtol=1e-5, atol=1e-5)
    assert UnifiedVAE.kl(mu.bfloat16(), logvar.bfloat16()).dtype == torch.float32


def test_kl_zero_at_standard_normal():
    z = torch.zeros(2, 4, 16)
    assert torch.equal(UnifiedVAE.kl(z, z), torch.zeros(2, 4))


def test_sample_deterministic_and_statistics():
    mu = torch.full((4, 8), 1.5, dtype=torch.float64)
    logvar = torch.full((4, 8), math.log(0.25), dtype=torch.float64)
    a = UnifiedVAE.sample(mu, logvar, torch.Generator().manual_seed(123))
    b = UnifiedVAE.sample(mu, logvar, torch.Generator().manual_seed(123))
    c = UnifiedVAE.sample(mu, logvar, torch.Generator().manual_seed(124))
    assert torch.equal(a, b) and not torch.equal(a, c)
    n = 400_000
    mu = torch.tensor([1.5, -2.0], dtype=torch.float64).expand(n, 2)
    logvar = torch.tensor([math.log(0.25), math.log(4.0)], dtype=torch.float64).expand(n, 2)
    z = UnifiedVAE.sample(mu, logvar, torch.Generator().manual_seed(0))
    # standard errors: mean sigma/sqrt(n) <= 3.2e-3, variance sigma^2 sqrt(2/n) <= 9e-3 -> 5 s.e.
    torch.testing.assert_close(z.mean(0), torch.tensor([1.5, -2.0], dtype=torch.float64), atol=0.016, rtol=0)
    torch.testing.assert_close(z.var(0), torch.tensor([0.25, 4.0], dtype=torch.float64), atol=0, rtol=0.012)
    # zero variance -> exactly the mean
    lo = torch.full((3,), -30.0)
    assert torch.allclose(UnifiedVAE.sample(torch.ones(3), lo), torch.ones(3), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Loss and gradients
# ----------------------------------------------------------------------------------------------


def test_loss_terms_and_total():
    cfg = CONFIGS["32px_p2_2stages"]
    torch.manual_seed(0)
    vae = UnifiedVAE(cfg)
    x, ids = _batch(cfg, 3)
    out = vae.loss(x, ids, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["total"], out["rec_img"] + out["rec_txt"] + cfg.beta_kl * out["kl"])
    torch.testing.assert_close(out["psnr"], 10 * torch.log10(4.0 / out["rec_img"]))
    # kl is the mean over all present tokens: a token-count-weighted mix of the two modalities
    n_img, n_txt = 3 * vae.num_image_tokens, 3 * cfg.max_text_len
    torch.testing.assert_close(out["kl"], (n_img * out["kl_img"] + n_txt * out["kl_txt"]) / (n_img + n_txt))
    assert 0.0 <= out["token_acc"] <= 1.0 and not out["token_acc"].requires_grad
    assert not out["psnr"].requires_grad

    # same generator seed -> same loss; recompute the image branch by hand
    g = torch.Generator().manual_seed(5)
    img = vae.loss(images=x, generator=g)
    assert set(img) == {"rec_img", "psnr", "kl_img", "kl", "total"}
    g = torch.Generator().manual_seed(5)
    mu, lv = vae.encode_image_raw(x)
    x_hat = vae.decode_image_raw(vae.sample(mu, lv, g))
    torch.testing.assert_close(img["rec_img"], ((x_hat - x) ** 2).mean())
    torch.testing.assert_close(img["kl"], vae.kl(mu, lv).mean())
    torch.testing.assert_close(img["total"], img["rec_img"] + cfg.beta_kl * img["kl"])

    txt = vae.loss(ids=ids, generator=torch.Generator().manual_seed(5))
    assert set(txt) == {"rec_txt", "token_acc", "kl_txt", "kl", "total"}
    torch.testing.assert_close(txt["total"], txt["rec_txt"] + cfg.beta_kl * txt["kl"])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradient_reaches_every_parameter(name):
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    vae = UnifiedVAE(cfg)
    x, ids = _batch(cfg, 2)
    vae.loss(x, ids, generator=torch.Generator().manual_seed(0))["total"].backward()
    for pname, p in vae.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


def test_tiny_vae_overfits_one_batch():
    """8 random 16x16 images + 8 random id sequences: Adam memorizes them (~3 s on 2 cores)."""
    cfg = VAEConfig(
        image_size=16, base_channels=16, channel_mult=[1, 2], latent_channels=4, patch_size=2,
        d_z=16, trunk_width=64, trunk_layers=2, vocab_size=64, max_text_len=16,
    )
    torch.manual_seed(0)
    vae = UnifiedVAE(cfg)
    x, ids = _batch(cfg, 8, seed=1)
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    first = {}
    for step in range(250):
        out = vae.loss(x, ids, generator=g)
        if step == 0:
            first = {k: v.item() for k, v in out.items()}
        opt.zero_grad(set_to_none=True)
        out["total"].backward()
        opt.step()
    with torch.no_grad():
        out = vae.loss(x, ids, generator=g)
    assert out["token_acc"].item() == 1.0
    assert out["rec_txt"].item() < 0.05, out
    assert out["rec_img"].item() * 5 <= first["rec_img"], (first, out)
    assert out["psnr"].item() > first["psnr"] + 7.0


# ----------------------------------------------------------------------------------------------
# Image latent standardization
# ----------------------------------------------------------------------------------------------


def test_image_latent_standardization_against_float64_reference():
    cfg = CONFIGS["32px_p2_2stages"]
    torch.manual_seed(0)
    vae = UnifiedVAE(cfg).double()
    x, ids = _batch(cfg, 6, dtype=torch.float64)
    raw_mu, raw_lv = vae.encode_image_raw(x)
    mu0, lv0 = vae.encode_image(x)  # identity until the stats are set
    torch.testing.assert_close(mu0, raw_mu)
    torch.testing.assert_close(lv0, raw_lv)
    loss_before = vae.loss(x, ids, generator=torch.Generator().manual_seed(3))

    shift, scale = vae.set_image_latent_stats(raw_mu)
    flat = raw_mu.reshape(-1, cfg.d_z)
    ref_shift = flat.sum(0) / flat.shape[0]
    ref_scale = ((flat - ref_shift).square().sum(0) / (flat.shape[0] - 1)).sqrt()
    torch.testing.assert_close(shift, ref_shift)
    torch.testing.assert_close(scale, ref_scale)
    mu, lv = vae.encode_image(x)
    torch.testing.assert_close(mu, (raw_mu - ref_shift) / ref_scale)
    torch.testing.assert_close(lv, raw_lv - 2 * ref_scale.log())
    # standardized over the set it was measured on: mean 0, std 1 in every dimension
    torch.testing.assert_close(mu.reshape(-1, cfg.d_z).mean(0), torch.zeros(cfg.d_z, dtype=torch.float64))
    torch.testing.assert_close(mu.reshape(-1, cfg.d_z).std(0), torch.ones(cfg.d_z, dtype=torch.float64))
    # decoding undoes it: the same pixels as the raw path, also for sampled latents
    torch.testing.assert_close(vae.decode_image(mu), vae.decode_image_raw(raw_mu))
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    torch.testing.assert_close(vae.decode_image(vae.sample(mu, lv, g1)),
                               vae.decode_image_raw(vae.sample(raw_mu, raw_lv, g2)))
    # the VAE's own loss works on the raw posterior: unchanged by the stats
    loss_after = vae.loss(x, ids, generator=torch.Generator().manual_seed(3))
    for k in ("rec_img", "kl", "total"):
        torch.testing.assert_close(loss_after[k], loss_before[k])
    # the buffers travel with the state dict
    clone = UnifiedVAE(cfg).double()
    clone.load_state_dict(vae.state_dict())
    torch.testing.assert_close(clone.encode_image(x)[0], mu)


def test_image_latent_stats_constant_dimension_and_errors():
    cfg = CONFIGS["16px_p1_3stages"]
    vae = UnifiedVAE(cfg)
    raw = torch.randn(5, 4, cfg.d_z)
    raw[..., 2] = 3.0  # a dimension that never varies keeps scale 1 (no division by 0)
    shift, scale = vae.set_image_latent_stats(raw)
    assert scale[2] == 1.0 and shift[2] == 3.0
    assert torch.isfinite(vae.encode_image(torch.zeros(1, 3, 16, 16))[0]).all()
    with pytest.raises(ValueError, match="at least 2"):
        vae.set_image_latent_stats(torch.randn(1, cfg.d_z))


# ----------------------------------------------------------------------------------------------
# Meta construction and freezing
# ----------------------------------------------------------------------------------------------


def test_meta_build_to_empty_reset_parameters():
    cfg = CONFIGS["16px_p1_3stages"]
    vae = UnifiedVAE(cfg, device="meta")
    assert all(p.is_meta for p in vae.parameters())
    vae.to_empty(device="cpu")
    torch.manual_seed(0)
    vae.reset_parameters()
    for pname, p in vae.named_parameters():
        assert not p.is_meta and torch.isfinite(p).all(), pname
        if pname.endswith("weight") or pname in ("pos_emb", "modality_emb"):
            assert p.abs().sum() > 0, pname  # initialized, not left at to_empty's garbage or 0
    # the same seed gives the same init as eager construction
    torch.manual_seed(0)
    eager = UnifiedVAE(cfg)
    torch.manual_seed(0)
    eager.reset_parameters()
    for (n1, p1), (n2, p2) in zip(vae.named_parameters(), eager.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    # buffers come uninitialized from to_empty: reset_parameters makes them the identity
    assert torch.equal(vae.image_latent_shift, torch.zeros(cfg.d_z))
    assert torch.equal(vae.image_latent_scale, torch.ones(cfg.d_z))
    x, ids = _batch(cfg, 2)
    out = vae.loss(x, ids)
    assert all(torch.isfinite(v) for v in out.values())
    mu, lv = vae.encode_image(x)
    assert torch.isfinite(vae.decode_image(mu)).all()
    assert torch.isfinite(vae.decode_text(vae.encode_text(ids)[0])).all()


def test_freeze_image_encoder_freezes_exactly_the_encoder_path():
    cfg = CONFIGS["32px_p2_2stages"]
    vae = UnifiedVAE(cfg)
    vae.freeze_image_encoder()
    frozen = {n for n, p in vae.named_parameters() if not p.requires_grad}
    expected = {n for n, _ in vae.named_parameters() if n.startswith(("image_encoder.", "image_in."))}
    assert frozen == expected and len(expected) > 0
    assert {id(p) for p in vae.image_encoder_parameters()} == {
        id(p) for n, p in vae.named_parameters() if n in expected
    }
    # the rest still trains: trunk, modality embedding, decoders, text stem
    x, ids = _batch(cfg, 2)
    vae.loss(x, ids)["total"].backward()
    for n, p in vae.named_parameters():
        if n in expected:
            assert p.grad is None, n
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
