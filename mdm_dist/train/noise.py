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

from mdm_dist.diffusion import draw_tasks


def sample_seed(seed: int, step: int, key: str) -> int:
    digest = hashlib.sha256(f"{seed}:{step}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class SampleNoise:
    """One CPU generator per sample; ``fixed`` draws for ``mdm_loss`` and a per-sample VAE sample."""

    def __init__(self, keys: Sequence[str], seed: int, step: int):
        self.gens = [torch.Generator().manual_seed(sample_seed(seed, step, k)) for k in keys]

    def fixed(self, cfg, num_image_tokens: int, device) -> dict[str, torch.Tensor]:
        L, dz = cfg.vae.max_text_len, cfg.vae.d_z
        rows = []
        for g in self.gens:
            d = draw_tasks(cfg, 1, "cpu", g)
            d["mask_noise"] = torch.rand((1, L), generator=g)
            d["eps_img"] = torch.randn((1, num_image_tokens, dz), generator=g)
            if cfg.diffusion.text_process == "gaussian":
                d["eps_txt"] = torch.randn((1, L, dz), generator=g)
            if cfg.model.self_condition:
                d["sc"] = torch.rand((1,), generator=g)
            if cfg.model.image_mask_prob > 0:
                d["img_mask"] = torch.rand((1,), generator=g)
                d["img_mask_tokens"] = torch.rand((1, num_image_tokens), generator=g)
            rows.append(d)
        return {k: torch.cat([r[k] for r in rows]).to(device) for k in rows[0]}

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
