"""Scan orders of the scan switch, as permutations of the whole token sequence.

The sequence (docs/model.md) is ``[prefix][text (L)][sep][image (gh x gw')][tail pads]`` where the
prefix holds the conditioning tokens (two time tokens and the category token) and ``gw' = gw + 1``
when every image row ends with a lateral pad token (DiM), else ``gw``.

A direction is a permutation ``order`` of ``range(T)``: the scan visits ``order[0], order[1], ...``.
The prefix stays first in every direction (a causal scan must see the conditions before the tokens
they condition). For the body:

- ``row``     text forward, sep, image row-major, tail
- ``row_rev`` the ``row`` body reversed: tail, image reverse row-major, sep, text reversed
- ``col``     text forward, sep, image column-major, tail
- ``col_rev`` the ``col`` body reversed

Image tokens are thus scanned in 4 orders, text in 2 (forward and reverse): the paper's scan switch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NUM_PREFIX = 3  # [time_txt][time_img][category]


@dataclass(frozen=True)
class SequenceLayout:
    """Where each part of the joint sequence lives; all offsets are positions in the sequence."""

    text_len: int
    grid_h: int
    grid_w: int
    lateral_pad: bool = False
    num_tail_pad: int = 0

    @property
    def row_width(self) -> int:
        return self.grid_w + (1 if self.lateral_pad else 0)

    @property
    def text_start(self) -> int:
        return NUM_PREFIX

    @property
    def sep_pos(self) -> int:
        return NUM_PREFIX + self.text_len

    @property
    def image_start(self) -> int:
        return self.sep_pos + 1

    @property
    def num_image_slots(self) -> int:
        return self.grid_h * self.row_width

    @property
    def tail_start(self) -> int:
        return self.image_start + self.num_image_slots

    @property
    def length(self) -> int:
        return self.tail_start + self.num_tail_pad

    def image_positions(self) -> torch.Tensor:
        """Sequence positions of the ``gh * gw`` image tokens, row-major (lateral pads skipped)."""
        r = torch.arange(self.grid_h).unsqueeze(1)
        c = torch.arange(self.grid_w).unsqueeze(0)
        return (self.image_start + r * self.row_width + c).reshape(-1)

    def lateral_pad_positions(self) -> torch.Tensor:
        """Sequence positions of the row-end pad tokens (empty without ``lateral_pad``)."""
        if not self.lateral_pad:
            return torch.empty(0, dtype=torch.long)
        return self.image_start + torch.arange(self.grid_h) * self.row_width + self.grid_w

    def text_positions(self) -> torch.Tensor:
        return torch.arange(self.text_start, self.text_start + self.text_len)


def _image_slots(layout: SequenceLayout, column_major: bool) -> torch.Tensor:
    h, w = layout.grid_h, layout.row_width
    idx = torch.arange(h * w).reshape(h, w)
    if column_major:
        idx = idx.t()
    return layout.image_start + idx.reshape(-1)


def scan_order(layout: SequenceLayout, direction: str) -> torch.Tensor:
    """The permutation (LongTensor of length ``layout.length``) that scans in ``direction``."""
    if direction not in ("row", "row_rev", "col", "col_rev"):
        raise ValueError(f"unknown scan direction {direction!r}; allowed: row, row_rev, col, col_rev")
    prefix = torch.arange(NUM_PREFIX)
    body = torch.cat(
        [
            layout.text_positions(),
            torch.tensor([layout.sep_pos]),
            _image_slots(layout, column_major=direction.startswith("col")),
            torch.arange(layout.tail_start, layout.length),
        ]
    )
    if direction.endswith("_rev"):
        body = body.flip(0)
    return torch.cat([prefix, body])


def scan_orders(layout: SequenceLayout, directions: list[str] | tuple[str, ...]) -> torch.Tensor:
    """Stack of permutations, one row per direction: ``(len(directions), layout.length)``."""
    return torch.stack([scan_order(layout, d) for d in directions])


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[order[i]] = i``, so ``x[order][inv] == x``."""
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    return inv
