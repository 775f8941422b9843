"""Dense expert pretraining: cell targets come from the boxes, and a few steps lower the loss."""

import torch

from mm.expert_pretrain import cell_targets, pretrain_expert, vocabulary
from vision.experts import build_expert

VOCAB = {"colour": ["blue", "red"], "shape": ["circle", "square"], "size": ["large", "small"]}


def test_cell_targets_mark_cells_whose_centre_is_inside_a_box():
    objects = [
        {"colour": "red", "shape": "square", "size": "large", "box": [0, 0, 50, 50]},
        {"colour": "blue", "shape": "circle", "size": "small", "box": [60, 60, 80, 80]},
    ]
    # cell centres at 12.5, 37.5, 62.5, 87.5
    classes, edges = cell_targets(objects, (100, 100), (4, 4), VOCAB)
    assert classes.shape == (3, 4, 4) and edges.shape == (4, 4, 4)
    red_square = torch.zeros(4, 4, dtype=torch.bool)
    red_square[:2, :2] = True
    blue_circle = torch.zeros(4, 4, dtype=torch.bool)
    blue_circle[2, 2] = True
    assert torch.equal(classes[0] == 2, red_square)  # colour id = index in vocab + 1
    assert torch.equal(classes[0] == 1, blue_circle)
    assert torch.equal(classes[1][red_square], torch.full((4,), 2))
    assert int(classes[2][2, 2]) == 2  # small
    assert (classes[:, ~(red_square | blue_circle)] == 0).all()
    # distances from the centre of cell (0, 1) = (37.5, 12.5) to the red square's edges, as image fractions
    assert torch.allclose(edges[:, 0, 1], torch.tensor([0.375, 0.125, 0.125, 0.375]))
    assert (edges[:, 3, 3] == 0).all()


def test_smallest_box_wins_where_boxes_overlap():
    objects = [
        {"colour": "red", "shape": "square", "size": "large", "box": [0, 0, 100, 100]},
        {"colour": "blue", "shape": "circle", "size": "small", "box": [25, 25, 50, 50]},
    ]
    classes, _ = cell_targets(objects, (100, 100), (4, 4), VOCAB)
    assert int(classes[0][1, 1]) == 1 and int(classes[0][0, 0]) == 2


def test_pretraining_lowers_the_dense_loss(tmp_path):
    from data.schema import load_llava_json
    from data.shapesworld import generate

    generate(tmp_path, n=20, seed=0, progress=False)
    records = load_llava_json(tmp_path / "train.json")
    assert vocabulary(records)["size"] == ["large", "medium", "small"]
    expert = build_expert({"name": "main", "model": "resnet10t", "image_size": 96, "feature_index": 2})
    torch.manual_seed(0)
    history = pretrain_expert(expert, records, tmp_path, steps=25, batch_size=8, lr=3e-3, progress=False)
    assert len(history) == 25
    first = sum(h["loss"] for h in history[:3]) / 3
    last = sum(h["loss"] for h in history[-3:]) / 3
    assert last < 0.7 * first
