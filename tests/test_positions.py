"""Position ids by V2PE's rule: text +1, image i's tokens at last + delta_i * offset, ceil after the image."""

from __future__ import annotations

import pytest
import torch

from mm.positions import build_position_ids, next_positions, positions_occupied, visual_offsets

IMG = 7  # image token id used in these hand-made sequences
ORIGINAL3 = [1, 2, 3]  # offsets of a 3-token image, every token its own position


def test_text_tokens_advance_by_one_and_positions_are_float64():
    ids = torch.tensor([[1, 2, 3, 4]])
    pos = build_position_ids(ids, torch.ones_like(ids), IMG, ORIGINAL3, 0.5)
    assert pos.dtype == torch.float64
    assert pos.tolist() == [[0.0, 1.0, 2.0, 3.0]]


@pytest.mark.parametrize(
    ("delta", "expected"),
    [
        (1.0, [0, 1, 2, 3, 4, 5]),  # the plain integer encoding
        # visual at 0 + 0.5 j; after the image last = ceil(1.5) = 2, text continues at 3, 4 (V2PE)
        (0.5, [0, 0.5, 1.0, 1.5, 3, 4]),
        (0.25, [0, 0.25, 0.5, 0.75, 2, 3]),
    ],
)
def test_visual_tokens_step_by_delta_and_text_resumes_after_the_ceiling(delta, expected):
    ids = torch.tensor([[1, IMG, IMG, IMG, 2, 3]])
    pos = build_position_ids(ids, torch.ones_like(ids), IMG, ORIGINAL3, delta)
    assert pos[0].tolist() == expected


def test_two_images_with_their_own_deltas_and_left_padding_by_hand():
    n = 4
    offsets = list(range(1, n + 1))
    row0 = [0, 0, 5] + [IMG] * n + [6] + [IMG] * n + [8]  # two padding tokens on the left
    row1 = [5, 6] + [IMG] * n + [8, 9, 10, 11, 12, 0, 0]  # two on the right
    ids = torch.tensor([row0, row1])
    mask = torch.tensor([[0, 0] + [1] * 11, [1] * 11 + [0, 0]])
    deltas = torch.tensor([[0.25, 0.5], [1 / 64, 1.0]], dtype=torch.float64)
    pos = build_position_ids(ids, mask, IMG, offsets, deltas)
    # row 0: text 0; image 1 (1/4) at 0.25 .. 1.0; ceil 1 -> text 2; image 2 (1/2) at 2.5 .. 4; text 5
    assert pos[0].tolist() == [0, 0, 0, 0.25, 0.5, 0.75, 1.0, 2, 2.5, 3.0, 3.5, 4.0, 5]
    # row 1: text 0, 1; image (1/64) at 1 + j/64; ceil 2 -> text 3, 4, 5, 6, 7; right padding at 0
    assert pos[1].tolist() == [0, 1, 1 + 1 / 64, 1 + 2 / 64, 1 + 3 / 64, 1 + 4 / 64, 3, 4, 5, 6, 7, 0, 0]
    # the next token of each row: row 0 after text 5, row 1 after text 7
    assert next_positions(pos, mask).tolist() == [6.0, 8.0]


def test_a_prefix_that_ends_on_an_image_continues_after_its_ceiling():
    ids = torch.tensor([[1, IMG, IMG, IMG]])
    pos = build_position_ids(ids, torch.ones_like(ids), IMG, ORIGINAL3, 0.5)
    assert pos[0].tolist() == [0, 0.5, 1.0, 1.5]
    assert next_positions(pos, torch.ones_like(ids)).tolist() == [3.0]  # ceil(1.5) + 1, as text would be


def test_start_offsets_each_row_and_keeps_fractions_far_out():
    ids = torch.tensor([[1, 2], [IMG, 3]])
    pos = build_position_ids(
        ids, torch.ones_like(ids), IMG, [1], 1 / 256, start=torch.tensor([10.0, 100_000.0])
    )
    # row 1 starts with an image: its token sits at start - 1 + delta, text after the ceiling
    assert pos.tolist() == [[10.0, 11.0], [100_000 - 1 + 1 / 256, 100_001.0]]
    assert pos[1, 0].item() != pos[1, 0].float().item()  # fp32 would lose the step: we keep float64


def test_deltas_fewer_than_images_repeat_the_last():
    ids = torch.tensor([[1] + [IMG] * 3 + [IMG] * 3 + [2]])
    one = build_position_ids(ids, torch.ones_like(ids), IMG, ORIGINAL3, torch.tensor([[0.5]]))
    both = build_position_ids(ids, torch.ones_like(ids), IMG, ORIGINAL3, torch.tensor([[0.5, 0.5]]))
    assert torch.equal(one, both)


def test_occupied_positions():
    assert positions_occupied(visual_offsets("original", [(6, 6)]), 1.0) == 36
    assert positions_occupied(visual_offsets("original", [(6, 6)]), 1 / 16) == 3  # ceil(36 / 16)
    assert positions_occupied(visual_offsets("share_by_row", [(6, 6), (4, 4)]), 1.0) == 10
    assert positions_occupied(visual_offsets("share_all", [(6, 6)]), 0.25) == 1
