"""Learning rate: linear warmup from 0 to ``train.lr`` over ``warmup_steps``, then a cosine from
``lr`` down to ``min_lr`` at ``max_steps`` (held at ``min_lr`` beyond).

A run under a time budget may change ``max_steps`` after the warmup (mdm_dist/train/budget.py
re-plans as it learns its step time). It then passes an *anchor* ``(step, progress)``: the cosine's
progress at that step under the plan before, from which progress runs linearly to 1 at the new
``max_steps``. The learning rate stays continuous, and the cosine still ends at ``min_lr`` at the new
``max_steps``. Without an anchor, progress is ``(step - warmup) / (max_steps - warmup)``.
"""

from __future__ import annotations

import math

Anchor = tuple[int, float]


def cosine_progress(step: int, warmup_steps: int, max_steps: int, anchor: Anchor | None = None) -> float:
    """Progress in [0, 1] of the cosine at optimizer step ``step`` (0-based, after the warmup)."""
    a_step, a_prog = anchor if anchor is not None else (warmup_steps, 0.0)
    span = max(1, max_steps - a_step)
    return min(1.0, max(0.0, a_prog + (1.0 - a_prog) * (step - a_step) / span))


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int,
          anchor: Anchor | None = None) -> float:
    """The learning rate of optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = cosine_progress(step, warmup_steps, max_steps, anchor)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
