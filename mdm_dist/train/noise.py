"""Per-sample random draws that do not depend on where a sample sits.

``mdm_loss`` draws its noise (task, condition drop, times, MASK noise, eps, the VAE's
reparameterization noise) from one generator over the whole batch, so the noise a sample gets
depends on its position in the local micro-batch. With data parallelism the same global batch is
split differently over ranks and micro-batches, so a 2-rank run would see different noise from a
1-rank run, and a resumed run from an uninterrupted one unless every generator state is restored.

Here every sample gets its own generator, seeded from ``(train.seed, step, sample key)``. The
draws that ``mdm_loss`` accepts through ``fixed`` come from it, and the VAE's ``sample`` is
routed to it for the duration of the loss (:func:`per_sample_noise`). A sample's loss is then a
function of (weights, sample, step) only: the same on any number of ranks, any micro-batch split,
and after a resume.

One thing this cannot fix: ``se_txt`` / ``se_img`` are means over the *active* samples of a
micro-batch (those whose text / image is generated). With mixed tasks the active count differs
between micro-batches, so averaging per-rank means (what DP does) weights samples differently
from one big batch. The expectation is the same; exact equality across layouts needs a single
task (``diffusion.task_probs={joint: 1}``, ``p_uncond=0``), which the equivalence tests use.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence

import torch

from mdm_dist.diffusion import tasks_from_uniforms


def sample_seed(seed: int, step: int, key: str) -> int:
    digest = hashlib.sha256(f"{seed}:{step}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class SampleNoise:
    """One CPU generator per sample; ``fixed`` draws for ``mdm_loss`` and a per-sample VAE sample."""

    def __init__(self, keys: Sequence[str], seed: int, step: int):
        self.gens = [torch.Generator().manual_seed(sample_seed(seed, step, k)) for k in keys]

    def fixed(self, cfg, num_image_tokens: int, device) -> dict[str, torch.Tensor]:
        """Each sample's draws from its own generator, in this order: the 4 uniforms of
        :func:`~mdm_dist.diffusion.draw_tasks` (task, drop, text time, image time), the text's MASK
        noise (L), eps of the image latents, eps of the text latents (``gaussian`` text process),
        then the self-conditioning and image-masking uniforms where configured. The CPU generator
        fills consecutive uniforms the same whether asked for one by one or in one call, so each
        sample's leading uniforms come from one call (each normal tensor from one call of its own
        size, as before); the tasks and times are then computed for the whole batch at once
        (:func:`~mdm_dist.diffusion.tasks_from_uniforms`). ``tests/test_train_units.py`` checks the
        result against the draws made one by one."""
        L, dz, T = cfg.vae.max_text_len, cfg.vae.d_z, num_image_tokens
        gaussian_text = cfg.diffusion.text_process == "gaussian"
        n_late = (1 if cfg.model.self_condition else 0) + (1 + T if cfg.model.image_mask_prob > 0 else 0)
        u, eps_img, eps_txt, late = [], [], [], []
        for g in self.gens:
            u.append(torch.rand(4 + L, generator=g))
            eps_img.append(torch.randn(T * dz, generator=g))
            if gaussian_text:
                eps_txt.append(torch.randn(L * dz, generator=g))
            if n_late:
                late.append(torch.rand(n_late, generator=g))
        b = len(self.gens)
        u = torch.stack(u)
        d = tasks_from_uniforms(cfg, u[:, 0], u[:, 1], u[:, 2], u[:, 3])
        d["mask_noise"] = u[:, 4:]
        d["eps_img"] = torch.stack(eps_img).view(b, T, dz)
        if gaussian_text:
            d["eps_txt"] = torch.stack(eps_txt).view(b, L, dz)
        if n_late:
            late, i = torch.stack(late), 0
            if cfg.model.self_condition:
                d["sc"], i = late[:, 0], 1
            if cfg.model.image_mask_prob > 0:
                d["img_mask"], d["img_mask_tokens"] = late[:, i], late[:, i + 1:]
        return {k: v.to(device) for k, v in d.items()}

    def vae_sample(self, mu: torch.Tensor, logvar: torch.Tensor, generator=None) -> torch.Tensor:
        if mu.shape[0] != len(self.gens):
            raise ValueError(f"per-sample noise for {len(self.gens)} samples, got a batch of {mu.shape[0]}")
        eps = torch.stack([torch.randn(mu.shape[1:], generator=g, dtype=torch.float32) for g in self.gens])
        return mu + torch.exp(0.5 * logvar) * eps.to(device=mu.device, dtype=mu.dtype)


@contextlib.contextmanager
def per_sample_noise(vae, noise: SampleNoise):
    """Route ``vae.sample`` (a static method) to the per-sample generators while active."""
    vae.__dict__["sample"] = noise.vae_sample
    try:
        yield
    finally:
        vae.__dict__.pop("sample", None)
