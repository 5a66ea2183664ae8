"""The pretraining optimizer: AdamW everywhere (``train.optimizer: adamw``), or Muon on the
hidden weight matrices and AdamW on the rest (``train.optimizer: muon``).

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers") keeps an SGD momentum per
matrix and replaces each step by the nearest semi-orthogonal matrix (a Newton-Schulz iteration),
scaled by sqrt(max(1, rows / cols)). It applies to the 2-D weights *inside* the network: the
Mamba in/out projections, the attention and MLP matrices, the time-embedding MLPs. Embeddings,
the input and output projections of the token streams, the depthwise conv filters and every
1-D parameter stay on AdamW, as the method prescribes.

The optimizer object is DeepSpeed's ``MuonWithAuxAdam``: under ZeRO-3 DeepSpeed gathers each
Muon matrix's full gradient and orthogonalizes it in its sub-group loop (the parameters are
flat partitions there); without ZeRO the same class runs the update on the whole matrix. So the
single-process probe and the distributed trainer take the same step.

Gradient clipping applies to the raw gradient, before Muon, as AdamW's does (the probe loop and
the trainer alike; clipping measurably helps Muon here, benchmarks/demo_results.md). DeepSpeed's
ZeRO-3 would instead take its clipping norm over the orthogonalized updates (norm ~ sqrt(rank)
each) and divide every Muon step by it, so its own clipping is off under Muon
(``mdm_dist.parallel.zero.deepspeed_config``) and :func:`clip_before_muon` clips the accumulated
gradient partitions just before DeepSpeed orthogonalizes them. Muon runs under ZeRO-3 only:
stages 1-2 orthogonalize inside the gradient reduce, before any clipping could happen.

The schedule (``mdm_dist.train.schedule.lr_at``) gives AdamW's lr; every group carries
``lr_scale`` and gets ``lr_scale * lr_at(...)``: 1 for AdamW groups, ``train.muon_lr /
train.lr`` for the Muon group, so both follow the same warm-up and cosine.
"""

from __future__ import annotations

import math

import torch
from torch import nn

MUON_SCOPES = ("backbone.layers.", "backbone.time_")  # hidden matrices live under these names


def _shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 partitions are empty; ds_shape is the real one


def uses_muon(name: str, p: torch.Tensor) -> bool:
    """Whether Muon updates this parameter: a 2-D hidden weight matrix (not an embedding, not an
    input / output projection of the token streams, not a conv filter, not a vector)."""
    return (p.requires_grad and len(_shape(p)) == 2 and name.startswith(MUON_SCOPES)
            and ".conv1d." not in name)


def _named(model: nn.Module):
    for name, p in model.named_parameters():
        if p.requires_grad:
            yield name.removeprefix("mdm."), p  # LossModule wraps the MDM as .mdm


def _decay_groups(params: list, weight_decay: float, **extra) -> list[dict]:
    """AdamW's two groups of ``params``: no weight decay for parameters marked ``_no_weight_decay``
    (A_log, D, dt_bias) or with fewer than 2 dimensions (biases, norms, per-channel vectors);
    ``weight_decay`` for the rest. ``extra`` keys go into both groups."""
    decay, no_decay = [], []
    for p in params:
        (no_decay if getattr(p, "_no_weight_decay", False) or len(_shape(p)) < 2 else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay, lr_scale=1.0, **extra),
            dict(params=no_decay, weight_decay=0.0, lr_scale=1.0, **extra)]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups of every trainable parameter (see ``_decay_groups``). Shapes are read from
    ``ds_shape`` under ZeRO-3 (partitioned parameters are empty)."""
    return _decay_groups([p for _, p in _named(model)], weight_decay)


def build_optimizer(model: nn.Module, t) -> torch.optim.Optimizer:
    """The optimizer ``t`` (a ``TrainConfig``) asks for, over ``model``'s trainable parameters."""
    if t.optimizer == "adamw":
        return torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas))
    # Muon's Newton-Schulz functions are wrapped in torch.compile; on CPU that is an inductor
    # build per matrix shape (seconds each) for no gain at these sizes, so run them eagerly there.
    if not torch.cuda.is_available():
        import torch._dynamo as dynamo

        dynamo.config.disable = True
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    muon, rest = [], []
    for name, p in _named(model):
        p.use_muon = uses_muon(name, p)  # DeepSpeed's ZeRO-3 reads the tag
        (muon if p.use_muon else rest).append(p)
    groups = [dict(params=muon, use_muon=True, lr=t.muon_lr, momentum=t.muon_momentum,
                   weight_decay=t.weight_decay, ns_method="gram", lr_scale=t.muon_lr / t.lr)]
    groups += _decay_groups(rest, t.weight_decay, use_muon=False, lr=t.lr, betas=tuple(t.betas), eps=1e-8)
    return MuonWithAuxAdam([g for g in groups if g["params"]])


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's lr for this step: ``lr`` (the schedule's) times the group's ``lr_scale``."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def clip_before_muon(zero_optimizer, clip: float) -> None:
    """Make DeepSpeed's ZeRO-3 optimizer clip the raw gradient norm at ``clip`` (as
    ``torch.nn.utils.clip_grad_norm_`` does) right before its Muon step orthogonalizes the
    accumulated gradients; the raw norm is kept as ``zero_optimizer.raw_grad_norm``.

    DeepSpeed's step runs: overflow check -> ``_apply_muon_to_accumulated_grads`` -> norm and
    clip (off here) -> the sub-group updates. The wrapper takes the global norm of the partitions
    with DeepSpeed's own reduction (``_get_norm_groups``: every rank's share) and scales every
    partition by clip / (norm + 1e-6) when that is below 1; a step discarded by the overflow check
    never reaches it. The pinned DeepSpeed's private names are checked here, so a version that
    renames them fails at start-up rather than training unclipped.
    """
    from deepspeed.runtime.utils import combine_grad_norm_groups

    needed = ("_apply_muon_to_accumulated_grads", "_get_norm_groups", "averaged_gradients", "fp16_groups",
              "loss_scale")
    missing = [n for n in needed if not hasattr(zero_optimizer, n)]
    if missing:
        raise RuntimeError(f"train.optimizer=muon: DeepSpeed's ZeRO-3 optimizer ({type(zero_optimizer).__name__}) "
                           f"lacks {', '.join(missing)}; use the DeepSpeed version pinned in requirements.txt")
    muon_step = zero_optimizer._apply_muon_to_accumulated_grads

    def clip_then_muon():
        norm = float(combine_grad_norm_groups(zero_optimizer._get_norm_groups())) / float(zero_optimizer.loss_scale)
        zero_optimizer.raw_grad_norm = norm
        coef = clip / (norm + 1e-6)
        if clip > 0 and math.isfinite(norm) and coef < 1.0:
            for i in range(len(zero_optimizer.fp16_groups)):
                for g in zero_optimizer.averaged_gradients.get(i) or []:
                    if g is not None:
                        g.mul_(coef)
        muon_step()

    zero_optimizer._apply_muon_to_accumulated_grads = clip_then_muon
