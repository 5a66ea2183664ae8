"""Process group, model and DeepSpeed engine, and one optimizer step with the NaN/inf guard.

The parallelism is applied to the plain model by the functions of ``mdm_dist.parallel``, in
torchtitan's order: build (partitioned under ZeRO-3) -> ZeRO-3 safety -> activation
checkpointing -> sequence parallel -> ``deepspeed.initialize`` with a client optimizer (AdamW, or
Muon + AdamW: ``mdm_dist.train.optim``).
"""

from __future__ import annotations

import datetime
import math
import warnings
import os
import socket
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from mdm_dist.config import Config, ConfigError
from mdm_dist.diffusion import mdm_loss
from mdm_dist.train.noise import SampleNoise, per_sample_noise
from mdm_dist.train.optim import build_optimizer, clip_before_muon, set_lr

LOSS_TERMS = ("total", "rec_img", "rec_txt", "kl", "se_txt", "se_img", "align")


# ----------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> torch.device:
    """Join the process group the launcher describes (deepspeed, torchrun, srun + env), or make a
    world of one for a plain ``python`` run. nccl on GPU, gloo on CPU. Returns this rank's device."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# Model + engine
# ----------------------------------------------------------------------------------------------


class LossModule(nn.Module):
    """What DeepSpeed wraps: the MDM, with ``forward`` = the pretraining loss (a dict of terms).
    Going through ``engine(...)`` lets DeepSpeed's forward bookkeeping run on every step."""

    def __init__(self, mdm: nn.Module, cfg: Config):
        super().__init__()
        self.mdm = mdm
        self.cfg = cfg

    def forward(self, batch: dict, fixed: dict | None = None, noise: SampleNoise | None = None):
        if noise is None:
            return mdm_loss(self.mdm, batch, self.cfg, fixed=fixed)
        with per_sample_noise(self.mdm.vae, noise):
            return mdm_loss(self.mdm, batch, self.cfg, fixed=fixed)


@dataclass
class Training:
    engine: object
    model: LossModule
    mdm: nn.Module
    ds_config: dict
    groups: object
    device: torch.device
    zero_stage: int
    seq_len: int
    num_image_tokens: int


def load_pretrained_vae(mdm: nn.Module, path: str, cfg: Config) -> None:
    """Copy the VAE stage's weights and buffers (``launch/train_vae.py``'s vae.pt, the image latent
    standardization included) into ``mdm.vae``, also when ZeRO-3 has partitioned it (each
    parameter gathered, written, re-partitioned)."""
    import deepspeed

    from mdm_dist.data.vae_checkpoint import load_vae_checkpoint

    try:
        stage_vae, stage_cfg, _ = load_vae_checkpoint(path)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"'train.vae_checkpoint' = {path!r}: {e}") from e
    if stage_cfg.vae != cfg.vae:
        diff = [k for k in stage_cfg.vae.__dataclass_fields__ if getattr(stage_cfg.vae, k) != getattr(cfg.vae, k)]
        raise ConfigError(f"'train.vae_checkpoint' = {path!r} was trained with a different vae section "
                          f"(differs in: {', '.join('vae.' + k for k in diff)}); use the matching VAE config")
    state = stage_vae.state_dict()
    for name, p in mdm.vae.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=hasattr(p, "ds_id")):
            with torch.no_grad():
                p.data.copy_(state[name].to(p.dtype))
    for name, b in mdm.vae.named_buffers():  # the image latent standardization (never partitioned)
        with torch.no_grad():
            b.copy_(state[name].to(b.dtype))


def build_training(cfg: Config, device: torch.device) -> Training:
    """Groups, model (partitioned under ZeRO-3), checkpointing, SP, and the DeepSpeed engine."""
    import deepspeed

    from mdm_dist.parallel.checkpointing import apply_activation_checkpointing
    from mdm_dist.parallel.groups import build_groups, check_model_layout, ensure_deepspeed_comm
    from mdm_dist.parallel.sequence import apply_sequence_parallel
    from mdm_dist.parallel.zero import build_model_zero, deepspeed_config

    world = dist.get_world_size()
    groups = build_groups(cfg.parallel.sequence_parallel)
    ensure_deepspeed_comm()
    ds = deepspeed_config(cfg, world, device.type)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank and every layout
    mdm = build_model_zero(cfg, ds, device)
    if cfg.train.vae_checkpoint:
        load_pretrained_vae(mdm, cfg.train.vae_checkpoint, cfg)
    elif dist.get_rank() == 0:
        warnings.warn("train.vae_checkpoint is empty: pretraining starts from a random UnifiedVAE, not the "
                      "VAE that encoded the stored image latents (fine for smoke tests only)", stacklevel=2)
    mdm.vae.freeze_for_pretraining()
    seq_len = mdm.backbone.layout.length
    check_model_layout(cfg.model, seq_len, world, cfg.parallel.sequence_parallel)
    apply_activation_checkpointing(mdm, cfg.train.activation_checkpointing, cfg.train.checkpoint_every_k)
    apply_sequence_parallel(mdm, groups.sp_group)
    model = LossModule(mdm, cfg)
    t = cfg.train
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.train), config=ds)
    if t.optimizer == "muon":  # clip the raw gradient, then Muon (DeepSpeed's own clipping is off)
        clip_before_muon(engine.optimizer, t.grad_clip)
    return Training(engine, model, mdm, ds, groups, device, int(ds["zero_optimization"]["stage"]),
                    seq_len, mdm.vae.num_image_tokens)


# ----------------------------------------------------------------------------------------------
# One optimizer step
# ----------------------------------------------------------------------------------------------


@dataclass
class StepResult:
    terms: dict[str, float | None]  # mean over micro-batches and ranks; None where absent
    grad_norm: float | None
    skipped: bool
    reason: str = ""
    samples: int = 0
    keys: list = field(default_factory=list)


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _any_rank(flag: bool) -> bool:
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _local_grad_norm(model: nn.Module) -> float:
    sq = [p.grad.detach().float().square().sum() for p in model.parameters() if p.grad is not None]
    return math.sqrt(float(torch.stack(sq).sum())) if sq else 0.0


def _step_without_update(engine) -> None:
    """Stage 0 has no overflow check of its own: run ``engine.step()`` (its counters, zero_grad)
    with zeroed gradients and the client optimizer's update disabled for this one call."""
    for p in engine.module.parameters():
        if p.grad is not None:
            p.grad.zero_()
    opt = engine.optimizer
    opt.step = lambda *args, **kwargs: None
    try:
        engine.step()
    finally:
        del opt.step


def train_step(tr: Training, cfg: Config, micro_batches: list[dict], step: int, lr: float) -> StepResult:
    """Forward/backward over the micro-batches of one optimizer step, then the optimizer step.

    Guard: if any rank's loss is non-finite, every rank backpropagates ``loss * nan`` so that the
    gradients are non-finite everywhere, and the step is discarded: ZeRO 1-3 discard a step whose
    global gradient norm is not finite (DeepSpeed's own check, counted in ``skipped_steps``);
    with stage 0 the trainer checks the gradient norm itself and runs ``engine.step()`` without the
    optimizer update. A finite loss with a non-finite gradient norm is discarded the same way.
    """
    engine = tr.engine
    set_lr(engine.optimizer, lr)
    sums = {k: 0.0 for k in LOSS_TERMS}
    counts = {k: 0 for k in LOSS_TERMS}
    bad_loss = False
    samples = 0
    for batch in micro_batches:
        noise = SampleNoise(batch["key"], cfg.train.seed, step)
        fixed = noise.fixed(cfg, tr.num_image_tokens, tr.device)
        terms = engine(_to_device(batch, tr.device), fixed, noise)
        loss = terms["total"]
        samples += len(batch["key"])
        bad = _any_rank(not bool(torch.isfinite(loss.detach()).all()))
        bad_loss |= bad
        for k in LOSS_TERMS:
            if k in terms:
                sums[k] += float(terms[k].detach())
                counts[k] += 1
        engine.backward(loss * float("nan") if bad else loss)
        skipped_before = engine.skipped_steps
        if tr.zero_stage == 0 and engine.is_gradient_accumulation_boundary():
            norm = _local_grad_norm(engine.module)
            if bad_loss or not math.isfinite(norm):
                _step_without_update(engine)
                continue
        engine.step()
    if tr.zero_stage == 0:
        grad_norm = norm
        skipped = bad_loss or not math.isfinite(norm)
        if skipped:
            engine.skipped_steps += 1
    else:
        skipped = engine.skipped_steps > skipped_before
        gn = getattr(engine.optimizer, "raw_grad_norm", None)  # under Muon: before it (optim.clip_before_muon)
        gn = engine.get_global_grad_norm() if gn is None else gn
        grad_norm = None if gn is None else float(gn)
    # mean of every term over micro-batches and ranks (SP ranks hold identical copies)
    vec = torch.tensor([sums[k] for k in LOSS_TERMS] + [float(counts[k]) for k in LOSS_TERMS], dtype=torch.float64)
    if dist.get_world_size() > 1:
        dist.all_reduce(vec)
    n = len(LOSS_TERMS)
    out = {k: (float(vec[i] / vec[n + i]) if vec[n + i] > 0 else None) for i, k in enumerate(LOSS_TERMS)}
    reason = ""
    if skipped:
        reason = "non-finite loss" if bad_loss else "non-finite gradient norm"
    return StepResult(out, grad_norm, skipped, reason, samples)
