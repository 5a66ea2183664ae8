"""Scan permutations: bijections, their inverses, and the orders they claim to be."""

import itertools

import pytest
import torch

from mdm_dist.models.scan import NUM_PREFIX, SequenceLayout, inverse_permutation, scan_order, scan_orders

DIRS = ("row", "row_rev", "col", "col_rev")
LAYOUTS = [
    SequenceLayout(text_len=5, grid_h=3, grid_w=4),
    SequenceLayout(text_len=1, grid_h=2, grid_w=2, lateral_pad=True, num_tail_pad=2),
    SequenceLayout(text_len=7, grid_h=4, grid_w=3, lateral_pad=True, num_tail_pad=1),
]


@pytest.mark.parametrize("layout,direction", list(itertools.product(LAYOUTS, DIRS)))
def test_bijection_and_inverse(layout, direction):
    order = scan_order(layout, direction)
    assert order.dtype == torch.long and order.shape == (layout.length,)
    assert torch.equal(order.sort().values, torch.arange(layout.length))
    inv = inverse_permutation(order)
    x = torch.randn(layout.length, 3)
    assert torch.equal(x[order][inv], x)
    assert torch.equal(order[inv], torch.arange(layout.length))


def test_prefix_first_in_every_direction():
    lay = LAYOUTS[2]
    for d in DIRS:
        assert scan_order(lay, d)[:NUM_PREFIX].tolist() == list(range(NUM_PREFIX))


def _image_rc_sequence(layout, order):
    """(row, col) of the image slots in the order a scan visits them."""
    rc = []
    for pos in order.tolist():
        k = pos - layout.image_start
        if 0 <= k < layout.num_image_slots:
            rc.append(divmod(k, layout.row_width))
    return rc


def test_image_orders_match_hand_enumeration():
    lay = SequenceLayout(text_len=2, grid_h=2, grid_w=3)
    row = [(r, c) for r in range(2) for c in range(3)]
    col = [(r, c) for c in range(3) for r in range(2)]
    assert _image_rc_sequence(lay, scan_order(lay, "row")) == row
    assert _image_rc_sequence(lay, scan_order(lay, "row_rev")) == row[::-1]
    assert _image_rc_sequence(lay, scan_order(lay, "col")) == col
    assert _image_rc_sequence(lay, scan_order(lay, "col_rev")) == col[::-1]


def test_text_forward_and_reverse_and_cross_visibility():
    lay = SequenceLayout(text_len=4, grid_h=2, grid_w=2, num_tail_pad=1)
    text = lay.text_positions().tolist()
    for d in DIRS:
        order = scan_order(lay, d).tolist()
        visited_text = [p for p in order if p in text]
        assert visited_text == (text[::-1] if d.endswith("_rev") else text)
        first_img = min(order.index(p) for p in lay.image_positions().tolist())
        last_txt = max(order.index(p) for p in text)
        # forward scans: the image sees the whole text first; reverse scans: the other way round
        assert (last_txt < first_img) == (not d.endswith("_rev"))


def test_lateral_pads_end_each_row():
    lay = SequenceLayout(text_len=1, grid_h=3, grid_w=2, lateral_pad=True)
    pads = lay.lateral_pad_positions().tolist()
    img = lay.image_positions().tolist()
    assert len(pads) == 3 and len(img) == 6 and not set(pads) & set(img)
    order = scan_order(lay, "row").tolist()
    for r in range(3):  # in a row scan, each pad comes right after its row's last token
        assert order.index(pads[r]) == order.index(img[r * 2 + 1]) + 1


def test_stack_and_bad_direction():
    lay = LAYOUTS[0]
    assert scan_orders(lay, DIRS).shape == (4, lay.length)
    with pytest.raises(ValueError, match="allowed: row, row_rev, col, col_rev"):
        scan_order(lay, "diag")
