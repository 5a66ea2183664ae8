"""Samplers: joint image + caption generation, text -> image, image -> text.

Time runs from t = 1 down to ``diffusion.t_eps`` on a uniform grid of ``steps`` steps
(t_0 = 1 > t_1 > ... > t_steps = t_eps, dt = t_i - t_{i+1}). Each step calls the backbone at
the current states (a generated modality at time t, a given condition at time 0).

Continuous latents (image; text under ``text_process: gaussian``) follow the VP
probability-flow ODE (Song et al. 2021), written with the eps prediction::

    dz/dt = f(z, t) = -1/2 beta(t) (z + score) = -1/2 beta(t) (z - eps_hat(z, t) / sigma(t))

* ``dpm2`` (default, the paper's update): Heun's 2nd-order method,
  z~ = z_t - dt f(z_t, t)                        (Euler predictor)
  z_{t-dt} = z_t - dt/2 [f(z_t, t) + f(z~, t - dt)]
  (two backbone calls per step).
* ``ddim`` (eta = 0): x0_hat = (z_t - sigma_t eps_hat) / sqrt(abar_t),
  z_s = sqrt(abar_s) x0_hat + sigma_s eps_hat.
* ``euler``: the predictor alone (first order; kept as the baseline the tests compare against).

Text under ``absorbing`` starts all-MASK. A step from t to s uses the exact absorbing posterior
given the model's clean-token estimate p0(y) = softmax_{y != MASK}(s_y) (the log-scores are
log p0(y) + log(e^-sigma / (1 - e^-sigma)), so normalizing exp(s_y) over y != MASK gives p0): a
masked position stays masked with probability (1 - e^{-sigma(s)}) / (1 - e^{-sigma(t)}), else
it becomes y ~ p0; an unmasked position is final. The last step goes to s = 0 (stay
probability 0), so no MASK remains. ``diffusion.text_temperature`` T (or ``sample(...,
text_temperature=)``) draws y from p0^(1/T) renormalized instead: 1 (default) is the exact reverse
process, T < 1 favours the likely tokens, 0 takes the most likely one (greedy, as masked-token
decoders often do for captions: a caption should name what the image most likely shows, not a
draw from the model's uncertainty). Under ``gaussian`` the text latents are solved by the same
ODE and decoded by argmax of ``vae.decode_text`` (MASK excluded).

In ``joint`` mode both modalities share t. For ``dpm2`` the text posterior step t -> s is taken
with the first call's log-scores, so the corrector call at s sees both modalities at time s.

Classifier-free guidance (``guidance_scale`` w != 1): eps = eps_u + w (eps_c - eps_u) and
s = s_u + w (s_c - s_u) for the log-scores; the unconditional call uses the null category and,
in ``t2i``, all-MASK text (absorbing) or pure-noise text latents (gaussian) at t_txt = 1, in
``i2t`` a pure-noise image at t_img = 1 (the same inputs ``mdm_loss`` trains on when it drops a
condition). The two calls are batched together. w = 1 skips the unconditional call.

Self-conditioning (``model.self_condition``): every backbone call that generates the image also
gets the clean-image estimate of the call before it (zeros at the first), as in Chen et al. 2022;
with guidance, the guided estimate, for both halves of the batch.

Best of n (``sample_best_of``, text-to-image only): n candidate images per caption, each read
back by the same model's captioner; the candidate under which the prompt is most likely is kept.
The score, ``caption_pseudo_log_likelihood``, is sum_i log p0(x_i | image, the caption with only
position i masked) over the L caption positions (PAD included, so every candidate of a caption
is scored on the same positions): the captioner reading the clean image (t_img = 0) at the text
time where one token in L is masked. Each word is judged against the image given the rest of the
caption, so the template (where the shape word sits) is known and only the image decides it.
It needs ``text_process: absorbing``. The unified model judges its own samples with the
direction it learns more easily (reading shape from an image; benchmarks/demo_results.md);
nothing outside the model is used.

Given conditions are VAE-encoded and sampled (z = mu + sigma eps), as ``mdm_loss`` does.
Every random number comes from ``generator`` (which must live on the model's device), so a
seeded generator makes the output reproducible.
"""

from __future__ import annotations

import torch

from mdm_dist.diffusion.objectives import I2T, T2I, TASKS, image_x0_estimate
from mdm_dist.diffusion.schedules import VPSchedule, from_config

SAMPLERS = ("dpm2", "ddim", "euler")


def default_guidance(d, mode: str) -> float:
    """The config's guidance scale for ``mode``: ``caption_guidance_scale`` for i2t when it is
    set (captioning and text-to-image often want different scales), else ``guidance_scale``."""
    if mode == "i2t" and d.caption_guidance_scale is not None:
        return float(d.caption_guidance_scale)
    return float(d.guidance_scale)


def guide(cond: torch.Tensor, uncond: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + w (cond - uncond)."""
    return uncond + w * (cond - uncond)


def pf_ode_drift(z: torch.Tensor, eps_hat: torch.Tensor, t: float, vp: VPSchedule) -> torch.Tensor:
    """VP probability-flow drift f(z, t) = -1/2 beta(t) (z - eps_hat / sigma(t))."""
    beta, sigma = float(vp.beta(t)), float(vp.sigma(t))
    return -0.5 * beta * (z - eps_hat / sigma)


def ddim_step(z: torch.Tensor, eps_hat: torch.Tensor, t: float, s: float, vp: VPSchedule) -> torch.Tensor:
    """Deterministic DDIM from t to s: sqrt(abar_s) x0_hat + sigma_s eps_hat."""
    a_t, a_s = float(vp.alpha_bar(t)), float(vp.alpha_bar(s))
    x0_hat = (z - float(vp.sigma(t)) * eps_hat) / a_t**0.5
    return a_s**0.5 * x0_hat + float(vp.sigma(s)) * eps_hat


def absorbing_step(
    x: torch.Tensor, log_scores: torch.Tensor, stay_prob: float, mask_id: int,
    generator: torch.Generator | None = None, temperature: float = 1.0,
) -> torch.Tensor:
    """One reverse step of the absorbing process (see the module doc).

    x (B, L) ids with MASKs; log_scores (B, L, V); stay_prob = (1 - e^-sigma_s) / (1 - e^-sigma_t).
    Each masked position independently stays MASK with prob ``stay_prob``, else takes
    y ~ p0 = softmax over y != MASK of the log-scores (Gumbel-max, so ``generator`` decides),
    at ``temperature`` T: y ~ softmax(log p0 / T); T = 0 takes argmax p0. The random numbers
    drawn are the same for every T.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    s = log_scores.float().clone()
    s[..., mask_id] = float("-inf")
    logp = torch.log_softmax(s, dim=-1)
    u = torch.rand(logp.shape, generator=generator, device=logp.device, dtype=logp.dtype)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
    y = logp.argmax(-1) if temperature == 0 else (logp / temperature + gumbel).argmax(-1)
    keep = torch.rand(x.shape, generator=generator, device=x.device) < stay_prob
    unmask = (x == mask_id) & ~keep
    return torch.where(unmask, y, x)


def _latent_dtype(model) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return torch.float64 if p.dtype == torch.float64 else torch.float32
    return torch.float32


def _device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def sample(
    model,
    mode: str,
    batch_size: int | None = None,
    ids: torch.Tensor | None = None,
    images: torch.Tensor | None = None,
    img_latents: torch.Tensor | None = None,
    category: torch.Tensor | int | None = None,
    steps: int | None = None,
    sampler: str | None = None,
    guidance_scale: float | None = None,
    generator: torch.Generator | None = None,
    text_temperature: float | None = None,
    t_start: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Generate with an MDM (``.vae``, ``.backbone``, ``.cfg``).

    Args:
        mode: ``"joint"`` (image and caption together; needs ``batch_size`` or ``category``),
            ``"t2i"`` (needs ``ids`` (B, L)), ``"i2t"`` (needs ``images`` (B, 3, H, W) in [-1, 1]
            or ``img_latents`` (B, N, d_z) clean image latents).
        category: (B,) long, an int for all, or None (class 0).
        steps, sampler (``dpm2`` | ``ddim`` | ``euler``), guidance_scale: default to
            ``cfg.diffusion.sample_steps``, ``.sampler``, ``.guidance_scale`` (for ``i2t``:
            ``.caption_guidance_scale`` when it is set).
        generator: a torch.Generator on the model's device for reproducible samples.
        text_temperature: absorbing text's sampling temperature (module doc); default
            ``cfg.diffusion.text_temperature``.
        t_start: ``t2i`` only: below 1, start from ``img_latents`` (B, N, d_z) noised to
            t_start (z = sqrt(abar) img_latents + sigma eps) and solve from there (SDEdit, Meng
            et al. 2022: how much of a given image the caption keeps at each noise level).

    Returns:
        dict with ``images`` (B, 3, H, W) clamped to [-1, 1], ``ids`` (B, L) long (never MASK),
        ``img_latents`` (B, N, d_z). A given condition is returned: ``ids`` for t2i; for i2t
        ``img_latents`` are the (sampled) condition latents and ``images`` their decoding.
        Latents are float32 (float64 if the model is) whatever the model dtype; the VAE's
        decoders get their parameter dtype.
    Runs under ``torch.no_grad()`` in eval mode; the model's training flag is restored.
    """
    d = model.cfg.diffusion
    if mode not in TASKS:
        raise ValueError(f"sample mode {mode!r}; allowed values: {', '.join(TASKS)}")
    sampler = sampler or d.sampler
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r}; allowed values: {', '.join(SAMPLERS)}")
    steps = d.sample_steps if steps is None else int(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    w = float(guidance_scale) if guidance_scale is not None else default_guidance(d, mode)
    temp = float(d.text_temperature if text_temperature is None else text_temperature)
    if temp < 0:
        raise ValueError(f"text_temperature must be >= 0 (1 = exact, 0 = greedy), got {temp}")
    if mode == "t2i" and ids is None:
        raise ValueError("sample(mode='t2i') needs ids (B, L): the text condition")
    if mode == "i2t" and images is None and img_latents is None:
        raise ValueError("sample(mode='i2t') needs images (B, 3, H, W) or img_latents (B, N, d_z)")
    if not d.t_eps < t_start <= 1.0:
        raise ValueError(f"t_start must lie in (diffusion.t_eps = {d.t_eps}, 1], got {t_start}")
    if t_start < 1.0 and (mode != "t2i" or img_latents is None):
        raise ValueError("t_start < 1 starts text-to-image from given latents: mode='t2i' with img_latents (B, N, d_z)")

    was_training = model.training
    model.eval()
    try:
        return _sample(model, TASKS.index(mode), batch_size, ids, images, img_latents, category,
                       steps, sampler, w, generator, temp, t_start)
    finally:
        model.train(was_training)


def _sample(model, mode, batch_size, ids, images, img_latents, category, steps, sampler, w, gen, temp=1.0,
            t_start=1.0):
    cfg = model.cfg
    d, v = cfg.diffusion, cfg.vae
    vae, backbone = model.vae, model.backbone
    device, dtype = _device(model), _latent_dtype(model)
    vdt = next((p.dtype for p in vae.parameters() if p.is_floating_point()), dtype)  # VAE inputs
    sched = from_config(d)
    vp, tnoise = sched.vp, sched.text
    absorbing = d.text_process == "absorbing"
    L, N, dz = v.max_text_len, vae.num_image_tokens, v.d_z

    # -- batch size and category ----------------------------------------------------------
    sizes = {}
    if ids is not None and mode == T2I:
        sizes["ids"] = ids.shape[0]
    if mode == I2T:
        sizes["images" if img_latents is None else "img_latents"] = (images if img_latents is None else img_latents).shape[0]
    if isinstance(category, torch.Tensor):
        sizes["category"] = category.shape[0]
    if batch_size is not None:
        sizes["batch_size"] = batch_size
    if not sizes:
        raise ValueError("sample(mode='joint') needs batch_size (or a category tensor)")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"inconsistent batch sizes: {sizes}")
    b = next(iter(sizes.values()))
    if category is None:
        category = torch.zeros(b, dtype=torch.long, device=device)
    elif isinstance(category, int):
        category = torch.full((b,), category, dtype=torch.long, device=device)
    else:
        category = category.to(device=device, dtype=torch.long)
    null = torch.full_like(category, cfg.model.num_categories)

    def randn(*shape):
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)

    gen_txt, gen_img = mode != T2I, mode != I2T

    # -- initial states and conditions (random draws in a fixed order) ------------------------
    if gen_img:
        z_img = randn(b, N, dz)
        if t_start < 1.0:  # SDEdit: the given latents noised to t_start
            start = img_latents.to(device=device, dtype=dtype)
            if start.shape != z_img.shape:
                raise ValueError(f"img_latents must have shape {tuple(z_img.shape)}, got {tuple(start.shape)}")
            z_img = float(vp.alpha_bar(t_start)) ** 0.5 * start + float(vp.sigma(t_start)) * z_img
    else:
        if img_latents is None:
            img_latents = vae.sample(*vae.encode_image(images.to(device)), gen)
        z_img = img_latents.to(device=device, dtype=dtype)
    if gen_txt:
        x = torch.full((b, L), v.mask_id, dtype=torch.long, device=device)
        z_txt = None if absorbing else randn(b, L, dz)
    else:
        x = ids.to(device=device, dtype=torch.long)
        z_txt = vae.sample(*vae.encode_text(x), gen).to(dtype)
    use_cfg = w != 1.0
    if use_cfg and mode == T2I:  # unconditional text input
        if absorbing:
            u_ids = torch.full((b, L), v.mask_id, dtype=torch.long, device=device)
            u_txt = vae.sample(*vae.encode_text(u_ids), gen).to(dtype)
        else:
            u_txt = randn(b, L, dz)
    if use_cfg and mode == I2T:
        u_img = randn(b, N, dz)

    mask_col = torch.zeros(v.vocab_size, dtype=torch.bool, device=device)
    mask_col[v.mask_id] = True

    def text_latent(x_ids, z):
        if gen_txt and absorbing:
            return vae.sample(*vae.encode_text(x_ids), gen).to(dtype)
        return z

    self_cond = cfg.model.self_condition and gen_img
    sc = {"x0": torch.zeros(b, N, dz, device=device, dtype=dtype)} if self_cond else {}

    def denoise(txt, img, t: float):
        """(text prediction, image eps): text prediction = log-scores (absorbing) or eps."""
        ones = torch.ones(b, device=device, dtype=torch.float32)
        t_txt = ones * (t if gen_txt else 0.0)
        t_img = ones * (t if gen_img else 0.0)
        z_img_in = img
        cat = category
        sc_kw = {"img_sc": sc["x0"]} if self_cond else {}
        if use_cfg:
            u_txt_in, ut_txt = (u_txt, ones) if mode == T2I else (txt, t_txt)
            u_img_in, ut_img = (u_img, ones) if mode == I2T else (img, t_img)
            txt = torch.cat([txt, u_txt_in.to(txt.dtype)])
            img = torch.cat([img, u_img_in.to(img.dtype)])
            t_txt, t_img = torch.cat([t_txt, ut_txt]), torch.cat([t_img, ut_img])
            cat = torch.cat([category, null])
            sc_kw = {k: torch.cat([v, v]) for k, v in sc_kw.items()}
        txt_out, img_out = backbone(txt, img, t_txt, t_img, cat, **sc_kw)
        txt_pred = vae.decode_text(txt_out).float() if absorbing else txt_out.to(dtype)
        if absorbing and d.text_score == "conditional":
            # log p(x0 | x_t): absorbing_step only needs the distribution (log r is one shift per
            # sample, and guidance combines normalized log-probabilities, not raw logits)
            txt_pred = txt_pred.masked_fill(mask_col, float("-inf")).log_softmax(-1)
        img_pred = img_out.to(dtype)
        if use_cfg:  # guidance is linear, so guiding v (or eps) before the conversion below is the same
            txt_pred = guide(txt_pred[:b], txt_pred[b:], w)
            img_pred = guide(img_pred[:b], img_pred[b:], w)
        if self_cond:  # the next call's estimate of the clean image
            sc["x0"] = image_x0_estimate(img_pred, z_img_in, ones * t, vp, d.image_prediction)
        if gen_img and d.image_prediction == "v":  # eps = sqrt(abar) v + sigma z_t
            img_pred = float(vp.alpha_bar(t)) ** 0.5 * img_pred + float(vp.sigma(t)) * z_img_in
        return txt_pred, img_pred

    # the continuous latents this run integrates: image and/or gaussian text
    def ode_states():
        return [z for z, on in ((z_img, gen_img), (z_txt, gen_txt and not absorbing)) if on]

    ts = torch.linspace(t_start, d.t_eps, steps + 1, dtype=torch.float64).tolist()
    for i in range(steps):
        t, s = ts[i], ts[i + 1]
        txt_pred, img_eps = denoise(text_latent(x, z_txt), z_img, t)
        eps = []
        if gen_img:
            eps.append(img_eps)
        if gen_txt and absorbing:
            # (1 - e^-sigma(s)) / (1 - e^-sigma(t)); the last step goes to s = 0
            stay = 0.0 if i == steps - 1 else float(tnoise.mask_prob(s) / tnoise.mask_prob(t))
            x = absorbing_step(x, txt_pred, stay, v.mask_id, gen, temperature=temp)
        elif gen_txt:
            eps.append(txt_pred)
        states = ode_states()
        if not states:
            continue
        if sampler == "ddim":
            new = [ddim_step(z, e, t, s, vp) for z, e in zip(states, eps)]
        else:
            d1 = [pf_ode_drift(z, e, t, vp) for z, e in zip(states, eps)]
            new = [z - (t - s) * f for z, f in zip(states, d1)]  # Euler predictor
            if sampler == "dpm2":
                z_img_p = new[0] if gen_img else z_img
                z_txt_p = new[-1] if (gen_txt and not absorbing) else z_txt
                txt_pred2, img_eps2 = denoise(text_latent(x, z_txt_p), z_img_p, s)
                eps2 = ([img_eps2] if gen_img else []) + ([txt_pred2] if gen_txt and not absorbing else [])
                d2 = [pf_ode_drift(zp, e, s, vp) for zp, e in zip(new, eps2)]
                new = [z - (t - s) / 2 * (f1 + f2) for z, f1, f2 in zip(states, d1, d2)]
        if gen_img:
            z_img = new[0]
        if gen_txt and not absorbing:
            z_txt = new[-1]

    if gen_txt and not absorbing:
        logits = vae.decode_text(z_txt.to(vdt)).float()
        logits[..., v.mask_id] = float("-inf")
        x = logits.argmax(-1)
    images_out = vae.decode_image(z_img.to(vdt)).float().clamp(-1.0, 1.0)
    return {"images": images_out, "ids": x, "img_latents": z_img}


def one_token_time(d, length: int) -> float:
    """The text time t at which the absorbing process masks 1 of ``length`` tokens on average
    (mask_prob(t) = 1 / length, by bisection on the configured schedule)."""
    tnoise = from_config(d).text
    lo, hi = float(d.t_eps), 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if float(tnoise.mask_prob(mid)) < 1.0 / length else (lo, mid)
    return 0.5 * (lo + hi)


@torch.no_grad()
def caption_pseudo_log_likelihood(model, img_latents: torch.Tensor, ids: torch.Tensor,
                                  category: torch.Tensor | int | None = None) -> torch.Tensor:
    """(B,) float64: sum_i log p0(ids_i | img_latents, the caption with position i masked), the
    model's captioner reading the image (module doc, "Best of n").

    ``img_latents`` (B, N, d_z) clean image latents (t_img = 0), ``ids`` (B, L) the caption to
    score. One backbone call per position, at the text time where 1 token in L is masked
    (`one_token_time`); the text enters as its VAE mean, so the score is deterministic. Eval
    mode, the training flag restored."""
    cfg = model.cfg
    d, v = cfg.diffusion, cfg.vae
    if d.text_process != "absorbing":
        raise ValueError("caption_pseudo_log_likelihood needs diffusion.text_process: absorbing "
                         f"(got {d.text_process!r}): under gaussian text there is no per-token likelihood")
    vae, backbone = model.vae, model.backbone
    device, dtype = _device(model), _latent_dtype(model)
    b, length = ids.shape
    if img_latents.shape[0] != b:
        raise ValueError(f"img_latents has {img_latents.shape[0]} rows, ids {b}")
    if category is None:
        category = 0
    if isinstance(category, int):
        category = torch.full((b,), category, dtype=torch.long, device=device)
    ids = ids.to(device=device, dtype=torch.long)
    img = img_latents.to(device=device, dtype=dtype)
    t_txt = torch.full((b,), one_token_time(d, length), device=device, dtype=torch.float32)
    t_img = torch.zeros(b, device=device, dtype=torch.float32)
    rows = torch.arange(b, device=device)
    total = torch.zeros(b, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        for i in range(length):
            x = ids.clone()
            x[:, i] = v.mask_id
            txt_out, _ = backbone(vae.encode_text(x)[0].to(dtype), img, t_txt, t_img,
                                  category.to(device=device, dtype=torch.long))
            logits = vae.decode_text(txt_out[:, i]).double()
            logits[..., v.mask_id] = float("-inf")
            total += logits.log_softmax(-1)[rows, ids[:, i]]
        return total
    finally:
        model.train(was_training)


@torch.no_grad()
def sample_best_of(model, ids: torch.Tensor, n: int, generator: torch.Generator | None = None,
                   **kw) -> dict[str, torch.Tensor]:
    """Text-to-image, best of ``n`` (module doc): ``sample(model, "t2i", ...)`` on every caption
    repeated n times (one batched call; ``kw``: steps, sampler, guidance_scale, category), each
    candidate scored by ``caption_pseudo_log_likelihood`` against its caption, the best kept.

    Returns ``sample``'s dict for the kept candidates (B rows) plus ``scores`` (B, n) float64,
    ``chosen`` (B,) long, the index of the kept candidate, and ``candidate_latents`` (B, n, N,
    d_z), every candidate's image latents (each one a plain sample of its caption, so figures
    averaged over them are those of plain sampling). With n = 1 the images are those of
    ``sample`` with the same generator."""
    if n < 1:
        raise ValueError(f"best-of n must be >= 1, got {n}")
    b = ids.shape[0]
    cat = kw.pop("category", None)
    rep_cat = cat.repeat_interleave(n, 0) if isinstance(cat, torch.Tensor) else cat
    out = sample(model, "t2i", ids=ids.repeat_interleave(n, 0), category=rep_cat, generator=generator, **kw)
    scores = caption_pseudo_log_likelihood(model, out["img_latents"], out["ids"], rep_cat).view(b, n)
    chosen = scores.argmax(1)
    rows = torch.arange(b, device=chosen.device) * n + chosen
    kept = {k: t[rows.to(t.device)] for k, t in out.items()}
    cands = out["img_latents"].view(b, n, *out["img_latents"].shape[1:])
    return {**kept, "scores": scores, "chosen": chosen, "candidate_latents": cands}


__all__ = ["sample", "sample_best_of", "caption_pseudo_log_likelihood", "one_token_time", "guide", "pf_ode_drift", "ddim_step",
           "absorbing_step", "SAMPLERS"]
