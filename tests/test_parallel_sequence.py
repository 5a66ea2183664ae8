"""Sequence parallel (SP = 2, gloo) gives the forward outputs and gradients of the plain backbone."""

import copy

import pytest
import torch
import torch.distributed as dist

from mdm_dist.config import load_config
from mdm_dist.models.mdm import build_model
from mdm_dist.parallel.groups import build_groups
from mdm_dist.parallel.sequence import apply_sequence_parallel
from test_parallel_groups import spawn

# Odd sequence length (3 + 6 + 1 + 4 * 5 + 1 = 31 tokens: padding on the last rank), 4 directions,
# lateral pads, long skips; 8 mixer heads.
BASE = [
    "model.d_model=32", "model.headdim=8", "model.d_state=8", "model.chunk_size=8", "model.n_layers=2",
    "model.lateral_pad=true", "model.long_skip=true", "model.num_tail_pad=1",
    "vae.image_size=16", "vae.channel_mult=[1,2]", "vae.base_channels=8", "vae.trunk_width=32",
    "vae.vocab_size=40", "vae.max_text_len=6", "vae.d_z=8",
]
CASES = {
    "groups_replicated": ["model.ngroups=1", "model.self_condition=true"],  # sp % ngroups == 0; + img_sc
    "groups_split_hybrid": ["model.ngroups=2", "model.attention_every=1", "model.attn_heads=4",  # + Ulysses
                            "model.image_mask_prob=0.5", "model.adaln=true"],  # + img_keep, adaLN
}


def _inputs(cfg, b=2):
    g = torch.Generator().manual_seed(1)
    n_img = (cfg.vae.image_size // (2 ** (len(cfg.vae.channel_mult) - 1) * cfg.vae.patch_size)) ** 2
    f64 = torch.float64
    inp = dict(
        txt=torch.randn(b, cfg.vae.max_text_len, cfg.vae.d_z, generator=g, dtype=f64),
        img=torch.randn(b, n_img, cfg.vae.d_z, generator=g, dtype=f64),
        t_txt=torch.rand(b, generator=g, dtype=f64), t_img=torch.rand(b, generator=g, dtype=f64),
        category=torch.randint(0, cfg.model.num_categories + 1, (b,), generator=g),
    )
    if cfg.model.self_condition:
        inp["img_sc"] = torch.randn(b, n_img, cfg.vae.d_z, generator=g, dtype=f64)
    if cfg.model.image_mask_prob > 0:
        inp["img_keep"] = torch.rand(b, n_img, generator=g) > 0.3
    return inp


def _loss_and_grads(model, inp, hidden_at=()):
    model.zero_grad()
    txt, img, *hidden = model.backbone(**inp, hidden_at=hidden_at)
    g = torch.Generator().manual_seed(2)
    loss = (txt * torch.randn(txt.shape, generator=g, dtype=txt.dtype)).sum() + \
        (img * torch.randn(img.shape, generator=g, dtype=img.dtype)).sum()
    for i in hidden_at:  # representation alignment reads the image tokens' states between layers
        h = hidden[0][i]
        loss = loss + (h * torch.randn(h.shape, generator=g, dtype=h.dtype)).sum()
        img = torch.cat([img, h], dim=-1)
    loss.backward()
    return txt.detach(), img.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _sp_worker(rank, world, case, hidden_at=()):
    torch.manual_seed(0)
    cfg = load_config(None, BASE + CASES[case])
    model = build_model(cfg, dtype=torch.float64)
    with torch.no_grad():  # zero-initialized heads would block every upstream gradient
        for head in (model.backbone.txt_out, model.backbone.img_out, model.backbone.img_sc_in):
            if head is not None:  # (img_sc_in: self-conditioning's input, zero-initialized too)
                head.weight.normal_(std=0.1)
        for name, p in model.named_parameters():  # adaLN's maps, zero-initialized too
            if ".ada." in name:
                p.normal_(std=0.1)
    inp = _inputs(cfg)
    ref_txt, ref_img, ref_grads = _loss_and_grads(model, inp, hidden_at)

    groups = build_groups(2)
    sp_model = apply_sequence_parallel(copy.deepcopy(model), groups.sp_group)
    assert [n for n, _ in sp_model.named_parameters()] == [n for n, _ in model.named_parameters()]
    txt, img, grads = _loss_and_grads(sp_model, inp, hidden_at)
    torch.testing.assert_close(txt, ref_txt, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(img, ref_img, rtol=1e-10, atol=1e-10)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        dist.all_reduce(grad, group=groups.sp_group)  # the trainer's mean over data x sequence ranks
        grad /= groups.sp_size
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("case", list(CASES))
def test_sequence_parallel_matches_single_rank(case):
    spawn(_sp_worker, case)


def test_sequence_parallel_hidden_states_match_single_rank():
    """The states between layers that representation alignment reads (``hidden_at``: after the
    first Mamba block and after the attention block) come back whole, with the gradients of one
    rank."""
    spawn(_sp_worker, "groups_split_hybrid", (0, 1))
