"""Scoring (data.scoring): the generic scorers on any LLaVA JSON, the registry, ShapesWorld's breakdown; and
evaluation through the one generation path (mm.evaluate), with skipped records as rows of their own."""

from __future__ import annotations

import json

import pytest
from conftest import solid_image

from data.boxes import BoxFormat
from data.media import REFUSED, MediaPaths
from data.scoring import (
    ScoreContext,
    aggregate,
    normalize_answer,
    object_hits,
    score_record,
    scorer_for,
)
from data.skips import NothingUsable
from mm.evaluate import evaluate, evaluate_file
from mm.inference import Engine

CTX = ScoreContext(box_format=BoxFormat(frame=1000), image_size=(200, 100))


def turns(question, answer):
    return [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]


def rec(rid, question, answer, **meta):
    out = {"id": rid, "image": "street.png", "conversations": turns(question, answer)}
    return {**out, "meta": meta} if meta else out


# A hand-written LLaVA file that is not ShapesWorld: captions listing objects, box answers without meta.box,
# yes/no questions without any meta. Each with the prediction a model might give.
BOX = "[100, 200, 500, 600]"
GENERIC = [
    (rec("cap-1", "Describe.", "A dog with a red ball.", task="caption", objects=["dog", "red ball"]),
     "A dog plays with a red ball."),
    (rec("cap-2", "Describe.", "Two cars at a light.", task="caption",
         objects=[{"name": "traffic light"}, {"name": "car"}, {"name": "car"}]),
     "Cars wait at a traffic light."),  # "cars" names one car: each mention counts once
    (rec("box-1", "Where is the dog?", BOX, task="ground"), f"It is at {BOX}."),
    (rec("box-2", "Where is the car?", BOX, task="ground"), "[100, 200, 300, 600]"),  # IoU 0.5 is a hit
    (rec("yn-1", "Is there a dog?", "Yes"), "yes."),
    (rec("yn-2", "Is it raining?", "No"), "Yes"),
]  # fmt: skip


def test_normalize_answer():
    assert normalize_answer("  The RED, circle! ") == "the red circle"
    assert normalize_answer("[12, 340]") == "12 340"


@pytest.mark.parametrize(
    ("caption", "objects", "hits"),
    [
        ("A red circle and a blue square.", ["red circle", "blue square"], 2),
        ("two red circles", ["red circle", "red circle"], 1),  # one mention, one object
        ("a red circle, a red circle", ["red circle"] * 3, 2),
        ("red crosses and blue squares", ["red cross", "blue square"], 2),  # plurals -es and -s
        ("a circle that is red", ["red circle"], 0),  # the words must be adjacent, in order
        ("a blue circle", ["red circle"], 0),
        ("", ["red circle"], 0),
        ("a big traffic light", [{"name": "traffic light"}, {"name": "light"}], 2),  # any phrase length
    ],
)
def test_object_hits(caption, objects, hits):
    assert object_hits(caption, objects) == hits


def test_generic_scorers_on_a_llava_file_that_is_not_shapesworld():
    rows = [score_record(rec, prediction, CTX) for rec, prediction in GENERIC]
    assert [r["task"] for r in rows] == ["caption", "caption", "ground", "ground", "other", "other"]
    assert rows[0] == {"task": "caption", "hits": 2, "total": 2}
    assert rows[1] == {"task": "caption", "hits": 2, "total": 3}
    assert rows[2] == {"task": "ground", "iou": 1.0, "parsed": True}  # target parsed from the answer text
    assert rows[3]["iou"] == pytest.approx(0.5)
    assert [r.get("correct") for r in rows[4:]] == [True, False]
    metrics = aggregate(rows)
    assert metrics == {
        "caption_object_recall": pytest.approx(4 / 5),  # pooled over objects, not a mean of 1 and 2/3
        "grounding_acc@0.5": 1.0,
        "grounding_miou": pytest.approx(0.75),
        "exact_match": 0.5,
        "counts": {"caption": 2, "ground": 2, "other": 2},
    }


def test_ground_scorer_uses_meta_box_in_pixels_and_the_image_size():
    rec = {"conversations": turns("Where?", "b"), "meta": {"task": "ground", "box": [0, 0, 100, 50]}}
    wide = ScoreContext(image_size=(200, 100))  # x in frame units scales by 200, y by 100
    assert score_record(rec, "[0, 0, 500, 500]", wide)["iou"] == 1.0
    assert score_record({**rec, "meta": {**rec["meta"], "image_size": 100}}, "[0, 0, 500, 500]", wide)[
        "iou"
    ] == (pytest.approx(0.5))  # meta.image_size wins: a 100x100 image
    assert score_record(rec, "somewhere on the left", wide) == {"task": "ground", "iou": 0.0, "parsed": False}
    with pytest.raises(ValueError, match="box_iou needs the image size"):
        score_record(rec, "[0, 0, 1, 1]", ScoreContext())
    with pytest.raises(ValueError, match="box_iou needs meta.box or a box in the reference answer"):
        score_record(
            {"conversations": turns("Where?", "left"), "meta": {"task": "ground"}}, "[0,0,1,1]", wide
        )


def test_shapesworld_registers_its_question_type_breakdown():
    def qa(qa_type, correct):
        rec = {"conversations": turns("Q?", "red"), "meta": {"task": "qa", "qa_type": qa_type}}
        return score_record(rec, "red" if correct else "blue", CTX)

    rows = [qa("colour", True), qa("colour", False), qa("count", True), qa("shape", False)]
    assert rows[0] == {"task": "qa", "correct": True, "qa_type": "colour"}
    metrics = aggregate(rows)
    assert metrics["qa_exact_match"] == 0.5
    assert metrics["qa_by_type"] == {"colour": 0.5, "count": 1.0, "shape": 0.0}


def test_only_tasks_with_scored_records_report_metrics():
    assert aggregate([]) == {"counts": {}}  # nothing scored: no metric, never a silent 0.0


def test_scorer_override_and_unknown_scorer():
    assert scorer_for("other", "box_iou").name == "box_iou"
    assert scorer_for("ground").name == "box_iou" and scorer_for("anything").name == "exact_match"
    with pytest.raises(
        ValueError, match=r"unknown scorer 'bleu'; known: \['box_iou', 'exact_match', 'object_recall'\]"
    ):
        scorer_for("qa", "bleu")


def test_caption_scorer_without_objects_names_what_is_missing():
    rec = {"conversations": turns("Describe.", "a dog"), "meta": {"task": "caption"}}
    with pytest.raises(ValueError, match=r"object_recall needs meta.objects"):
        score_record(rec, "a dog", CTX)


@pytest.fixture
def generic_file(tmp_path):
    solid_image((255, 0, 0), (200, 100)).save(tmp_path / "street.png")
    path = tmp_path / "generic.json"
    path.write_text(json.dumps([rec for rec, _ in GENERIC]))
    return path


def test_evaluate_file_scores_every_generic_record_through_the_model(
    generic_file, tiny_model, tiny_processor
):
    metrics, rows, skips = evaluate_file(
        Engine(tiny_model, tiny_processor), generic_file, batch_size=4, progress=False
    )
    assert metrics["counts"] == {"caption": 2, "ground": 2, "other": 2}
    assert metrics["scored"] == 6 and metrics["skipped"] == 0 and skips.count("eval") == 0
    for key in ("caption_object_recall", "grounding_acc@0.5", "grounding_miou", "exact_match"):
        assert 0.0 <= metrics[key] <= 1.0
    assert [r["id"] for r in rows] == [rec["id"] for rec, _ in GENERIC]  # file order
    for row, (rec, _) in zip(rows, GENERIC):
        assert row["question"] == rec["conversations"][0]["value"] and isinstance(row["prediction"], str)
        rescored = score_record(rec, row["prediction"], CTX)
        assert {k: row[k] for k in rescored} == rescored


def test_skipped_records_are_rows_with_the_file_and_the_reason(tmp_path, tiny_model, tiny_processor):
    solid_image((255, 0, 0), (96, 96)).save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    good = {"id": "ok", "image": "a.png", "conversations": turns("Q?", "red")}
    records = [
        good,
        {**good, "id": "missing", "image": "missing.png"},
        {**good, "id": "broken", "image": "broken.png"},
        {**good, "id": "escape", "image": "../a.png"},
        {**good, "id": "caption", "meta": {"task": "caption"}},
    ]
    metrics, rows = evaluate(
        Engine(tiny_model, tiny_processor), records, MediaPaths(tmp_path), progress=False
    )
    assert metrics["scored"] == 1 and metrics["skipped"] == 4 and metrics["counts"] == {"other": 1}
    by_id = {r["id"]: r for r in rows}
    assert by_id["missing"]["skipped"] == "file not found"
    assert by_id["missing"]["path"] == str(tmp_path / "missing.png")
    assert by_id["broken"]["skipped"].startswith("not a recognised image format")
    assert by_id["escape"] == {"id": "escape", "index": 3, "skipped": REFUSED, "path": "../a.png"}
    assert by_id["caption"]["skipped"].startswith("object_recall needs meta.objects")
    assert "prediction" in by_id["caption"]


def test_nothing_scored_is_an_error_not_zeros(tmp_path, tiny_model, tiny_processor):
    path = tmp_path / "test.json"
    path.write_text(json.dumps([{"id": f"r{i}", "image": f"gone{i}.png", "conversations": turns("Q?", "a")}
                                for i in range(4)]))  # fmt: skip
    with pytest.raises(
        NothingUsable, match=r"nothing was scored in .*test.json: skipped 4 of 4 eval records"
    ):
        evaluate_file(Engine(tiny_model, tiny_processor), path, progress=False)
