"""Training: an uninterrupted run, a SIGKILLed run resumed to the same numbers, atomic checkpoints, exports,
and bad images skipped without stopping the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import TINY_LLM

from mm.build import load_vlm
from mm.config import load_config
from mm.train import CHECKPOINTS, LATEST, latest_checkpoint, train

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 12
BAD_IMAGE = "train_000003"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from data.shapesworld import generate

    out = tmp_path_factory.mktemp("shapes")
    generate(out, n=40, image_size=96, progress=False)
    (out / "images" / "train" / f"{BAD_IMAGE}.png").write_bytes(b"this is not a PNG file")
    return out


def write_config(path: Path, data_dir: Path, output_dir: Path) -> Path:
    config = {
        "model": {
            "llm": dict(TINY_LLM),
            "tokenizer_vocab_size": 400,
            "experts": [{"name": "main", "model": "resnet10t", "image_size": 96, "feature_index": 2}],
            "projector": {"type": "mlp", "pool": 2, "pos_embed": True},
        },
        # branched multi-turn records in the split layout, as the quickstart recipe trains
        "data": {"train": str(data_dir / "train.json"), "max_length": 1024, "branch_turns": True},
        "train": {
            "output_dir": str(output_dir),
            "batch_size": 4,
            "lr": 1e-3,
            "warmup_steps": 2,
            "max_steps": MAX_STEPS,
            "save_every": 2,
            "eval_every": 0,
            "log_every": 1,
            "train_experts": True,
            "threads": 1,
            "mixed_precision": "no",
            "keep_checkpoints": 2,
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


def log_rows(output_dir: Path) -> dict[int, dict]:
    """The training rows of train_log.jsonl by step (the last one written wins, as after a resume)."""
    rows = {}
    for line in (output_dir / "train_log.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            rows[row["step"]] = row
    return rows


@pytest.fixture(scope="module")
def full_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    config = write_config(out.parent / "config.yaml", data_dir, out)
    export = train(load_config(config), progress=False)
    return out, export


def test_uninterrupted_run_logs_every_step_and_learns(full_run):
    out, _ = full_run
    rows = log_rows(out)
    assert sorted(rows) == list(range(1, MAX_STEPS + 1))
    assert all(len(r["batch"]) == 12 for r in rows.values())
    assert len({r["batch"] for r in rows.values()}) == MAX_STEPS  # a fresh set of samples each step
    losses = [rows[s]["loss"] for s in sorted(rows)]
    assert all(loss == loss and loss < 20 for loss in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses


@pytest.mark.parametrize("word", ["no", "off"])
def test_mixed_precision_no_override_stays_a_word(word):
    # YAML 1.1 reads `no` as False; accelerate needs the string
    assert load_config(None, [f"train.mixed_precision={word}"]).train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"


def test_checkpoints_are_atomic_and_pruned(full_run):
    out, _ = full_run
    root = out / CHECKPOINTS
    assert (root / LATEST).read_text().strip() == f"step_{MAX_STEPS:07d}"
    assert latest_checkpoint(out) == root / f"step_{MAX_STEPS:07d}"
    assert sorted(p.name for p in root.iterdir()) == [
        LATEST,
        f"step_{MAX_STEPS - 2:07d}",
        f"step_{MAX_STEPS:07d}",
    ]
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("*.old"))
    for ckpt in root.glob("step_*"):
        assert (ckpt / "export" / "config.json").is_file() and (
            ckpt / "export" / "mm_processor.json"
        ).is_file()


def test_final_export_loads_and_matches_the_last_checkpoint(full_run):
    import torch

    _, export = full_run
    model, processor = load_vlm(export)
    ckpt_model, _ = load_vlm(latest_checkpoint(export.parent) / "export")
    assert processor.tokens_per_image == 36  # 96 px / stride 8 = 12x12, pooled 2x2
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ckpt_model.state_dict()[name]), name
    assert processor.extra["box_format"] == {"frame": 1000, "template": "[{x0}, {y0}, {x1}, {y1}]"}


def test_bad_image_is_skipped_and_recorded(full_run):
    out, _ = full_run
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert skipped and {s["id"] for s in skipped} == {BAD_IMAGE}
    assert "train_000003.png" in skipped[0]["reason"]
    rows = log_rows(out)
    assert any(r["samples"] < 4 * r["step"] for r in rows.values())  # its batch went on one sample short


def test_killed_run_resumes_to_the_same_steps_and_losses(data_dir, full_run, tmp_path):
    out = tmp_path / "run"
    config = write_config(tmp_path / "config.yaml", data_dir, out)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mm.cli", "train", str(config), "--quiet"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    pointer = out / CHECKPOINTS / LATEST
    deadline = time.monotonic() + 45
    while not pointer.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    stderr = proc.communicate()[1].decode()
    assert proc.returncode == -signal.SIGKILL, stderr
    assert not (out / "model").exists()  # it really was interrupted
    ckpt = latest_checkpoint(out)
    assert ckpt is not None
    resumed_from = int(ckpt.name.split("_")[1])
    assert 2 <= resumed_from < MAX_STEPS

    train(load_config(config, ["train.output_dir=" + str(out)]), resume=True, progress=False)
    reference, resumed = log_rows(full_run[0]), log_rows(out)
    assert sorted(resumed) == list(range(1, MAX_STEPS + 1))
    for step in range(resumed_from + 1, MAX_STEPS + 1):
        a, b = reference[step], resumed[step]
        assert b["batch"] == a["batch"], step
        assert b["samples"] == a["samples"], step
        assert abs(b["loss"] - a["loss"]) < 1e-5, (step, a["loss"], b["loss"])
    assert (out / "model" / "config.json").is_file()
