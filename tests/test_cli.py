"""The ``mm`` console script end to end: quickstart, data generation, eval and one-shot chat."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import mm

METRIC_KEYS = ("qa_exact_match", "caption_object_recall", "grounding_acc@0.5", "grounding_miou")
CHEAP = [
    "model.llm={family: llama, hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 2}",
    "model.tokenizer.vocab_size=400",
    "data.max_length=1024",
    "train.batch_size=4",
    "train.eval_every=0",
    "train.save_every=0",
    "train.threads=1",
    "train.mixed_precision=no",
]


def check_metrics(metrics: dict) -> None:
    for key in METRIC_KEYS:
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["qa_by_type"] and all(0.0 <= v <= 1.0 for v in metrics["qa_by_type"].values())


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs")
    result = mm("quickstart", "--out", str(out), "--n", "40", "--steps", "3", "--quiet", *CHEAP, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_quickstart_trains_evaluates_and_prints_the_metrics_path(quickstart):
    out, result = quickstart
    last_line = result.stdout.strip().splitlines()[-1]
    assert Path(last_line) == (out / "metrics.json").resolve()
    metrics = json.loads(Path(last_line).read_text())
    check_metrics(metrics)
    assert metrics["blind"] is False and metrics["skipped"] == 0
    assert sum(metrics["counts"].values()) == len(json.loads((out / "data" / "test.json").read_text()))
    rows = (out / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == sum(metrics["counts"].values())
    steps = [json.loads(line)["step"] for line in (out / "run" / "train_log.jsonl").read_text().splitlines()]
    assert max(steps) == 3
    assert Path(metrics["model_dir"]) == (out / "run" / "model").resolve()


def test_data_shapesworld(tmp_path):
    result = mm("data", "shapesworld", "--out", str(tmp_path / "sw"), "--n", "10", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str((tmp_path / "sw").resolve())
    info = json.loads((tmp_path / "sw" / "shapesworld.json").read_text())
    assert info["n"] == 10 and info["image_size"] == 96
    assert {k: v["images"] for k, v in info["counts"].items()} == {"train": 8, "val": 1, "test": 1}
    assert len(list((tmp_path / "sw" / "images" / "train").glob("*.png"))) == 8
    printed = json.loads(result.stdout[: result.stdout.rindex("}") + 1])
    assert printed == info["counts"]


def test_eval_writes_metrics_json(quickstart, tmp_path):
    out, _ = quickstart
    metrics_path = tmp_path / "m" / "metrics.json"
    args = ["--model", str(out / "run" / "model"), "--data", str(out / "data" / "test.json")]
    result = mm("eval", *args, "--json", str(metrics_path), "--limit", "12", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(metrics_path.resolve())
    metrics = json.loads(metrics_path.read_text())
    assert sum(metrics["counts"].values()) == 12
    for key in METRIC_KEYS:
        assert 0.0 <= metrics[key] <= 1.0, key


def test_eval_and_chat_compress_the_kv_cache(quickstart, tmp_path):
    from mm.inference import Assistant
    from mm.kv_cache import KVCompression

    out, _ = quickstart
    model_dir, data = out / "run" / "model", out / "data" / "test.json"
    args = ["--model", str(model_dir), "--data", str(data), "--limit", "8", "--quiet"]
    full, lookm = tmp_path / "full.json", tmp_path / "lookm.json"
    assert mm("eval", *args, "--json", str(full)).returncode == 0
    result = mm("eval", *args, "--json", str(lookm), "--kv-method", "lookm", "--kv-budget", "0.2")
    assert result.returncode == 0, result.stderr
    full, lookm = json.loads(full.read_text()), json.loads(lookm.read_text())
    assert (
        lookm["kv_bytes_prompt"] == full["kv_bytes_prompt"] == full["kv_bytes_kept"] > lookm["kv_bytes_kept"]
    )
    image = out / "data" / "images" / "test" / "test_000000.png"
    question = "What colour is the circle?"
    kv = ["--kv-method", "h2o", "--kv-budget", "0.3", "--kv-queries", "16", "--max-new-tokens", "8"]
    result = mm("chat", "--model", str(model_dir), "--image", str(image), *kv, question)
    assert result.returncode == 0, result.stderr
    expected = Assistant(model_dir, device="cpu").ask(
        question, [image], max_new_tokens=8, kv=KVCompression("h2o", 0.3, queries=16)
    )
    assert result.stdout.strip() == expected
    # bad settings fail before any model loads (the folder does not exist)
    bad = mm(
        "chat", "--model", str(tmp_path / "none"), "--kv-method", "lookm", "--kv-budget", "1.5", question
    )
    assert (
        bad.returncode == 2 and "KV budget must be a fraction in (0, 1] or a whole token count" in bad.stderr
    )
    bad = mm(
        "eval",
        "--model",
        str(tmp_path / "none"),
        "--data",
        str(data),
        "--kv-method",
        "h2o",
        "--kv-budget",
        "0",
    )
    assert bad.returncode == 2 and "KV budget must be" in bad.stderr and "none" not in bad.stderr


def test_chat_one_shot_prints_the_answer(quickstart):
    from mm.inference import Assistant

    out, _ = quickstart
    model_dir, image = out / "run" / "model", out / "data" / "images" / "test" / "test_000000.png"
    question = "What colour is the circle?"
    result = mm("chat", "--model", str(model_dir), "--image", str(image), "--max-new-tokens", "8", question)
    assert result.returncode == 0, result.stderr
    expected = Assistant(model_dir, device="cpu").ask(question, [image], max_new_tokens=8)
    assert result.stdout.strip() == expected


def test_chat_with_a_missing_image_exits_2_naming_the_file(quickstart, tmp_path):
    out, _ = quickstart
    missing = tmp_path / "no_such_image.png"
    result = mm("chat", "--model", str(out / "run" / "model"), "--image", str(missing), "What is this?")
    assert result.returncode == 2
    assert "error" in result.stderr and "no_such_image.png" in result.stderr
    assert result.stdout.strip() == ""


def test_unknown_model_directory_is_a_clean_error(tmp_path):
    result = mm("eval", "--model", str(tmp_path / "nope"), "--data", str(tmp_path / "test.json"))
    assert result.returncode == 2
    assert "mm eval: error:" in result.stderr and "nope" in result.stderr


def test_packaged_recipes_build_valid_configs():
    from mm.config import config_from_dict
    from mm.quickstart import recipe

    for name, pool in (("quickstart", 2), ("quickstart_full", 1)):
        spec = recipe(name)
        assert spec.pop("shapesworld")["image_size"] >= 96
        cfg = config_from_dict(spec)
        assert cfg.model.projector.pool == pool and cfg.data.branch_turns
    full = config_from_dict({k: v for k, v in recipe("quickstart_full").items() if k != "shapesworld"})
    assert full.train.max_steps == 2500 and full.train.loss_weighting == "token"


def test_recipe_from_a_yaml_file_and_unknown_names(tmp_path):
    from mm.quickstart import recipe

    path = tmp_path / "mine.yaml"
    path.write_text("shapesworld: {n: 12}\ntrain: {max_steps: 1}\n")
    assert recipe(str(path)) == {"shapesworld": {"n": 12}, "train": {"max_steps": 1}}
    with pytest.raises(ValueError, match=r"unknown recipe 'nope'.*quickstart_full"):
        recipe("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {max_steps: 1}\n")
    with pytest.raises(ValueError, match="must be a mapping with a 'shapesworld' section"):
        recipe(str(bad))


def test_quickstart_with_an_unknown_recipe_exits_2(tmp_path):
    result = mm("quickstart", "--out", str(tmp_path / "qs"), "--recipe", "nope")
    assert result.returncode == 2
    assert "mm quickstart: error: unknown recipe 'nope'" in result.stderr
    assert not (tmp_path / "qs").exists()
