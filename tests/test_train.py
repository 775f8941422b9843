"""Training: an uninterrupted run, a SIGKILLed run resumed to the same numbers, atomic checkpoints, exports,
and bad images skipped without stopping the run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_run_model

from mm.build import load_vlm
from mm.checkpoints import CHECKPOINTS, LATEST, CheckpointManager
from mm.config import load_config
from mm.train import train


def latest_checkpoint(out):
    ckpt = CheckpointManager(out).newest_valid()
    return None if ckpt is None else ckpt.path


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
        "model": tiny_run_model(),
        # branched multi-turn records, as the quickstart recipe trains
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
    manager = CheckpointManager(out)
    for ckpt in manager.checkpoints():
        assert manager.problem(ckpt) is None
        manifest = json.loads((ckpt.path / "checkpoint.json").read_text())
        assert manifest["step"] == ckpt.step and "export/model.safetensors" in manifest["files"]
        assert (ckpt.path / "export" / "config.json").is_file()
        assert (ckpt.path / "export" / "mm_processor.json").is_file()


def test_final_export_loads_and_matches_the_last_checkpoint(full_run):
    import torch

    _, export = full_run
    model, processor = load_vlm(export)
    ckpt_model, _ = load_vlm(latest_checkpoint(export.parent) / "export")
    assert processor.tokens_per_image == 36  # 96 px / stride 8 = 12x12, pooled 2x2
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ckpt_model.state_dict()[name]), name
    assert processor.settings()["box_format"] == {"frame": 1000, "template": "[{x0}, {y0}, {x1}, {y1}]"}


def test_bad_image_is_skipped_and_recorded_once(full_run):
    out, _ = full_run
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert len(skipped) == 1  # seen in every epoch (12 steps x 4 of 32 records), recorded once
    assert skipped[0]["id"] == BAD_IMAGE and skipped[0]["split"] == "train" and skipped[0]["index"] == 3
    assert skipped[0]["path"].endswith("images/train/train_000003.png")
    assert skipped[0]["reason"].startswith("not a recognised image format")
    rows = log_rows(out)
    assert any(r["samples"] < 4 * r["step"] for r in rows.values())  # its batch went on one sample short


def _kill_when(proc: subprocess.Popen, condition, timeout: float = 60) -> bool:
    """SIGKILL ``proc`` as soon as ``condition()`` holds; False if it ended (or timed out) first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if condition():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    return False


def test_killed_at_random_points_resumes_without_losing_or_repeating_a_step(data_dir, full_run, tmp_path):
    """SIGKILL mid-checkpoint-write and at random steps, each time resuming with `mm train --resume` (as a
    requeued job would): the log holds every step once, with the batches and losses of an uninterrupted
    run."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    out = tmp_path / "run"
    log = out / "train_log.jsonl"
    config = write_config(tmp_path / "config.yaml", data_dir, out)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "mm.cli", "train", str(config), "--resume", "--quiet"]
    ckpts = out / CHECKPOINTS

    def fresh(path: Path, since: float) -> bool:  # written by the run started at ``since``
        try:
            return path.stat().st_mtime >= since
        except FileNotFoundError:
            return False

    def logged_step() -> int:
        return max(
            (json.loads(x)["step"] for x in log.read_text().splitlines() if x.endswith("}")), default=0
        )

    mid_write = 0
    for how in ("write", "step", "write", "step"):
        newest = CheckpointManager(out).newest_valid()
        start = newest.step if newest else 0
        launched = time.time()
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if how == "write":  # while this run fills a step_N.tmp folder
            killed = _kill_when(proc, lambda t=launched: any(fresh(p, t) for p in ckpts.glob("step_*.tmp")))
            mid_write += killed and any(ckpts.glob("step_*.tmp"))
        else:  # once this run has logged a random step past its checkpoint
            target = rng.randint(start + 1, min(start + 4, MAX_STEPS - 1))
            killed = _kill_when(proc, lambda t=target, s=launched: fresh(log, s) and logged_step() >= t)
        assert killed, f"seed {seed}: run ended before the {how} kill: {proc.stderr.read().decode()[-2000:]}"
        proc.stderr.close()
        assert not (out / "model").exists()
    assert mid_write >= 1, f"seed {seed}: no kill landed inside a checkpoint write"
    train(load_config(config), resume=True, progress=False)
    reference = log_rows(full_run[0])
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(1, MAX_STEPS + 1)), f"seed {seed}"  # no step lost, none logged twice
    for step, row in log_rows(out).items():
        a = reference[step]
        assert row["batch"] == a["batch"] and row["samples"] == a["samples"], (seed, step)
        assert abs(row["loss"] - a["loss"]) < 1e-5, (seed, step, a["loss"], row["loss"])
    assert (out / "model" / "config.json").is_file()
    assert not list(ckpts.glob("*.tmp"))


def test_progress_bar_shows_the_budget_that_will_stop_the_run():
    from mm.schedule import Progress, Schedule
    from mm.train import TrainerState

    state = TrainerState(step=30, elapsed=150.0)  # 30 of 3000 steps, 2.5 of 10 minutes
    timed = Progress(Schedule(3000, 50, 0.05, max_seconds=600), state, "train", enabled=True)
    assert timed.bar.total == 10.0 and timed.bar.n == 2.5  # minutes, not "3000 steps"
    assert " 2.5/10.0 min " in str(timed.bar) and "step=30" in str(timed.bar)
    state.step = 2000  # steps now bind first: the bar follows them, in minutes of budget
    timed.update()
    assert timed.bar.n == pytest.approx(10.0 * 2000 / 3000)
    timed.close()
    steps = Progress(Schedule(3000, 50, 0.05), state, "train", enabled=True)
    assert steps.bar.total == 3000 and steps.bar.n == 2000 and "2000/3000" in str(steps.bar)
    steps.close()


@pytest.mark.slow  # inductor compiles the decoder layer on the CPU (~1 min)
def test_compiled_decoder_layers_train_to_the_same_losses(data_dir, tmp_path):
    """train.compile: every LLM decoder layer through torch.compile, the same losses as eager (to float
    summation order) and a final model that loads without compile."""
    out = tmp_path / "compiled"
    config = load_config(write_config(tmp_path / "config.yaml", data_dir, out))
    config.train.compile = True
    config.train.max_steps = 4
    config.data.branch_turns = False  # one row layout: fewer shapes to compile
    export = train(config, progress=False)
    eager_out = tmp_path / "eager"
    eager = load_config(write_config(tmp_path / "eager.yaml", data_dir, eager_out))
    eager.train.max_steps, eager.data.branch_turns = 4, False
    train(eager, progress=False)
    compiled, plain = log_rows(out), log_rows(eager_out)
    assert sorted(compiled) == sorted(plain) == [1, 2, 3, 4]
    for step in plain:
        assert compiled[step]["loss"] == pytest.approx(plain[step]["loss"], rel=1e-4), step
    model, _ = load_vlm(export)
    assert not any("_orig_mod" in name for name in model.state_dict())
