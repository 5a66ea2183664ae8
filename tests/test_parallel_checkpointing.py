"""Activation checkpointing gives the losses and gradients of the plain model (ZeRO-3: see
test_parallel_zero.py, which trains with checkpointing on 2 ranks)."""

import copy

import pytest
import torch

from mdm_dist.config import load_config
from mdm_dist.models.mdm import build_model
from mdm_dist.parallel.checkpointing import apply_activation_checkpointing
from test_parallel_sequence import BASE, _inputs, _loss_and_grads


@pytest.mark.parametrize("mode,k,expect", [("every", 2, [0, 1, 2]), ("every_k", 2, [0, 2]), ("none", 2, [])])
def test_checkpointing_matches_plain(mode, k, expect):
    torch.manual_seed(0)
    cfg = load_config(None, BASE + ["model.attention_every=1", "model.attn_heads=4"])
    model = build_model(cfg, dtype=torch.float64)
    with torch.no_grad():
        for head in (model.backbone.txt_out, model.backbone.img_out):
            head.weight.normal_(std=0.1)
    inp = _inputs(cfg)
    ref = _loss_and_grads(model, inp)
    ac = copy.deepcopy(model)
    assert apply_activation_checkpointing(ac, mode, k) == expect
    assert [n for n, _ in ac.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert ac.state_dict().keys() == model.state_dict().keys()
    out = _loss_and_grads(ac, inp)
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(out[1], ref[1], rtol=0, atol=0)
    for name, grad in out[2].items():
        torch.testing.assert_close(grad, ref[2][name], rtol=1e-12, atol=1e-14, msg=name)


def test_checkpointing_bad_mode():
    cfg = load_config(None, BASE)
    with pytest.raises(ValueError, match="allowed values: none, every, every_k"):
        apply_activation_checkpointing(build_model(cfg), "some")
