"""Position ids: text +1, visual +delta, padding neutral, generation continues from the last position."""

from __future__ import annotations

import pytest
import torch

from mm.positions import (
    build_position_ids,
    next_positions,
    token_increments,
)

IMG = 7  # image token id used in these hand-made sequences


def test_text_tokens_advance_by_one():
    ids = torch.tensor([[1, 2, 3, 4]])
    pos = build_position_ids(ids, torch.ones_like(ids), IMG, visual_delta=0.5)
    assert pos.dtype == torch.float32
    assert pos.tolist() == [[0.0, 1.0, 2.0, 3.0]]


@pytest.mark.parametrize(("delta", "expected"), [(1.0, [0, 1, 2, 3, 4, 5]), (0.5, [0, 1, 1.5, 2, 2.5, 3.5])])
def test_visual_tokens_advance_by_delta(delta, expected):
    ids = torch.tensor([[1, IMG, IMG, IMG, 2, 3]])
    pos = build_position_ids(ids, torch.ones_like(ids), IMG, visual_delta=delta)
    assert pos[0].tolist() == pytest.approx(expected)


def test_increments_are_zero_on_padding():
    ids = torch.tensor([[0, 0, 1, IMG, 2]])
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    assert token_increments(ids, mask, IMG, 0.25)[0].tolist() == [0.0, 0.0, 1.0, 0.25, 1.0]


@pytest.mark.parametrize("delta", [1.0, 0.5])
def test_left_padding_gives_unpadded_positions(delta):
    seq = [5, IMG, IMG, 6, 8]
    alone = build_position_ids(torch.tensor([seq]), torch.ones(1, 5, dtype=torch.long), IMG, delta)
    ids = torch.tensor([[0, 0, 0, *seq], [9, 9, 9, 9, 9, 9, 9, 9]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8])
    pos = build_position_ids(ids, mask, IMG, delta)
    assert torch.equal(pos[0, 3:], alone[0])
    assert pos[0, :3].tolist() == [0.0, 0.0, 0.0]
    assert pos[1].tolist() == [float(i) for i in range(8)]


def test_start_offsets_each_row():
    ids = torch.tensor([[1, 2], [IMG, 3]])
    pos = build_position_ids(ids, torch.ones_like(ids), IMG, 0.5, start=torch.tensor([10.0, 3.5]))
    assert pos.tolist() == [[10.0, 11.0], [3.5, 4.0]]


def test_next_positions_left_and_right_padding():
    ids = torch.tensor([[0, 0, 1, IMG, IMG], [1, IMG, IMG, 2, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    pos = build_position_ids(ids, mask, IMG, 0.5)
    # row 0: 0, 1, 1.5 -> next 2.5 ; row 1 (right padded): 0, 1, 1.5, 2 -> next 3
    assert next_positions(pos, mask).tolist() == [2.5, 3.0]
