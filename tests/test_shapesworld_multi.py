"""Long multi-image ShapesWorld: deterministic records whose answers follow from the scenes, through the CLI,
trained with V2PE and evaluated at another delta with ``mm eval --v2pe-delta``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import mm, tiny_run_model

from data.schema import load_record_file
from data.shapesworld.multi import MULTI_TYPES, generate_multi, pool_scene
from data.shapesworld.scene import SHAPES

KS = {"train": [1, 2, 4], "val": [2], "test": [1, 3, 6]}
RECORDS = {"train": 24, "val": 4, "test": 30}


@pytest.fixture(scope="module")
def multi(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("multi")
    generate_multi(out, k=KS, records=RECORDS, pool=24, progress=False)
    return out


def test_deterministic_per_seed(multi, tmp_path):
    generate_multi(tmp_path / "again", k=KS, records=RECORDS, pool=24, progress=False)
    generate_multi(tmp_path / "other", k=KS, records=RECORDS, pool=24, seed=1, progress=False)
    for name in ("multi_train.json", "multi_test_k6.json"):
        mine = (multi / name).read_text()
        assert (tmp_path / "again" / name).read_text() == mine
        assert (tmp_path / "other" / name).read_text() != mine
    assert (tmp_path / "again" / "images/test/multi_000003.png").read_bytes() == (
        multi / "images/test/multi_000003.png"
    ).read_bytes()


def test_every_answer_follows_from_the_scenes(multi):
    seen = set()
    for k in KS["test"]:
        loaded = load_record_file(multi / f"multi_test_k{k}.json", strict=True)
        assert len(loaded.records) == RECORDS["test"]
        for rec in loaded.records:
            assert len(rec["image"]) == k == rec["meta"]["k"]
            question, answer = rec["conversations"][0]["value"], rec["conversations"][1]["value"]
            assert question.count("<image>") == k and question.startswith("Image 1: <image>")
            scenes = [pool_scene(0, "test", int(Path(p).stem.split("_")[1]), 96) for p in rec["image"]]
            kind = rec["meta"]["multi_type"]
            seen.add(kind)
            ask = question.splitlines()[-1]
            if kind == "count_images":
                colour, shape = ask.removeprefix("How many images contain a ").rstrip("?").split()
                has = [any(o.colour == colour and o.shape == shape for o in s.objects) for s in scenes]
                assert answer == str(sum(has))
            elif kind == "needle":
                colour, shape = ask.removeprefix("Which image contains a ").rstrip("?").split()
                has = [any(o.colour == colour and o.shape == shape for o in s.objects) for s in scenes]
                assert has.count(True) == 1 and answer == str(has.index(True) + 1)
            elif kind == "retrieve":
                shape = ask.removeprefix("One image shows a ").split(".")[0]
                objects = [o for s in scenes for o in s.objects if o.shape == shape]
                assert len(objects) == 1 and answer == objects[0].colour
                assert ask == f"One image shows a {shape}. What colour is it?"
            elif kind == "find_text":
                word = ask.split("'")[1]
                texts = [s.text for s in scenes]
                assert texts.count(word) == 1 and answer == str(texts.index(word) + 1)
            else:
                number = int(ask.removeprefix("In image ").split(",")[0])
                objects = scenes[number - 1].objects
                assert answer in {o.colour for o in objects} | {o.shape for o in objects}
    assert seen == set(MULTI_TYPES)
    # every record plants a retrieval needle: one scene with a single object of a shape the others lack
    for rec in load_record_file(multi / "multi_test_k6.json").records:
        scenes = [pool_scene(0, "test", int(Path(p).stem.split("_")[1]), 96) for p in rec["image"]]
        counts = [[sum(o.shape == shape for o in s.objects) for s in scenes] for shape in SHAPES]
        assert any(sorted(c) == [0] * 5 + [1] for c in counts)
    train = json.loads((multi / "multi_train.json").read_text())
    assert {r["meta"]["k"] for r in train} == set(KS["train"]) and all(
        len(r["conversations"]) >= 2 for r in train
    )


def test_a_subset_of_types(tmp_path):
    info = generate_multi(
        tmp_path, k={"test": [4]}, records={"test": 12}, pool=24, types=["retrieve"], progress=False
    )
    assert info["types"] == ["retrieve"]
    records = load_record_file(tmp_path / "multi_test_k4.json").records
    assert {r["meta"]["multi_type"] for r in records} == {"retrieve"}
    with pytest.raises(ValueError, match=r"types: choose from \['lookup'.*got \['colour'\]"):
        generate_multi(tmp_path, k={"test": [4]}, records={"test": 1}, pool=24, types=["colour"])
    with pytest.raises(ValueError, match="no retrieve question fits record 0 of test .K = 24.; a pool of 24"):
        generate_multi(tmp_path, k={"test": [24]}, records={"test": 4}, pool=24, types=["retrieve"])


def test_cli_generates_trains_with_v2pe_and_evaluates_at_another_delta(multi, tmp_path):
    out = tmp_path / "cli"
    result = mm(
        "data", "shapesworld-multi", "--out", str(out), "--pool", "12", "--train-records", "6",
        "--eval-records", "3", "--train-k", "1", "2", "--test-k", "1", "5", "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    names = ["multi_test_k1.json", "multi_test_k5.json", "multi_train.json", "multi_val_k1.json"]
    assert sorted(p.name for p in out.glob("multi_*.json")) == [*names, "multi_val_k2.json"]

    config = {
        "model": {**tiny_run_model(), "v2pe": True},
        "data": {"train": str(multi / "multi_train.json"), "max_length": 1024},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 4, "warmup_steps": 1},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    result = mm("train", str(path), "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    model_dir = tmp_path / "run" / "model"
    assert json.loads((model_dir / "config.json").read_text())["v2pe"] is True
    metrics_file = tmp_path / "m.json"
    test_file = str(multi / "multi_test_k6.json")
    result = mm(
        "eval",
        "--model",
        str(model_dir),
        "--data",
        test_file,
        "--v2pe-delta",
        "0.25",
        "--json",
        str(metrics_file),
        "--quiet",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads(metrics_file.read_text())
    assert 0.0 <= metrics["multi_exact_match"] <= 1.0 and set(metrics["multi_by_type"]) <= set(MULTI_TYPES)
    assert metrics["counts"]["multi"] == RECORDS["test"]
    bad = mm("eval", "--model", str(model_dir), "--data", test_file, "--v2pe-delta", "2", "--quiet")
    assert bad.returncode == 2 and "V2PE delta must be in (0, 1], got 2.0" in bad.stderr


def test_a_plain_model_fine_tunes_with_v2pe(multi, tmp_path):
    from mm.build import load_vlm
    from mm.rope import PreciseRotary, rotary_modules

    def train(out: Path, **model_keys) -> Path:
        config = {
            "model": {**tiny_run_model(), **model_keys},
            "data": {"train": str(multi / "multi_train.json"), "max_length": 1024},
            "train": {"output_dir": str(out), "max_steps": 1, "batch_size": 4, "warmup_steps": 1},
        }
        path = out.with_suffix(".yaml")
        path.write_text(yaml.safe_dump(config))
        result = mm("train", str(path), "--quiet")
        assert result.returncode == 0, result.stderr[-2000:]
        return out / "model"

    plain = train(tmp_path / "plain")
    assert json.loads((plain / "config.json").read_text())["v2pe"] is False
    tuned = train(tmp_path / "tuned", init_from=str(plain), v2pe=True)
    model, _ = load_vlm(tuned)
    assert model.config.v2pe and all(isinstance(m, PreciseRotary) for _, m in rotary_modules(model.llm))
