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

The VAE stage (launch/train_vae.py) builds its optimizer with :func:`build_vae_optimizer`: AdamW,
or Muon on the VAE's hidden conv filters and trunk matrices through :class:`HiddenMuon`, our own
(DeepSpeed's Muon cannot step a 4-D conv filter), since the VAE is replicated rather than sharded.
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
    _eager_newton_schulz_on_cpu()
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    muon, rest = [], []
    for name, p in _named(model):
        p.use_muon = uses_muon(name, p)  # DeepSpeed's ZeRO-3 reads the tag
        (muon if p.use_muon else rest).append(p)
    groups = [dict(params=muon, use_muon=True, lr=t.muon_lr, momentum=t.muon_momentum,
                   weight_decay=t.weight_decay, ns_method="gram", lr_scale=t.muon_lr / t.lr)]
    groups += _decay_groups(rest, t.weight_decay, use_muon=False, lr=t.lr, betas=tuple(t.betas), eps=1e-8)
    return MuonWithAuxAdam([g for g in groups if g["params"]])


def _eager_newton_schulz_on_cpu() -> None:
    """DeepSpeed wraps its Newton-Schulz functions in torch.compile; on CPU that is an inductor
    build per matrix shape (seconds each) for no gain at these sizes, so they run eagerly there."""
    if not torch.cuda.is_available():
        import torch._dynamo as dynamo

        dynamo.config.disable = True


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


VAE_MUON_SCOPES = ("image_encoder.stages.", "image_decoder.stages.", "trunk_enc.layers.", "trunk_dec.layers.")


def uses_muon_vae(name: str, p: torch.Tensor) -> bool:
    """Whether Muon updates this UnifiedVAE parameter: a hidden conv filter (viewed as
    (out, in * k * k)) or a hidden trunk matrix. The stems and heads of both modalities (conv_in,
    conv_out, image_in / image_out, moments, z_in, the embeddings, text_head) and every vector stay
    on AdamW."""
    return p.requires_grad and p.ndim in (2, 4) and name.startswith(VAE_MUON_SCOPES)


class HiddenMuon(torch.optim.Optimizer):
    """Muon on the groups marked ``use_muon`` and AdamW on the others, for a replicated model.

    A Muon parameter of any shape (a conv filter (out, in, kh, kw) included) is viewed as
    (shape[0], -1); its Nesterov momentum (``momentum``) is orthogonalized by the Newton-Schulz
    iteration the pretraining Muon uses (DeepSpeed's ``gram`` method, batched over the matrices of
    one shape) and scaled by sqrt(max(1, rows / cols)), and the parameter moves by ``-lr`` times it.
    AdamW groups take torch's functional AdamW. DeepSpeed's ``MuonWithAuxAdam`` itself is not used
    here: it returns conv filters' updates flattened, and its step fails (0.19.8)."""

    def __init__(self, groups: list[dict]):
        _eager_newton_schulz_on_cpu()
        defaults = dict(lr=1e-3, weight_decay=0.0, use_muon=False, momentum=0.95, betas=(0.9, 0.999), eps=1e-8)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["use_muon"]:
                self._muon(params, group)
            else:
                self._adamw(params, group)
        return loss

    def _muon(self, params: list, group: dict) -> None:
        from deepspeed.runtime.zero.muon.original_muon import zeropower_via_gram_newtonschulz

        lr, momentum, by_shape = group["lr"], group["momentum"], {}
        for p in params:
            buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
            buf.lerp_(p.grad, 1 - momentum)
            g = p.grad.lerp(buf, momentum).reshape(p.shape[0], -1)
            by_shape.setdefault(tuple(g.shape), []).append((p, g))
        for (rows, cols), items in by_shape.items():  # one batched iteration per matrix shape
            u = zeropower_via_gram_newtonschulz(torch.stack([g for _, g in items]), steps=5)
            u = u.float() * max(1.0, rows / cols) ** 0.5
            for (p, _), up in zip(items, u):
                p.mul_(1 - lr * group["weight_decay"]).add_(up.reshape(p.shape).to(p.dtype), alpha=-lr)

    def _adamw(self, params: list, group: dict) -> None:
        from torch.optim.adamw import adamw

        states = [self.state[p] for p in params]
        for p, st in zip(params, states):
            if not st:
                st.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        adamw(params, [p.grad for p in params], [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
              [], [st["step"] for st in states], amsgrad=False, beta1=group["betas"][0], beta2=group["betas"][1],
              lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def build_vae_optimizer(vae: nn.Module, t) -> torch.optim.Optimizer:
    """The VAE stage's optimizer (no weight decay, as before): AdamW everywhere, or Muon on
    :func:`uses_muon_vae`'s parameters (lr ``t.muon_lr``) and AdamW (lr ``t.lr``) on the rest
    (:class:`HiddenMuon`). The VAE is replicated (DDP), so every rank takes the same step."""
    if t.optimizer == "adamw":
        return torch.optim.AdamW(vae.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=0.0)
    muon, rest = [], []
    for name, p in vae.named_parameters():
        if p.requires_grad:
            (muon if uses_muon_vae(name, p) else rest).append(p)
    return HiddenMuon([
        dict(params=muon, use_muon=True, lr=t.muon_lr, momentum=t.muon_momentum, lr_scale=t.muon_lr / t.lr),
        dict(params=rest, use_muon=False, lr=t.lr, betas=tuple(t.betas), lr_scale=1.0),
    ])
