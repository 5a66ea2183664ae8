"""The tiny MDM overfits one fixed batch under mdm_loss with fixed noise and timesteps.

Every random draw of mdm_loss (VAE samples, masks, eps) comes from a generator re-seeded at every
step, and the tasks/times are fixed, so the loss is a deterministic function of the parameters
and Adam must drive it down: the whole path (VAE, backbone, objectives) is trainable end to end.
"""

from __future__ import annotations

import pytest
import torch

from mdm_dist.config import load_config
from mdm_dist.diffusion import mdm_loss



TINY = [
    "model.d_model=64", "model.n_layers=2", "model.headdim=16", "model.d_state=8",
    "vae.image_size=16", "vae.base_channels=16", "vae.trunk_width=64", "vae.d_z=8",
    "vae.vocab_size=32", "vae.max_text_len=8",
]


@pytest.mark.parametrize("text_process, steps", [("absorbing", 120), ("gaussian", 60)])
def test_tiny_mdm_overfits_one_batch(text_process, steps):
    from mdm_dist.models.mdm import build_model

    cfg = load_config(None, overrides=[*TINY, f"diffusion.text_process={text_process}"])
    torch.manual_seed(0)
    model = build_model(cfg)
    b = 4
    g = torch.Generator().manual_seed(0)
    batch = {
        "ids": torch.randint(2, cfg.vae.vocab_size, (b, cfg.vae.max_text_len), generator=g),
        "images": torch.rand(b, 3, 16, 16, generator=g) * 2 - 1,
        "category": torch.arange(b) % cfg.model.num_categories,
    }
    fixed = {
        "task": ["joint", "t2i", "i2t", "joint"],
        "t_txt": torch.tensor([0.3, 0.5, 0.6, 0.8]),
        "t_img": torch.tensor([0.2, 0.4, 0.5, 0.7]),
        "drop": torch.zeros(b, dtype=torch.bool),
    }
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for _ in range(steps):
        out = mdm_loss(model, batch, cfg, generator=torch.Generator().manual_seed(123), fixed=fixed)
        history.append({k: float(v.detach()) for k, v in out.items()})
        opt.zero_grad(set_to_none=True)
        out["total"].backward()
        opt.step()
    first, last = history[0], history[-1]
    for k in ("total", "se_txt", "se_img", "rec_txt", "rec_img"):
        assert last[k] < first[k] / 10, (k, first[k], last[k])
    assert all(all(v == v for v in h.values()) for h in history)  # no NaN on the way
