"""Training objectives: SEDD score entropy for text, weighted DSM for image latents, the total loss.

The paper's loss (``shared/MDM_SPEC.md``)::

    L = lambda_rec_img * L_rec_img + lambda_rec_txt * L_rec_txt + beta_kl * L_KL + lambda_se * L_SE
    L_SE = L_SE_txt + L_SE_img

Text, ``text_process: absorbing`` (SEDD, Lou, Meng, Ermon 2023). Each token is independently
replaced by MASK with probability 1 - exp(-sigma(t)) (log-linear sigma, ``schedules.py``). The
network's log-scores s_y (the VAE text decoder's logits of the backbone's text output) estimate
log p_t(x with this position set to y) / p_t(x). For a masked position with clean token y0 and
r = 1 / (exp(sigma) - 1)::

    L_pos = sum_{y != MASK} exp(s_y) - r s_{y0} + r (log r - 1)           (0 if not masked)

computed in the equivalent form that has no cancellation and is a sum of two terms >= 0::

    lse = logsumexp_{y != MASK} s_y,  a = lse - log r
    L_pos = r (exp(a) - 1 - a) + r (lse - s_{y0})

Its minimum over s is 0, at s_{y0} = log r and s_y = -inf for y != y0 (then a = 0, lse = s_y0).
Parameterization (``diffusion.text_score``). For the absorbing process the true score of a
masked position is exactly s_y = r(t) p_0(x0 = y | unmasked context), r = 1 / expm1(sigma) (Ou
et al. 2024, "absorbing discrete diffusion secretly models the conditional distributions of clean
data"; MDLM's SUBS parameterization). ``conditional`` (default) builds the log-scores that way
from the network's logits: s = log_softmax_{y != MASK}(logits) + log r (:func:`absorbing_log_scores`),
so lse = log r, a = 0 and L_pos = r (-log p_theta(y0)): the network only learns a distribution.
``free`` uses the logits themselves as log-scores (SEDD's form): the network must also learn the
total mass log r(t), through the frozen VAE text decoder; measured on the demo
(benchmarks/demo_results.md), that mass term swamped the gradient and the model learned the
caption language but not to read the image.

The per-sample text loss is ``dsigma(t) / L * sum_pos L_pos`` (SEDD's dsigma-weighted score
entropy, divided by the text length L so that it is a per-token quantity; unmasked positions
count in L with 0), averaged over the samples of the batch whose text is generated.

Image latents (and text latents under ``text_process: gaussian``): the VP process
z_t = sqrt(abar) z_0 + sigma eps, the backbone predicts eps. ``objective: ddpm`` is the plain
epsilon MSE ||eps_hat - eps||^2. ``objective: se`` is the continuous counterpart of score entropy,
denoising score matching: with score_hat = -eps_hat / sigma,
lambda(t) ||score_hat - grad log p(z_t | z_0)||^2 = lambda(t) / sigma^2 ||eps_hat - eps||^2,
weighted per t by :func:`dsm_image_weight` (``diffusion.image_weighting``).

Text latents under ``gaussian``: ``ddpm`` -> epsilon MSE; ``se`` -> the clean-latent estimate
x0_hat = (z_t - sigma eps_hat) / sqrt(abar) is decoded by the VAE text decoder and scored by
cross entropy against the ids, weighted by sqrt(abar(t)). Why the weight: d x0_hat / d eps_hat =
-sigma / sqrt(abar), which reaches ~1e3 near t = 1, so an unweighted CE would let the noisiest
steps dominate the gradient; with sqrt(abar) the gradient w.r.t. eps_hat is bounded by sigma
times that w.r.t. x0_hat.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mdm_dist.config import Config
from mdm_dist.diffusion.schedules import VPSchedule, from_config

TASKS = ("joint", "t2i", "i2t")
JOINT, T2I, I2T = 0, 1, 2


# ----------------------------------------------------------------------------------------------
# Score entropy (absorbing text process)
# ----------------------------------------------------------------------------------------------


def score_entropy_absorbing(
    log_scores: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, sigma: torch.Tensor, mask_id: int
) -> torch.Tensor:
    """SEDD score entropy of the absorbing process, per position (see the module doc).

    Args:
        log_scores: (B, L, V) log-scores s_y (the MASK column is ignored).
        x0: (B, L) clean ids (must not contain ``mask_id``).
        xt: (B, L) noisy ids; positions with ``xt == mask_id`` are scored.
        sigma: (B,) total noise sigma(t) > 0 of each sample (samples without masked positions
            may have sigma = 0).
        mask_id: the MASK token id.

    Returns:
        (B, L) in at least float32: sum_{y != MASK} exp(s_y) - r s_{x0} + r (log r - 1) with
        r = 1 / expm1(sigma) at masked positions, 0 elsewhere. Not yet weighted by dsigma.
    """
    dtype = torch.promote_types(log_scores.dtype, torch.float32)
    s = log_scores.to(dtype)
    masked = xt == mask_id
    log_r = _log_r(sigma, dtype)[:, None]  # (B, 1)
    r = torch.exp(log_r)
    mask_col = torch.zeros(s.shape[-1], dtype=torch.bool, device=s.device)
    mask_col[mask_id] = True
    lse = torch.logsumexp(s.masked_fill(mask_col, float("-inf")), dim=-1)  # (B, L)
    s_y0 = s.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    a = lse - log_r
    loss = r * (torch.expm1(a) - a) + r * (lse - s_y0)
    return torch.where(masked, loss, torch.zeros_like(loss))


def _log_r(sigma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """log r = -log expm1(sigma) per sample. sigma = 0 (nothing masked) would give r = inf, and
    inf in an unselected branch of a torch.where still poisons the gradient; such samples get
    sigma = 1 instead (their value is never used: no position of theirs is scored)."""
    sig = sigma.to(dtype)
    return -torch.log(torch.expm1(torch.where(sig > 0, sig, torch.ones_like(sig))))


def absorbing_log_scores(logits: torch.Tensor, sigma: torch.Tensor, mask_id: int) -> torch.Tensor:
    """The ``conditional`` log-scores: log_softmax over y != MASK of ``logits`` plus log r(sigma),
    r = 1 / expm1(sigma), per sample (the MASK column is -inf). ``sigma`` (B,); samples with
    sigma = 0 get a finite placeholder (see :func:`_log_r`). In float32 or wider."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    s = logits.to(dtype)
    mask_col = torch.zeros(s.shape[-1], dtype=torch.bool, device=s.device)
    mask_col[mask_id] = True
    logp = torch.log_softmax(s.masked_fill(mask_col, float("-inf")), dim=-1)
    return logp + _log_r(sigma, dtype).view(-1, *([1] * (s.dim() - 1)))


# ----------------------------------------------------------------------------------------------
# Image DSM weight
# ----------------------------------------------------------------------------------------------


def dsm_image_weight(t: torch.Tensor, schedule: VPSchedule, kind: str = "elbo", max_w: float = 5.0) -> torch.Tensor:
    """Per-sample weight w(t) of the epsilon MSE of the image (and gaussian-text) latents.

    * ``"eps"``: w = 1, the "simple" loss of Ho et al. 2020.
    * ``"elbo"``: the likelihood weighting. Denoising score matching with Song et al.'s
      likelihood weight g(t)^2 = beta(t) is, in epsilon form,
      beta(t) ||score_hat - score||^2 = beta(t) / sigma(t)^2 ||eps_hat - eps||^2, and
      beta / sigma^2 = -d log SNR / dt, the continuous-time ELBO weight (Kingma et al. 2021).
      We use  w(t) = min(max_w, [beta(t) / sigma(t)^2] / [beta(0.5) / sigma(0.5)^2]):
      normalized so w(0.5) = 1 (the loss keeps the scale of the eps MSE and lambda_se stays
      meaningful) and clamped because beta / sigma^2 ~ 1 / t as t -> 0 (sigma^2 ~ beta(0) t),
      and for the cosine also ~ tan as t -> 1: unclamped, a few samples with tiny t would carry
      most of the loss and its gradient variance would be unbounded.

    Args:
        t: (B,) times in (0, 1]. schedule: the VP schedule. kind: ``"elbo"`` or ``"eps"``.
        max_w: the clamp of the normalized ELBO weight.
    Returns: (B,) weights in t's dtype.
    """
    if kind == "eps":
        return torch.ones_like(t)
    if kind == "v":  # ||v_hat - v||^2 = ||eps_hat - eps||^2 / abar; clamped like the ELBO weight
        return (1.0 / schedule.alpha_bar(t.double())).clamp(max=max_w).to(t.dtype)
    if kind != "elbo":
        raise ValueError(f"image weighting {kind!r}; allowed values: elbo, eps, v")
    ref = (schedule.beta(0.5) / schedule.sigma2(0.5)).item()
    w = schedule.beta(t.double()) / schedule.sigma2(t.double()) / ref
    return w.clamp(max=max_w).to(t.dtype)


# ----------------------------------------------------------------------------------------------
# Noise and task draws
# ----------------------------------------------------------------------------------------------


def _uniform(shape, generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float32)


def _normal_like(ref: torch.Tensor, generator) -> torch.Tensor:
    return torch.randn(ref.shape, generator=generator, device=ref.device, dtype=ref.dtype)


def _task_codes(task: Any, b: int, device) -> torch.Tensor:
    if isinstance(task, torch.Tensor):
        codes = task.to(device=device, dtype=torch.long)
    elif isinstance(task, str):
        codes = torch.full((b,), TASKS.index(task), dtype=torch.long, device=device)
    else:
        codes = torch.tensor([TASKS.index(x) if isinstance(x, str) else int(x) for x in task], device=device)
    if codes.shape != (b,):
        raise ValueError(f"fixed['task'] must give one task per sample ({b}), got shape {tuple(codes.shape)}")
    return codes


def _times(u: torch.Tensor, t_eps: float, power: float) -> torch.Tensor:
    """t = t_eps + (1 - t_eps) u ** (1 / power) from u ~ U[0, 1): density ~ (t - t_eps) ** (power - 1)."""
    return t_eps + (1 - t_eps) * u.pow(1.0 / power)  # u ** 1.0 is u exactly: k = 1 draws as before


def draw_tasks(cfg: Config, b: int, device, generator=None, fixed: dict | None = None) -> dict[str, torch.Tensor]:
    """Per-sample task (0 joint, 1 t2i, 2 i2t), condition drop flag and uniform times in
    [t_eps, 1] for both modalities (before the task zeroes the time of the condition), with density
    ~ (t - t_eps) ** (k - 1), k = ``diffusion.image_time_power`` / ``text_time_power`` (1: uniform).
    Entries of ``fixed`` ("task", "drop", "t_txt", "t_img") replace the draws."""
    u_task, u_drop, u_txt, u_img = (_uniform((b,), generator, device) for _ in range(4))
    return tasks_from_uniforms(cfg, u_task, u_drop, u_txt, u_img, fixed)


def tasks_from_uniforms(cfg: Config, u_task: torch.Tensor, u_drop: torch.Tensor, u_txt: torch.Tensor,
                        u_img: torch.Tensor, fixed: dict | None = None) -> dict[str, torch.Tensor]:
    """:func:`draw_tasks` from its four U[0, 1) draws per sample, each (b,): element-wise, so a
    batch of draws gives what each sample's draws give alone (mdm_dist/train/noise.py)."""
    d = cfg.diffusion
    fixed = fixed or {}
    b, device = u_task.shape[0], u_task.device
    probs = torch.tensor([float(d.task_probs.get(k, 0.0)) for k in TASKS], device=device)
    if "task" in fixed:
        task = _task_codes(fixed["task"], b, device)
    else:
        cdf = probs.cumsum(0) / probs.sum()
        task = torch.searchsorted(cdf, u_task.contiguous(), right=True).clamp(max=len(TASKS) - 1)
    drop = fixed["drop"].to(device=device, dtype=torch.bool) if "drop" in fixed else u_drop < d.p_uncond
    t_txt = fixed["t_txt"].to(device, torch.float32) if "t_txt" in fixed else _times(u_txt, d.t_eps, d.text_time_power)
    t_img = fixed["t_img"].to(device, torch.float32) if "t_img" in fixed else _times(u_img, d.t_eps, d.image_time_power)
    return {"task": task, "drop": drop, "t_txt": t_txt, "t_img": t_img}


def absorb(ids: torch.Tensor, sigma: torch.Tensor, mask_id: int, uniform: torch.Tensor) -> torch.Tensor:
    """Absorbing forward process: each token of sample b becomes ``mask_id`` iff
    ``uniform < 1 - exp(-sigma[b])`` (so with probability 1 - exp(-sigma)); ``uniform`` (B, L)
    holds U[0, 1) draws."""
    p_mask = -torch.expm1(-sigma.to(torch.float32))
    return torch.where(uniform < p_mask[:, None], torch.full_like(ids, mask_id), ids)


def image_x0_estimate(img_out: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor, vp: VPSchedule,
                      prediction: str, bound: float = 10.0) -> torch.Tensor:
    """The clean image latents implied by the backbone's image output at z_t, per sample:
    v-prediction x0 = sqrt(abar) z_t - sigma v; eps-prediction x0 = (z_t - sigma eps) / sqrt(abar),
    clipped to [-bound, bound] (the latents are standardized; at t -> 1, abar -> 0 amplifies eps)."""
    a = vp.alpha_bar(t.double()).to(z_t.dtype)[:, None, None]
    s = vp.sigma(t.double()).to(z_t.dtype)[:, None, None]
    if prediction == "v":
        return a.sqrt() * z_t - s * img_out
    return ((z_t - s * img_out) / a.sqrt().clamp_min(1e-4)).clamp(-bound, bound)


def _vp_noise(z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, vp: VPSchedule) -> torch.Tensor:
    """z_t = sqrt(abar(t)) z0 + sigma(t) eps, per sample."""
    a = vp.alpha_bar(t.double()).to(z0.dtype)[:, None, None]
    s = vp.sigma(t.double()).to(z0.dtype)[:, None, None]
    return a.sqrt() * z0 + s * eps


def _masked_mean(per_sample: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_sample`` over the active samples; exactly 0 (still in the graph) if none."""
    w = active.to(per_sample.dtype)
    return (per_sample * w).sum() / w.sum().clamp_min(1.0)


# ----------------------------------------------------------------------------------------------
# Total loss
# ----------------------------------------------------------------------------------------------


def mdm_loss(
    model, batch: dict[str, torch.Tensor], cfg: Config, generator: torch.Generator | None = None,
    fixed: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """The MDM pretraining loss of one batch; every term separately and ``total``.

    Args:
        model: has ``.vae`` (UnifiedVAE interface) and ``.backbone(txt, img, t_txt, t_img,
            category) -> (txt_out, img_out)`` (docs/model.md).
        batch: ``ids`` (B, L) long, padded with pad_id, never containing mask_id; optional
            ``category`` (B,) long (default 0); and either ``images`` (B, 3, H, W) in [-1, 1]
            (encoded through the VAE here) or ``img_mu``/``img_logvar`` (B, N, d_z), the stored
            moments of the frozen image encoder.
        cfg: the full Config (``diffusion`` and ``vae`` sections are read).
        generator: draws every random number (tasks, drops, times, masks, VAE samples, eps).
        fixed: optional overrides of the draws, for tests and reproducible evaluation:
            ``task`` ((B,) codes 0/1/2 or names joint/t2i/i2t, or one name), ``drop`` (B,) bool,
            ``t_txt``/``t_img`` (B,) (the times as drawn, before the task sets a condition's time
            to 0), ``mask_noise`` (B, L) uniforms (a token is masked iff mask_noise <
            1 - exp(-sigma)), ``eps_img`` (B, N, d_z), ``eps_txt`` (B, L, d_z) (gaussian text),
            ``sc`` (B,) uniforms (``model.self_condition``: a sample whose image is generated gets
            the model's own estimate iff sc < 0.5), ``img_mask`` (B,) and ``img_mask_tokens``
            (B, N) uniforms (``model.image_mask_prob`` > 0: a sample whose image is generated is
            masked iff img_mask < image_mask_prob, and then its token n is hidden iff
            img_mask_tokens[:, n] < image_mask_ratio).

    Per sample:
        * task ~ ``diffusion.task_probs``: ``joint`` (t_txt, t_img in [t_eps, 1] independently,
          uniform unless ``diffusion.text_time_power`` / ``image_time_power`` != 1),
          ``t2i`` (t_txt = 0: the clean text is the condition, loss on the image only), ``i2t``
          (t_img = 0: the clean image latents are the condition, loss on the text only).
        * condition dropout with prob ``p_uncond``: category -> null class (num_categories);
          for t2i the text becomes all-MASK at t_txt = 1 (absorbing) or pure noise eps at
          t_txt = 1 (gaussian); for i2t the image becomes pure noise eps at t_img = 1. A dropped
          condition carries no loss (it never does: conditions are not scored).

    Terms (scalars, float32):
        * ``rec_txt`` = CE(decode_text(sample(encode_text(ids))), ids), mean over all tokens.
        * ``rec_img`` = MSE(decode_image(z0), images), z0 = sample(encode_image(images)); only
          when ``images`` is given (omitted with stored moments).
        * ``kl`` = mean per-token KL(q(z|x) || N(0, I)) (summed over d_z) over all text tokens
          and, when ``images`` is given, the image tokens (UnifiedVAE.loss's convention).
        * ``se_txt``: the text diffusion term (absorbing: dsigma-weighted score entropy; gaussian:
          sqrt(abar)-weighted CE of decode_text(x0_hat) under ``se``, eps MSE under ``ddpm``),
          mean over samples whose text is generated (joint, i2t). Omitted when the batch has
          none (every sample t2i).
        * ``se_img``: w(t) * eps MSE (w from :func:`dsm_image_weight` under ``se``, 1 under
          ``ddpm``), mean over samples whose image is generated (joint, t2i). Omitted when every
          sample is i2t.
        * ``align`` (``model.repr_align_weight`` > 0; docs/model.md item 12): 1 - cosine between
          the projected image-token states after ``repr_align_layer`` of the trained call and,
          from a no-grad call on the clean image with the text all MASK, the states after
          ``repr_align_target_layer``; mean over image tokens and over samples whose image is
          generated. Enters ``total`` as ``repr_align_weight * align``.
        * ``total`` = lambda_rec_img rec_img + lambda_rec_txt rec_txt + beta_kl kl
          + lambda_se (se_txt + se_img) over the present terms. An omitted diffusion term still
          enters ``total`` as an exact 0 so every parameter stays in the autograd graph (ZeRO /
          DDP see the same graph on every rank).

    Gradients: the diffusion targets z0 are detached (stop-gradient into the encoders, as in
    latent diffusion: an eps-MSE that reaches the encoder can shrink the latents until the task
    is trivial); the encoders learn from the reconstruction and KL terms, and from the
    backbone's *conditioning* inputs (clean conditions and the noisy absorbing-text encoding),
    which stay attached.
    """
    d, v = cfg.diffusion, cfg.vae
    vae, backbone = model.vae, model.backbone
    sched = from_config(d)
    vp = sched.vp
    fixed = fixed or {}

    ids = batch["ids"]
    device = ids.device
    b, L = ids.shape
    if bool((ids == v.mask_id).any()):
        raise ValueError(f"batch['ids'] contains the MASK id {v.mask_id}; clean text must not use it")
    category = batch.get("category")
    category = torch.zeros(b, dtype=torch.long, device=device) if category is None else category.to(device)

    draws = draw_tasks(cfg, b, device, generator, fixed)
    task, drop = draws["task"], draws["drop"]
    is_t2i, is_i2t = task == T2I, task == I2T
    txt_active, img_active = ~is_t2i, ~is_i2t  # whose text / image is generated and scored
    t_txt = torch.where(is_t2i, torch.zeros_like(draws["t_txt"]), draws["t_txt"])
    t_img = torch.where(is_i2t, torch.zeros_like(draws["t_img"]), draws["t_img"])
    drop_txt, drop_img = drop & is_t2i, drop & is_i2t
    t_txt = torch.where(drop_txt, torch.ones_like(t_txt), t_txt)
    t_img = torch.where(drop_img, torch.ones_like(t_img), t_img)
    category_given = category
    category = torch.where(drop, torch.full_like(category, cfg.model.num_categories), category)
    mask_noise = fixed["mask_noise"].to(device) if "mask_noise" in fixed else _uniform((b, L), generator, device)

    out: dict[str, torch.Tensor] = {}
    kls: list[torch.Tensor] = []

    # -- image latents ------------------------------------------------------------------------
    if "images" in batch:
        images = batch["images"]
        mu_i, lv_i = vae.encode_image(images)
        z0_img = vae.sample(mu_i, lv_i, generator)
        out["rec_img"] = F.mse_loss(vae.decode_image(z0_img).float(), images.float())
        kls.append(vae.kl(mu_i, lv_i).float().flatten())
    elif "img_mu" in batch and "img_logvar" in batch:
        z0_img = vae.sample(batch["img_mu"], batch["img_logvar"], generator)
    else:
        raise ValueError("mdm_loss needs batch['images'] or the stored moments batch['img_mu'] and batch['img_logvar']")

    # -- text reconstruction + KL ------------------------------------------------------------
    mu_t, lv_t = vae.encode_text(ids)
    z0_txt = vae.sample(mu_t, lv_t, generator)
    rec_logits = vae.decode_text(z0_txt).float()
    out["rec_txt"] = F.cross_entropy(rec_logits.flatten(0, 1), ids.flatten())
    kls.append(vae.kl(mu_t, lv_t).float().flatten())
    out["kl"] = torch.cat(kls).mean()

    # -- forward processes ---------------------------------------------------------------------
    eps_img = fixed["eps_img"].to(z0_img) if "eps_img" in fixed else _normal_like(z0_img, generator)
    z_img = _vp_noise(z0_img.detach(), eps_img, t_img, vp)
    z_img = torch.where(is_i2t[:, None, None], z0_img, z_img)  # clean condition
    z_img = torch.where(drop_img[:, None, None], eps_img, z_img)  # dropped condition: pure noise

    if d.text_process == "absorbing":
        sigma_txt = sched.text.sigma(t_txt)
        xt = absorb(ids, sigma_txt, v.mask_id, mask_noise)
        xt = torch.where(drop_txt[:, None], torch.full_like(ids, v.mask_id), xt)
        z_txt = vae.sample(*vae.encode_text(xt), generator)
    else:
        eps_txt = fixed["eps_txt"].to(z0_txt) if "eps_txt" in fixed else _normal_like(z0_txt, generator)
        z_txt = _vp_noise(z0_txt.detach(), eps_txt, t_txt, vp)
        z_txt = torch.where(is_t2i[:, None, None], z0_txt, z_txt)
        z_txt = torch.where(drop_txt[:, None, None], eps_txt, z_txt)

    bb_kw = {}
    if cfg.model.image_mask_prob > 0:
        # masked latent modelling (MDT): hidden image tokens show the backbone a learned mask
        # embedding instead of their noisy latent; the loss below still covers every token
        n_img = z_img.shape[1]
        u_m = fixed["img_mask"].to(device) if "img_mask" in fixed else _uniform((b,), generator, device)
        u_tok = (fixed["img_mask_tokens"].to(device) if "img_mask_tokens" in fixed
                 else _uniform((b, n_img), generator, device))
        masked = (u_m < cfg.model.image_mask_prob) & img_active
        bb_kw["img_keep"] = ~(masked[:, None] & (u_tok < cfg.model.image_mask_ratio))
    if cfg.model.self_condition:
        # half the samples whose image is generated see the model's own clean-image estimate from
        # a first, no-grad call (detached, as in Chen et al. 2022); the others, and every given
        # image, see zeros. Every rank makes the extra call every step (collectives stay matched).
        with torch.no_grad():
            _, img_first = backbone(z_txt, z_img, t_txt, t_img, category, **bb_kw)
        x0_est = image_x0_estimate(img_first.float(), z_img.float(), t_img, vp, d.image_prediction)
        u_sc = fixed["sc"].to(device) if "sc" in fixed else _uniform((b,), generator, device)
        use_sc = (u_sc < 0.5) & img_active
        bb_kw["img_sc"] = torch.where(use_sc[:, None, None], x0_est, torch.zeros_like(x0_est)).to(z_img.dtype)
    align_w = cfg.model.repr_align_weight
    if align_w > 0:
        # representation alignment: the target is what the model makes of the clean image when it
        # reads it to caption it (text all MASK, the category as given), without gradient, for the
        # samples whose image is generated (one sample if none: every rank makes the call)
        sel = img_active.nonzero().flatten()
        sel = sel if sel.numel() else torch.zeros(1, dtype=torch.long, device=device)
        with torch.no_grad():
            z_masked = vae.encode_text(torch.full_like(ids[sel], v.mask_id))[0]
            _, _, target = backbone(z_masked.to(z_txt.dtype), z0_img[sel].detach().to(z_img.dtype),
                                    torch.ones_like(t_txt[sel]), torch.zeros_like(t_img[sel]), category_given[sel],
                                    hidden_at=(cfg.model.repr_align_target_layer,))
        bb_kw["hidden_at"] = (cfg.model.repr_align_layer,)
    txt_out, img_out, *hidden = backbone(z_txt, z_img, t_txt, t_img, category, **bb_kw)

    # -- text diffusion term -----------------------------------------------------------------
    if d.text_process == "absorbing":
        log_scores = vae.decode_text(txt_out)
        if d.text_score == "conditional":
            log_scores = absorbing_log_scores(log_scores, sigma_txt, v.mask_id)
        se = score_entropy_absorbing(log_scores, ids, xt, sigma_txt, v.mask_id)  # (B, L)
        per_sample = sched.text.dsigma(t_txt) * se.sum(-1) / L
    elif d.objective == "ddpm":
        per_sample = (txt_out.float() - eps_txt.float()).square().mean(dim=(1, 2))
    else:
        a = vp.alpha_bar(t_txt.double())
        sq_a = a.sqrt().to(txt_out.dtype)[:, None, None]
        sig = vp.sigma(t_txt.double()).to(txt_out.dtype)[:, None, None]
        x0_hat = (z_txt - sig * txt_out) / sq_a
        logits = vae.decode_text(x0_hat).float()
        ce = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none").mean(-1)  # (B,)
        per_sample = a.sqrt().float() * ce
    se_txt = _masked_mean(per_sample.float(), txt_active)

    # -- image diffusion term ----------------------------------------------------------------
    if d.image_prediction == "v":
        a_i = vp.alpha_bar(t_img.double()).sqrt().float()[:, None, None]
        s_i = vp.sigma(t_img.double()).float()[:, None, None]
        v_target = a_i * eps_img.float() - s_i * z0_img.detach().float()
        mse = (img_out.float() - v_target).square().mean(dim=(1, 2))
        # ddpm and the v weighting train the v-MSE itself (= eps-MSE / abar, without dividing by
        # abar -> 0); the other weightings weigh the eps-MSE: eps_hat = a v_hat + s z_t, so
        # ||eps_hat - eps||^2 = abar ||v_hat - v||^2
        weighted = d.objective == "se" and d.image_weighting != "v"
        if weighted:
            mse = a_i.flatten().square() * mse
    else:
        mse = (img_out.float() - eps_img.float()).square().mean(dim=(1, 2))
        weighted = d.objective == "se"
    if weighted:
        mse = dsm_image_weight(t_img, vp, d.image_weighting, d.max_image_weight).float() * mse
    se_img = _masked_mean(mse, img_active)

    if bool(txt_active.any()):
        out["se_txt"] = se_txt
    if bool(img_active.any()):
        out["se_img"] = se_img
    total = d.lambda_rec_txt * out["rec_txt"] + v.beta_kl * out["kl"] + d.lambda_se * (se_txt + se_img)
    if align_w > 0:
        # 1 - cos(projected states, target states), mean over image tokens, over samples whose
        # image is generated (an exact 0 in the graph when there are none, as for se_img)
        proj = backbone.align_proj(hidden[0][cfg.model.repr_align_layer][sel])
        tgt = target[cfg.model.repr_align_target_layer]
        cos = F.cosine_similarity(proj.float(), tgt.float(), dim=-1)  # (S, N)
        out["align"] = _masked_mean(1.0 - cos.mean(-1), img_active[sel])
        total = total + align_w * out["align"]
    if "rec_img" in out:
        total = total + d.lambda_rec_img * out["rec_img"]
    out["total"] = total
    return out


__all__ = ["score_entropy_absorbing", "absorbing_log_scores", "dsm_image_weight", "mdm_loss", "draw_tasks",
           "tasks_from_uniforms", "absorb", "image_x0_estimate", "TASKS"]
