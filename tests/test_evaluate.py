"""Scoring: exact-match QA (normalised), caption object recall, grounding IoU, and their aggregation."""

from __future__ import annotations

import json

import pytest
from conftest import solid_image

from data.boxes import BoxFormat
from mm.evaluate import aggregate, box_format_for, caption_object_hits, evaluate, normalize_answer, score

FMT = BoxFormat(frame=1000)


def record(task, answer, **meta):
    return {
        "id": f"{task}-{answer}",
        "image": "a.png",
        "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": str(answer)}],
        "meta": {"task": task, "answer": answer, **meta},
    }


def objects(*pairs):
    return [{"colour": c, "shape": s, "size": "small", "box": [0, 0, 1, 1]} for c, s in pairs]


def test_normalize_answer():
    assert normalize_answer("  The RED, circle! ") == "the red circle"
    assert normalize_answer("[12, 340]") == "12 340"


@pytest.mark.parametrize(
    ("caption", "pairs", "hits"),
    [
        ("A red circle and a blue square.", [("red", "circle"), ("blue", "square")], 2),
        ("two red circles", [("red", "circle"), ("red", "circle")], 1),  # one mention, one object
        ("a red circle, a red circle", [("red", "circle"), ("red", "circle"), ("red", "circle")], 2),
        ("red crosses and blue squares", [("red", "cross"), ("blue", "square")], 2),  # plurals -es and -s
        ("a circle that is red", [("red", "circle")], 0),  # colour must directly precede the shape
        ("a blue circle", [("red", "circle")], 0),
        ("", [("red", "circle")], 0),
    ],
)
def test_caption_object_hits(caption, pairs, hits):
    assert caption_object_hits(caption, objects(*pairs)) == hits


def test_score_each_task():
    qa = record("qa", "red", qa_type="colour")
    assert score(qa, "Red.", FMT) == {"task": "qa", "qa_type": "colour", "correct": True}
    assert score(qa, "blue", FMT)["correct"] is False
    cap = record("caption", "x", objects=objects(("red", "circle"), ("blue", "square"), ("green", "star")))
    assert score(cap, "a red circle and a green star", FMT) == {"task": "caption", "hits": 2, "total": 3}
    ground = record("ground", "[0, 0, 500, 500]", image_size=100, box=[0, 0, 50, 50])
    assert score(ground, "[0, 0, 500, 500]", FMT) == {"task": "ground", "iou": 1.0, "parsed": True}
    assert score(ground, "[0, 0, 500, 250]", FMT)["iou"] == pytest.approx(0.5)
    assert score(ground, "[500, 500, 1000, 1000]", FMT)["iou"] == 0.0
    assert score(ground, "somewhere on the left", FMT) == {"task": "ground", "iou": 0.0, "parsed": False}
    # a 200x100 image: x in frame units scales by 200, y by 100
    wide = record("ground", "b", image_size=[200, 100], box=[0, 0, 100, 50])
    assert score(wide, "[0, 0, 500, 500]", FMT)["iou"] == 1.0
    plain = {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "Yes"}]}
    assert score(plain, "yes", FMT) == {"task": "other", "correct": True}


def test_aggregate_exact_values():
    scores = [
        {"task": "qa", "qa_type": "colour", "correct": True},
        {"task": "qa", "qa_type": "colour", "correct": False},
        {"task": "qa", "qa_type": "count", "correct": True},
        {"task": "qa", "qa_type": "shape", "correct": False},
        {"task": "caption", "hits": 2, "total": 3},
        {"task": "caption", "hits": 1, "total": 1},
        {"task": "ground", "iou": 1.0, "parsed": True},
        {"task": "ground", "iou": 0.5, "parsed": True},
        {"task": "ground", "iou": 0.3, "parsed": True},
        {"task": "ground", "iou": 0.0, "parsed": False},
        {"task": "describe", "correct": True},
        {"task": "other", "correct": False},
    ]
    m = aggregate(scores)
    assert m["qa_exact_match"] == 0.5
    assert m["qa_by_type"] == {"colour": 0.5, "count": 1.0, "shape": 0.0}
    assert m["caption_object_recall"] == 0.75  # pooled over objects: 3 of 4, not the mean of 2/3 and 1
    assert m["grounding_acc@0.5"] == 0.5  # IoU 0.5 counts as a hit
    assert m["grounding_miou"] == pytest.approx(0.45)
    assert m["describe_exact_match"] == 1.0
    assert m["exact_match"] == 0.0
    assert m["counts"] == {"caption": 2, "describe": 1, "ground": 4, "other": 1, "qa": 4}


def test_aggregate_of_nothing_is_zero_not_an_error():
    m = aggregate([])
    assert m["qa_exact_match"] == m["caption_object_recall"] == m["grounding_miou"] == 0.0
    assert m["qa_by_type"] == {} and "exact_match" not in m


def test_box_format_comes_from_the_dataset_info(tmp_path):
    assert box_format_for(tmp_path / "test.json") == BoxFormat()
    (tmp_path / "shapesworld.json").write_text(
        json.dumps({"box_format": {"frame": 100, "template": "<{x0},{y0},{x1},{y1}>"}})
    )
    assert box_format_for(tmp_path / "test.json") == BoxFormat(frame=100, template="<{x0},{y0},{x1},{y1}>")


def test_evaluate_runs_the_model_and_reports_fractions(tmp_path, tiny_model, tiny_processor):
    solid_image((255, 0, 0), (96, 96)).save(tmp_path / "a.png")
    records = [
        record("qa", "red", qa_type="colour"),
        record("caption", "a red circle", objects=objects(("red", "circle"))),
        record("ground", "[0, 0, 500, 500]", image_size=96, box=[0, 0, 48, 48]),
        {**record("qa", "blue", qa_type="colour"), "image": "missing.png"},
    ]
    metrics, rows = evaluate(tiny_model, tiny_processor, records, tmp_path, FMT, batch_size=2, progress=False)
    assert metrics["skipped"] == 1 and rows[3] == {"id": records[3]["id"], "error": "unreadable media"}
    assert metrics["counts"] == {"caption": 1, "ground": 1, "qa": 1}
    for key in ("qa_exact_match", "caption_object_recall", "grounding_acc@0.5", "grounding_miou"):
        assert 0.0 <= metrics[key] <= 1.0
    assert all(0.0 <= v <= 1.0 for v in metrics["qa_by_type"].values())
    for row, rec in zip(rows[:3], records):
        assert row["question"] == "<image>\nQ?" and row["answer"] == rec["conversations"][-1]["value"]
        assert isinstance(row["prediction"], str)
        assert {k: row[k] for k in score(rec, row["prediction"], FMT)} == score(rec, row["prediction"], FMT)
