"""Cluster pre-emption: SIGTERM / SIGUSR1 set a flag; the loop checks it at every optimizer step
boundary (all-reduced, so every rank stops at the same step even if only one was signalled),
saves a checkpoint and exits 0. The handler itself does nothing else: saving inside a signal
handler would interrupt a collective half-way."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist


class PreemptionFlag:
    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.signum: int | None = None
        for s in signals:
            signal.signal(s, self._handler)

    def _handler(self, signum, frame) -> None:
        self.signum = signum

    def should_stop(self) -> bool:
        """True on every rank if any rank was signalled (a collective: call on every rank)."""
        flag = torch.tensor([1 if self.signum is not None else 0], dtype=torch.int64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
