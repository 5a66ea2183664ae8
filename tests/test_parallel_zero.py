"""ZeRO-3 on 2 gloo ranks trains a tiny MDM with the losses of a plain single-process run on the
same global batch, also with activation checkpointing and with sequence parallel 2; the generated
DeepSpeed config."""

import json

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mdm_dist.config import ConfigError, load_config
from mdm_dist.models.mdm import build_model
from mdm_dist.parallel.zero import deepspeed_config
from test_parallel_groups import spawn

TINY = [
    "model.d_model=32", "model.headdim=8", "model.d_state=8", "model.chunk_size=8", "model.n_layers=2",
    "model.lateral_pad=true", "model.attention_every=1", "model.attn_heads=4",
    "vae.image_size=16", "vae.channel_mult=[1,2]", "vae.base_channels=8", "vae.trunk_width=32",
    "vae.vocab_size=40", "vae.max_text_len=6", "vae.d_z=8",
    "train.global_batch_size=4", "train.micro_batch_size=2", "train.grad_clip=100.0", "parallel.zero_stage=3",
]
STEPS = 3
LR = 1e-2


class LossModel(nn.Module):
    """A simple loss through every part of the MDM: VAE encoders, backbone, text decoder."""

    def __init__(self, mdm):
        super().__init__()
        self.mdm = mdm

    def forward(self, ids, pixels, t, category):
        vae = self.mdm.vae
        mu_t, logvar_t = vae.encode_text(ids)
        mu_i, _ = vae.encode_image(pixels)
        bb = self.mdm.backbone
        if bb.align_proj is None:
            txt_out, img_out = self.mdm(mu_t, mu_i, t, 1.0 - t, category)  # per sample: DP-split safe
            align = 0.0
        else:  # representation alignment's calls: a no-grad pass, states between layers, the projector
            with torch.no_grad():
                _, _, target = bb(mu_t, mu_i, torch.ones_like(t), torch.zeros_like(t), category, hidden_at=(2,))
            txt_out, img_out, hidden = bb(mu_t, mu_i, t, 1.0 - t, category, hidden_at=(0,))
            align = (1.0 - F.cosine_similarity(bb.align_proj(hidden[0]), target[2], dim=-1)).mean()
        logits = vae.decode_text(mu_t + txt_out)
        return (F.cross_entropy(logits.flatten(0, 1), ids.flatten()) + (img_out - mu_i).square().mean()
                + 1e-3 * vae.kl(mu_t, logvar_t).mean() + align)


def _batch(cfg, n=4):
    g = torch.Generator().manual_seed(3)
    return (torch.randint(0, cfg.vae.vocab_size, (n, cfg.vae.max_text_len), generator=g),
            torch.rand(n, 3, cfg.vae.image_size, cfg.vae.image_size, generator=g) * 2 - 1,
            torch.rand(n, generator=g),
            torch.randint(0, cfg.model.num_categories + 1, (n,), generator=g))


def _adamw(model, cfg):
    return torch.optim.AdamW(model.parameters(), lr=LR)


def _trainer_optimizer(model, cfg):
    from mdm_dist.train.optim import build_optimizer

    return build_optimizer(model, cfg.train)


def _reference_losses(cfg, batch, steps, make_opt=_adamw, norms=None):
    torch.manual_seed(0)
    model = LossModel(build_model(cfg))
    opt = make_opt(model, cfg)
    losses = []
    for _ in range(steps):
        loss = model(*batch)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        if norms is not None:
            norms.append(float(norm))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _engine_losses(engine, cfg, batch, dp_rank, world, steps):
    """``steps`` DeepSpeed steps on this data rank's slice of ``batch``; the loss of each step
    averaged over the world (float32)."""
    micro = cfg.train.micro_batch_size
    local = [x[dp_rank * micro: (dp_rank + 1) * micro] for x in batch]
    losses = []
    for _ in range(steps):
        loss = engine(*local)
        engine.backward(loss)
        engine.step()
        dist.all_reduce(loss := loss.detach().float().clone())
        losses.append(loss.item() / world)
    return losses


def _zero_losses(cfg, batch, world, steps, ac="none", sp=1, make_opt=_adamw):
    import deepspeed

    from mdm_dist.parallel.checkpointing import apply_activation_checkpointing
    from mdm_dist.parallel.groups import build_groups
    from mdm_dist.parallel.sequence import apply_sequence_parallel
    from mdm_dist.parallel.zero import build_model_zero

    groups = build_groups(sp)
    ds = deepspeed_config(cfg, world)
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # gather every parameter by hooks
    torch.manual_seed(0)
    mdm = build_model_zero(cfg, ds)
    assert all(p.ds_tensor.numel() < p.ds_numel or p.ds_numel < world for p in mdm.parameters())  # partitioned
    apply_activation_checkpointing(mdm, ac, 1 if ac == "every" else 2)
    apply_sequence_parallel(mdm, groups.sp_group)
    model = LossModel(mdm)
    engine, *_ = deepspeed.initialize(model=model, optimizer=make_opt(model, cfg), config=ds)
    if cfg.train.optimizer == "muon":  # as mdm_dist.train.engine.build_training does
        from mdm_dist.train.optim import clip_before_muon

        clip_before_muon(engine.optimizer, cfg.train.grad_clip)
    losses = _engine_losses(engine, cfg, batch, groups.dp_rank, world, steps)
    return losses


def _zero_worker(rank, world, steps):
    cfg = load_config(None, TINY)
    batch = _batch(cfg)
    ref = _reference_losses(cfg, batch, steps)
    for name, overrides, kw in [
        ("zero3 dp=2", [], {}),
        ("zero3 dp=2 + checkpointing every", [], {"ac": "every"}),
        ("zero3 sp=2 + checkpointing every_k", ["parallel.sequence_parallel=2", "train.micro_batch_size=4"],
         {"ac": "every_k", "sp": 2}),
    ]:
        case_cfg = load_config(None, TINY + overrides)
        losses = _zero_losses(case_cfg, batch, world, steps, **kw)
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=2e-5, atol=2e-6,
                                   msg=lambda m, name=name: f"{name}: {losses} vs {ref}: {m}")


def _zero_align_worker(rank, world, steps):
    cfg = load_config(None, TINY + ["model.repr_align_weight=1.0", "model.repr_align_target_layer=2", "model.adaln=true",
                                    "parallel.sequence_parallel=2",
                                    "train.micro_batch_size=4"])
    batch = _batch(cfg)
    ref = _reference_losses(cfg, batch, steps)
    losses = _zero_losses(cfg, batch, world, steps, ac="every", sp=2)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=2e-5, atol=2e-6)


def _zero_muon_worker(rank, world, steps):
    for name, overrides, kw in [
        ("zero3 dp=2", [], {}),
        ("zero3 sp=2 + checkpointing every", ["parallel.sequence_parallel=2", "train.micro_batch_size=4"],
         {"ac": "every", "sp": 2}),
    ]:
        cfg = load_config(None, TINY + ["train.optimizer=muon", "train.lr=1e-3", "train.muon_lr=0.05",
                                        "train.grad_clip=4.0"] + overrides)
        batch = _batch(cfg)
        norms: list[float] = []
        ref = _reference_losses(cfg, batch, steps, _trainer_optimizer, norms)
        # the raw norm crosses the clip: some steps are clipped before Muon, some are not
        assert min(norms) < 4.0 < max(norms), norms
        losses = _zero_losses(cfg, batch, world, steps, make_opt=_trainer_optimizer, **kw)
        assert ref[-1] < ref[0] - 0.05, ref  # Muon's steps are taken (not shrunk away by clipping)
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=2e-5, atol=2e-6,
                                   msg=lambda m, name=name: f"{name}: {losses} vs {ref}: {m}")


def test_zero3_muon_trains_as_one_process():
    """train.optimizer=muon under ZeRO-3 (DeepSpeed gathers each hidden matrix's gradient and
    orthogonalizes it; AdamW on the rest; the raw gradient clipped first), with data parallel 2
    and with SP 2 + checkpointing: the losses of 4 steps equal those of the same optimizer on the
    whole model in one process, clipped by torch.nn.utils.clip_grad_norm_."""
    spawn(_zero_muon_worker, 4)


def test_zero3_representation_alignment_and_adaln_match_one_process():
    """Representation alignment's pieces under ZeRO-3 + SP 2 + checkpointing: a no-grad call,
    states between layers gathered whole, and the projector called outside the backbone's
    forward (its parameters gathered by its own hooks), with adaLN's conditioning passed to
    every (checkpointed) block, train as in one process."""
    spawn(_zero_align_worker, 2)


def test_zero3_first_loss_matches_one_process():
    """Partitioned build == build_model, and the ZeRO-3 forward (every parameter gathered by hooks,
    the VAE's methods included) gives the single-process loss, also with checkpointing and SP=2."""
    spawn(_zero_worker, 1)


def test_zero3_training_matches_one_process():
    spawn(_zero_worker, STEPS)


# ----------------------------------------------------------------------------------------------


def test_deepspeed_config_generated_and_overridden(tmp_path):
    cfg = load_config(None, TINY + ["train.global_batch_size=32", "train.micro_batch_size=4",
                                    "parallel.sequence_parallel=2"])
    ds = deepspeed_config(cfg, world_size=8, device_type="cuda")
    # dp = 8 / 2 = 4: accumulation 32 / (4 * 4) = 2; DeepSpeed's world counts every rank
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_batch_size"] == 4 * 2 * 8
    assert ds["zero_optimization"]["stage"] == 3 and ds["gradient_clipping"] == 100.0
    # bf16 on GPU: through torch.autocast by default, DeepSpeed's bf16 weights on request; fp32 on CPU
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and not ds["bf16"]["enabled"]
    ds_w = deepspeed_config(load_config(None, TINY + ["train.mixed_precision=bf16_weights"]), 2, "cuda")
    assert ds_w["bf16"]["enabled"] and not ds_w["torch_autocast"]["enabled"]
    cpu = deepspeed_config(cfg, 8, "cpu")
    assert not cpu["bf16"]["enabled"] and not cpu["torch_autocast"]["enabled"]
    # small parameters persist (DeepSpeed's default) on GPU; on CPU none does (one gloo collective
    # per persistent parameter after every step)
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 1e5
    assert cpu["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    with pytest.raises(ConfigError, match="bf16_weights needs a GPU"):
        deepspeed_config(load_config(None, TINY + ["train.dtype=bfloat16", "train.mixed_precision=bf16_weights"]), 2)
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage3_prefetch_bucket_size": 7}, "steps_per_print": 5}))
    cfg2 = load_config(None, TINY + [f"parallel.deepspeed_config={user}"])
    ds2 = deepspeed_config(cfg2, 2)
    assert ds2["zero_optimization"]["stage3_prefetch_bucket_size"] == 7 and ds2["zero_optimization"]["stage"] == 3
    assert ds2["steps_per_print"] == 5
    with pytest.raises(ConfigError, match="multiple of 'train.micro_batch_size' \\(2\\) x data-parallel size \\(8 = 8 ranks"):
        deepspeed_config(load_config(None, TINY), 4 * 2)  # 4 / (2 * 8) is not whole
    with pytest.raises(ConfigError, match="no such file"):
        deepspeed_config(load_config(None, TINY + ["parallel.deepspeed_config=/nonexistent.json"]), 2)


def _autocast_worker(rank, world):
    import deepspeed

    from mdm_dist.parallel.groups import build_groups
    from mdm_dist.parallel.zero import build_model_zero

    cfg = load_config(None, TINY + ["train.dtype=bfloat16", "train.mixed_precision=autocast"])
    batch = _batch(cfg)
    ref = _reference_losses(load_config(None, TINY), batch, STEPS)
    groups = build_groups(1)
    ds = deepspeed_config(cfg, world)
    assert ds["torch_autocast"]["enabled"] and not ds["bf16"]["enabled"]
    torch.manual_seed(0)
    mdm = build_model_zero(cfg, ds)
    model = LossModel(mdm)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=LR), config=ds)
    seen = {}
    mixer = mdm.backbone.layers[0].mixers[0]
    mixer.in_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("in_proj", o.dtype))  # returns None
    # Every parameter is stored fp32 (the SSM ones included); Linear weights travel in bf16.
    assert all(p.ds_tensor.dtype == torch.float32 for p in mdm.parameters())
    assert getattr(mixer.in_proj.weight, "comm_dtype", None) == torch.bfloat16
    assert not hasattr(mixer.A_log, "comm_dtype")
    losses = _engine_losses(engine, cfg, batch, groups.dp_rank, world, STEPS)
    assert seen["in_proj"] == torch.bfloat16  # the matmuls ran in bf16
    assert all(p.ds_tensor.dtype == torch.float32 for p in mdm.parameters())
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=5e-2, atol=1e-2)


def test_zero3_bf16_autocast_keeps_fp32_parameters_and_tracks_fp32_losses():
    """train.mixed_precision=autocast (the default for bf16): fp32 parameters in ZeRO-3's
    partitions (A_log / D / dt_bias included), bf16 matmuls, losses within bf16 error of fp32."""
    spawn(_autocast_worker)
