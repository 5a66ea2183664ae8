"""EMA of the weights that works on ZeRO-3 partitions.

Under ZeRO-3 a rank holds, for every parameter, only its partition ``p.ds_tensor`` (a flat slice
of ``ceil(numel / world)`` elements, zero-padded on the last rank); ``p.data`` is empty unless the
parameter is gathered. The EMA therefore keeps one fp32 tensor per parameter shaped like the
local partition and updates it from ``p.ds_tensor`` after each applied optimizer step: no
gathering, 4 bytes per parameter / world of memory. (With ``train.mixed_precision: autocast``,
the default for bf16, ``ds_tensor`` is the fp32 parameter itself; with ``bf16_weights`` it is the
bf16 working copy of DeepSpeed's fp32 master partition, and the EMA, accumulating in fp32,
averages that rounding out.) Without ZeRO-3 (stages 0-2) every rank holds full parameters and the EMA is the full fp32
copy. Every parameter is tracked, frozen ones included: nothing is left out silently.

``state_dict`` is this rank's shards (saved per rank in the checkpoint); :func:`gather_full`
rebuilds whole tensors (a collective) for export.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def local_tensor(p: nn.Parameter) -> torch.Tensor:
    """The part of ``p`` this rank owns: the ZeRO-3 partition, or the whole parameter."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class EMA:
    """``warmup``: the decay of update k (1-based) is min(decay, (1 + k) / (10 + k)), so the
    average forgets the random initialization in the first hundreds of steps instead of keeping
    decay^k of it (0.999^3200 = 4% at the demo's length, 0.9999^10000 = 37%); the step count is
    part of the state, so a resumed run continues the same schedule."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"'train.ema_decay' must lie in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.names = [n for n, _ in model.named_parameters()]
        self.params = dict(model.named_parameters())
        self.shadow = {n: local_tensor(p).detach().float().clone() for n, p in self.params.items()}
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """shadow = d * shadow + (1 - d) * weights, on the local partitions (d = :meth:`current_decay`)."""
        d = self.current_decay()
        for n, p in self.params.items():
            self.shadow[n].lerp_(local_tensor(p).float(), 1.0 - d)
        self.updates += 1

    def current_decay(self) -> float:
        """The decay the next update uses."""
        k = self.updates + 1
        return min(self.decay, (1.0 + k) / (10.0 + k)) if self.warmup else self.decay

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        extra = set(state["shadow"]) - set(self.shadow)
        if missing or extra:
            raise ValueError(f"EMA state does not match the model: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(extra)[:5]}")
        for n, t in state["shadow"].items():
            if t.shape != self.shadow[n].shape:
                raise ValueError(f"EMA shard of {n} has shape {tuple(t.shape)}, expected "
                                 f"{tuple(self.shadow[n].shape)} (was the world size changed?)")
            self.shadow[n].copy_(t)
        self.updates = int(state["updates"])


def gather_full(params: dict[str, nn.Parameter], shards: dict[str, torch.Tensor] | None = None,
                dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Whole tensors (on CPU, ``dtype``) from ZeRO-3 partitions: ``shards`` (e.g. the EMA's) or,
    when None, the parameters' own ``ds_tensor``. A collective over the whole world for ZeRO-3
    parameters; returns the same dict on every rank."""
    out = {}
    for n, p in params.items():
        shard = (shards[n] if shards is not None else local_tensor(p)).detach()
        if hasattr(p, "ds_tensor") and dist.is_initialized() and dist.get_world_size() > 1:
            parts = [torch.empty_like(shard) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, shard.contiguous())
            full = torch.cat([t.flatten() for t in parts])[: p.ds_numel].view(p.ds_shape)
        elif hasattr(p, "ds_tensor"):
            full = shard.flatten()[: p.ds_numel].view(p.ds_shape)
        else:
            full = shard
        out[n] = full.to(device="cpu", dtype=dtype).clone()
    return out
