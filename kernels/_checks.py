"""Argument checks shared by the kernel entry points (kernels.ssd, kernels.conv1d)."""

from __future__ import annotations

import torch
from torch import Tensor


def check_order_args(who: str, length: int, seq_idx: Tensor | None, scan_order: Tensor | None) -> None:
    """``seq_idx`` and ``scan_order`` are integer tensors; ``scan_order`` is a LongTensor
    permutation of ``0..length-1`` (checked on CPU only: the sort would be a host sync on GPU)."""
    for name, t in (("seq_idx", seq_idx), ("scan_order", scan_order)):
        if t is not None and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
            raise ValueError(f"{who}: {name} must be an integer tensor, got dtype {t.dtype}")
    if scan_order is None:
        return
    if scan_order.dtype != torch.long:
        raise ValueError(f"{who}: scan_order must be a LongTensor (torch.long), got {scan_order.dtype}")
    if scan_order.device.type == "cpu" and not torch.equal(
        scan_order.sort().values, torch.arange(length, device=scan_order.device)
    ):
        raise ValueError(f"{who}: scan_order must be a permutation of 0..{length - 1}")
