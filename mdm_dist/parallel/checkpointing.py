"""Activation checkpointing of the backbone's blocks (``train.activation_checkpointing``).

Each selected block (a Mamba scan-switch block or an attention block in ``backbone.layers``) runs
its forward under ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``: only the block's
input is kept, and the forward is recomputed during backward. The block object is kept (its
instance ``forward`` is replaced), so parameter names and state dicts do not change.

ZeRO-3: the block itself is still called through ``nn.Module.__call__``, so DeepSpeed's module
hooks fire as usual; the recomputation calls the block's submodules (norms, mixers, attention)
through their ``__call__`` again, inside backward, and their pre-forward hooks gather their
parameters again for the recompute (the non-reentrant checkpoint runs the recompute while the
autograd engine is active, which ZeRO-3's hooks support). Checked by
``tests/test_parallel_checkpointing.py``: the same losses and gradients with and without
checkpointing, without ZeRO and under ZeRO-3 on 2 ranks. With sequence parallelism the recompute
repeats the block's all-to-alls; every rank recomputes the same blocks in the same order, so the
collectives stay matched.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

MODES = ("none", "every", "every_k")


def _checkpointed_forward(inner, *args, **kwargs):
    return checkpoint(inner, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: nn.Module, mode: str = "every", k: int = 2) -> list[int]:
    """Checkpoint the blocks of ``model.backbone.layers`` (or ``model.layers``): ``none``,
    ``every`` block, or ``every_k``: the blocks whose index is a multiple of ``k`` (0, k, 2k, ...,
    as torchtitan counts). Returns the indices of the checkpointed blocks."""
    if mode not in MODES:
        raise ValueError(f"'train.activation_checkpointing' = {mode!r}; allowed values: {', '.join(MODES)}")
    if mode == "every_k" and k < 1:
        raise ValueError(f"'train.checkpoint_every_k' must be >= 1, got {k}")
    backbone = model.backbone if hasattr(model, "backbone") else model
    done = []
    if mode == "none":
        return done
    for i, block in enumerate(backbone.layers):
        if mode == "every_k" and i % k:
            continue
        if getattr(block, "_mdm_checkpointed", False):
            raise RuntimeError(f"apply_activation_checkpointing: block {i} is already checkpointed")
        block.forward = functools.partial(_checkpointed_forward, block.forward)
        block._mdm_checkpointed = True
        done.append(i)
    return done


__all__ = ["MODES", "apply_activation_checkpointing"]
