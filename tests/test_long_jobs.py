"""Long jobs under bad input and kills, through the console scripts a user runs (``mm train/eval/chat``):
they never hang, never lose or mix up a checkpoint, never report a silent zero, and say what they skipped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import mm, tiny_run_model
from PIL import Image

from data.media import REFUSED

TINY = {
    "model": tiny_run_model(),
    "data": {"max_length": 1024},
    "train": {
        "batch_size": 4,
        "max_steps": 4,
        "save_every": 2,
        "eval_every": 0,
        "warmup_steps": 1,
        "threads": 1,
        "mixed_precision": "no",
    },
}


def write_config(folder: Path, train: Path, out: Path, val: Path | None = None, **train_keys) -> Path:
    config = json.loads(json.dumps(TINY))
    config["data"].update(train=str(train), val=str(val) if val else None)
    config["train"].update(output_dir=str(out), **train_keys)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def turns(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]


@pytest.fixture(scope="module")
def sw(tmp_path_factory) -> Path:
    from data.shapesworld import generate

    out = tmp_path_factory.mktemp("sw")
    generate(out, n=20, progress=False)  # 16 train, 2 val, 2 test images
    return out


@pytest.fixture(scope="module")
def trained(sw, tmp_path_factory) -> Path:
    """A finished 4-step run: checkpoints at steps 2 and 4, the exported model."""
    folder = tmp_path_factory.mktemp("trained")
    result = mm("train", str(write_config(folder, sw / "train.json", folder / "run")), "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    # a clean run says nothing but where the model is: no warning on every call
    assert result.stdout.splitlines() == [str((folder / "run" / "model").resolve())]
    assert "WARNING" not in result.stderr, result.stderr
    return folder / "run"


def copy_run(trained: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


# -- 1. a training set with no readable image --------------------------------------------------------------
def test_train_without_any_readable_image_stops_with_a_clear_error(sw, tmp_path):
    train = tmp_path / "train.json"  # the records, without their images folder
    train.write_text((sw / "train.json").read_text())
    out = tmp_path / "run"
    result = mm("train", str(write_config(tmp_path, train, out, max_minutes=10)), "--quiet", timeout=90)
    assert result.returncode == 1, result.stderr[-3000:]
    first = tmp_path / "images" / "train" / "train_000000.png"
    assert (
        f"mm train: error: nothing to train on: skipped 16 of 16 train records (16 file not found) "
        f"(all in {out / 'skipped.jsonl'}): record 0 (id 'train_000000'): {first}: file not found;"
    ) in result.stderr
    skipped = lines(out / "skipped.jsonl")
    assert len(skipped) == 16 and len({s["index"] for s in skipped}) == 16  # each once, not once per pass


# -- 2. a new run in a folder holding an earlier run -------------------------------------------------------
def test_new_run_refuses_a_folder_holding_an_earlier_run(sw, trained, tmp_path):
    out = copy_run(trained, tmp_path)
    stale = out / "checkpoints" / "step_0000040"  # an earlier, longer run's checkpoint
    shutil.copytree(out / "checkpoints" / "step_0000004", stale)
    config = write_config(tmp_path, sw / "train.json", out)
    result = mm("train", str(config), "--quiet")
    assert result.returncode == 2
    assert f"mm train: error: {out} already holds a run (checkpoints, model, train_log.jsonl" in result.stderr
    assert "pass --resume to continue it, --overwrite to delete it and start over" in result.stderr
    assert stale.is_dir()  # nothing touched
    result = mm("train", str(config), "--quiet", "--overwrite")
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["latest", "step_0000002", "step_0000004"]  # the new run's, none pruned by name order
    assert (out / "checkpoints" / "latest").read_text() == "step_0000004"
    assert [row["step"] for row in lines(out / "train_log.jsonl")] == [1, 2, 3, 4]


def test_pruning_orders_checkpoints_by_step_number(tmp_path):
    from mm.checkpoints import CheckpointManager

    manager = CheckpointManager(tmp_path, keep=2)
    for step in (4, 6, 40, 8):
        (manager.root / f"step_{step:07d}").mkdir(parents=True)
    (manager.root / "step_0000010.tmp").mkdir()
    manager.prune(current=8)
    # the newest two up to the step just written stay; a later-numbered one (another branch of history,
    # e.g. after --resume-from) is not this run's to prune; an unfinished write goes
    assert sorted(p.name for p in manager.root.iterdir()) == ["step_0000006", "step_0000008", "step_0000040"]


# -- 3 and 10. --resume with a dangling or corrupt newest checkpoint --------------------------------------
def test_resume_with_a_dangling_latest_continues_from_the_newest_complete_checkpoint(sw, trained, tmp_path):
    out = copy_run(trained, tmp_path)
    shutil.rmtree(out / "checkpoints" / "step_0000004")  # 'latest' now names a missing folder
    result = mm("train", str(write_config(tmp_path, sw / "train.json", out)), "--resume", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        f"resuming from {out / 'checkpoints' / 'step_0000002'}, the newest complete checkpoint "
        "('latest' named step_0000004)"
    ) in result.stderr
    reference = {r["step"]: r["loss"] for r in lines(trained / "train_log.jsonl")}
    rows = lines(out / "train_log.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # cut back to step 2, then 3 and 4 once each
    assert all(abs(r["loss"] - reference[r["step"]]) < 1e-5 for r in rows)


def test_truncated_checkpoint_is_named_and_the_previous_one_used(sw, trained, tmp_path):
    out = copy_run(trained, tmp_path)
    weights = out / "checkpoints" / "step_0000004" / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    result = mm("train", str(write_config(tmp_path, sw / "train.json", out)), "--resume", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        f"checkpoint step_0000004 is not usable: {weights}: {size // 2} bytes, {size} were written "
        "(truncated or replaced)"
    ) in result.stderr
    assert f"resuming from {out / 'checkpoints' / 'step_0000002'}" in result.stderr


def test_corrupt_checkpoint_that_fails_to_load_names_it_and_offers_the_previous(sw, trained, tmp_path):
    out = copy_run(trained, tmp_path)
    optimizer = out / "checkpoints" / "step_0000004" / "optimizer.bin"
    optimizer.write_bytes(b"\0" * optimizer.stat().st_size)  # same size: only loading can tell
    config = str(write_config(tmp_path, sw / "train.json", out))
    result = mm("train", config, "--resume", "--quiet")
    assert result.returncode == 2
    previous = out / "checkpoints" / "step_0000002"
    assert f"mm train: error: cannot resume from {out / 'checkpoints' / 'step_0000004'}: " in result.stderr
    assert (
        f"the previous complete checkpoint is {previous}: continue from it with --resume-from"
        in result.stderr
    )
    result = mm("train", config, "--resume-from", str(previous), "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in lines(out / "train_log.jsonl")] == [1, 2, 3, 4]


def test_corrupt_model_weights_are_named(trained, sw, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(trained / "model", model)
    weights = model / "model.safetensors"
    weights.write_bytes(b"\xff" * weights.stat().st_size)
    result = mm("eval", "--model", str(model), "--data", str(sw / "test.json"), "--quiet")
    assert result.returncode == 2
    assert result.stderr.startswith(f"mm eval: error: {weights}: corrupt or truncated weights file")


# -- 6, 8, 9. bad records in training and validation: skipped, recorded once, said on the console ----------
@pytest.fixture(scope="module")
def messy(sw, tmp_path_factory):
    """Training records with a schema error, a corrupt image and three paths outside the data folder;
    a validation set whose images are all missing."""
    folder = tmp_path_factory.mktemp("messy")
    data = folder / "data"
    shutil.copytree(sw / "images", data / "images")
    (folder / "outside.png").write_bytes((sw / "images" / "train" / "train_000000.png").read_bytes())
    cut = data / "images" / "train" / "train_000005.png"
    cut.write_bytes(cut.read_bytes()[:300])  # truncated mid-pixels
    records = json.loads((sw / "train.json").read_text())
    records[2] = {**records[2], "conversations": "What?"}  # schema error
    escapes = ["../outside.png", str(folder / "outside.png"), "../missing.png"]
    for k, entry in enumerate(escapes):
        records[7 + k] = {**records[7 + k], "image": entry}
    (data / "train.json").write_text(json.dumps(records))
    val = [{**r, "image": f"images/gone/{r['id']}.png"} for r in json.loads((sw / "val.json").read_text())]
    (data / "val.json").write_text(json.dumps(val))
    config = write_config(folder, data / "train.json", folder / "run", data / "val.json", eval_every=2)
    result = mm("train", str(config))
    return folder, data, result, len(val)


def test_bad_training_records_are_skipped_and_recorded_once(messy):
    folder, data, result, n_val = messy
    assert result.returncode == 0, result.stderr[-3000:]
    skipped = {(s["split"], s["index"]): s for s in lines(folder / "run" / "skipped.jsonl")}
    assert skipped[("train", 2)]["reason"] == "conversations: expected a non-empty list of turns, got string"
    assert skipped[("train", 5)]["path"] == str(data / "images" / "train" / "train_000005.png")
    assert skipped[("train", 5)]["reason"].startswith("corrupt or truncated image data")
    for k, entry in enumerate(["../outside.png", str(folder / "outside.png"), "../missing.png"]):
        # existing or not, relative or absolute: one message, and the file is never opened
        assert skipped[("train", 7 + k)]["path"] == entry and skipped[("train", 7 + k)]["reason"] == REFUSED
    # validated at steps 2 and 4 and at the end: each bad validation record is written once
    assert sorted(i for split, i in skipped if split == "val") == list(range(n_val))
    assert len(skipped) == 5 + n_val
    assert (
        "skipped 5 of 16 train records (3 refused, 1 conversations, 1 corrupt or truncated image data)"
        in (result.stderr)
    )
    assert f"no validation loss: skipped {n_val} val records ({n_val} file not found)" in result.stderr
    rows = lines(folder / "run" / "train_log.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and not any("val_loss" in r for r in rows)


def test_strict_stops_at_the_first_schema_error(messy):
    folder, data, _, _ = messy
    result = mm(
        "train", str(folder / "config.yaml"), "train.output_dir=" + str(folder / "strict"), "--strict"
    )
    assert result.returncode == 2
    assert result.stderr.strip().endswith(
        f"mm train: error: {data / 'train.json'}: record 2 (id 'train_000002'): conversations: "
        "expected a non-empty list of turns, got string"
    )


# -- 4, 5. evaluation: nothing scored is an error; every skipped record is named with its reason ----------
def test_eval_with_every_record_skipped_exits_1(trained, sw, tmp_path):
    data = tmp_path / "test.json"
    data.write_text((sw / "test.json").read_text())  # no images next to it
    metrics = tmp_path / "metrics.json"
    result = mm(
        "eval", "--model", str(trained / "model"), "--data", str(data), "--json", str(metrics), "--quiet"
    )
    assert result.returncode == 1
    n = len(json.loads(data.read_text()))
    assert (
        f"mm eval: error: nothing was scored in {data}: skipped {n} of {n} eval records ({n} file not found)"
        in (result.stderr)
    )
    assert not metrics.exists()


def test_eval_names_each_skipped_record_and_scores_the_rest(trained, sw, tmp_path):
    shutil.copytree(sw / "images", tmp_path / "images")
    frames = [Image.new("RGB", (96, 96), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    good = json.loads((sw / "test.json").read_text())[:2]
    records = [
        good[0],
        {**good[1], "image": "images/test/none.png"},
        {**good[1], "id": "anim", "image": "anim.gif"},
        {**good[1], "id": "out", "image": "../../etc/passwd"},
        {"id": "broken", "image": "x.png"},
    ]
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(records))
    predictions, metrics = tmp_path / "pred.jsonl", tmp_path / "m.json"
    args = ["--model", str(trained / "model"), "--data", str(data), "--quiet"]
    result = mm("eval", *args, "--predictions", str(predictions), "--json", str(metrics))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped 4 of 5 eval records" in result.stderr
    assert (
        f"record 1 (id '{good[1]['id']}'): {tmp_path / 'images/test/none.png'}: file not found"
        in result.stderr
    )
    rows = lines(predictions)
    assert [r["id"] for r in rows] == [good[0]["id"], good[1]["id"], "anim", "out", "broken"]
    assert "prediction" in rows[0] and "skipped" not in rows[0]
    assert rows[1]["skipped"] == "file not found" and rows[1]["path"] == str(
        tmp_path / "images/test/none.png"
    )
    assert rows[2]["skipped"].startswith("animated or multi-frame image (2 frames)")
    assert rows[3] == {"id": "out", "index": 3, "skipped": REFUSED, "path": "../../etc/passwd"}
    assert rows[4]["skipped"] == "conversations: missing" and rows[4]["index"] == 4
    saved = json.loads(metrics.read_text())
    assert saved["scored"] == 1 and saved["skipped"] == 4 and sum(saved["counts"].values()) == 1
    result = mm("eval", *args, "--strict")
    assert result.returncode == 2 and "record 4 (id 'broken'): conversations: missing" in result.stderr


# -- 7. the chat REPL drops a bad image instead of failing every later question -----------------------------
def test_chat_repl_drops_a_bad_image_and_keeps_going(trained, sw, tmp_path):
    image = sw / "images" / "test" / "test_000000.png"
    missing = tmp_path / "missing.png"
    script = f":image {missing}\nWhat colour?\n:image {image}\nWhat colour is the circle?\nHow many?\n:quit\n"
    result = mm("chat", "--model", str(trained / "model"), "--max-new-tokens", "4", stdin=script)
    assert result.returncode == 0, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {missing}: file not found"]  # once: later questions do not carry it
    assert f"dropped the queued image(s): {missing}" in result.stderr
    assert result.stdout.count(">>> ") == 6  # every line read, the REPL still up at :quit
