"""Training across processes (torchrun, 2 CPU processes over gloo): the same global batch gives the same
losses and weights as one process, and a SIGKILLed 2-process run resumes to the same losses.

Tolerance: 1e-5 relative on the loss and 1e-5 absolute on the exported weights (fp32; the ranks' gradients
are averaged in another order than one process sums them, measured ~1e-7 and ~2e-6)."""

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
import torch
import yaml
from conftest import tiny_run_model
from safetensors.torch import load_file

from data.dataset import ResumableSampler, group_by_length
from mm.config import load_config
from mm.train import fill_deepspeed_auto, train

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
STEPS = 6


def write_config(path: Path, data: Path, out: Path) -> Path:
    model = tiny_run_model()
    model["experts"][0]["frozen"] = True  # BatchNorm statistics of a trained expert depend on the local batch
    config = {
        "model": model,
        "data": {"train": str(data / "train.json"), "max_length": 1024, "num_workers": 0},
        "train": {
            "output_dir": str(out),
            "batch_size": 4,
            "lr": 1e-3,
            "warmup_steps": 1,
            "max_steps": STEPS,
            "save_every": 1,
            "eval_every": 0,
            "log_every": 1,
            "threads": 1,
            "mixed_precision": "no",
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


def losses(out: Path) -> dict[int, tuple[float, int]]:
    rows = {}
    for line in (out / "train_log.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            rows[row["step"]] = (row["loss"], row["samples"])
    return rows


def torchrun(*args: str) -> list[str]:
    if not TORCHRUN.is_file():
        pytest.skip(f"torchrun is not installed beside {sys.executable}")
    return [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "mm.train", *args]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from data.shapesworld import generate

    root = tmp_path_factory.mktemp("dist")
    generate(root / "data", n=40, image_size=96, progress=False)
    config = write_config(root / "config.yaml", root / "data", root / "one")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def one_process(*args: str) -> None:
        ran = subprocess.run(
            [sys.executable, "-m", "mm.train", str(config), *args, "--quiet"],
            env=env,
            capture_output=True,
            text=True,
        )
        assert ran.returncode == 0, ran.stderr[-3000:]

    # every run starts from the same saved weights (ZeRO-3 builds models partitioned: another random init);
    # the one-process runs without DeepSpeed run in this process (the same Trainer, no start-up cost)
    start = [f"train.output_dir={root / 'init'}", "train.max_steps=0"]
    initial = train(load_config(config, start), progress=False)
    init = f"model.init_from={initial}"
    train(load_config(config, [init]), progress=False)

    # two processes, each half of the same global batch of 4, SIGKILLed at a random step, then resumed
    two = root / "two"
    args = [str(config), init, f"train.output_dir={two}", "train.batch_size=2", "--quiet"]
    kill_after = random.Random().randint(2, STEPS - 2)
    proc = subprocess.Popen(
        torchrun(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    log = two / "train_log.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.05)
    killed = proc.poll() is None
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)
    output = proc.communicate()[0].decode(errors="replace")
    assert killed, f"the 2-process run ended before it could be killed:\n{output[-3000:]}"
    interrupted = losses(two)
    resumed = subprocess.run(torchrun(*args, "--resume"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    # one process under DeepSpeed ZeRO-3 through accelerate (its "auto" fields filled, the export gathered)
    zero3 = root / "zero3"
    deepspeed = str(REPO / "configs" / "deepspeed" / "zero3.json")
    one_process(init, f"train.output_dir={zero3}", "train.save_every=3", "--deepspeed", deepspeed)
    return {
        "one": root / "one",
        "two": two,
        "interrupted": interrupted,
        "kill_after": kill_after,
        "zero3": zero3,
    }


def test_two_processes_killed_and_resumed_train_like_one_process_on_the_same_global_batch(runs):
    one, two = losses(runs["one"]), losses(runs["two"])
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))  # every step logged once, none lost
    assert len(runs["interrupted"]) >= runs["kill_after"]  # it was killed mid-run, after these steps
    for step in one:
        loss_one, samples_one = one[step]
        loss_two, samples_two = two[step]
        assert samples_two == samples_one == 4 * step  # samples count the global batch
        assert loss_two == pytest.approx(loss_one, rel=1e-5), f"step {step}"
    for step, (loss, _) in runs["interrupted"].items():  # what was logged before the kill stands
        assert loss == pytest.approx(two[step][0], rel=1e-6)


def test_two_process_export_equals_the_one_process_weights(runs):
    a = load_file(str(runs["one"] / "model" / "model.safetensors"))
    b = load_file(str(runs["two"] / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=0, msg=name)
    # the 2-process export loads into one process and is a complete model directory
    from mm.build import load_vlm

    model, _ = load_vlm(runs["two"] / "model")
    loaded = model.state_dict()
    for name in b:
        assert torch.equal(loaded[name], b[name]), name


def test_deepspeed_zero3_trains_and_exports_like_plain_training(runs):
    """One process (accelerate runs DeepSpeed only on GPUs across processes; 2-rank ZeRO runs on GPUs)."""
    one, zero3 = losses(runs["one"]), losses(runs["zero3"])
    assert sorted(zero3) == sorted(one)
    # DeepSpeed ran: its engine wrote the checkpoint (partitioned states and its zero_to_fp32.py)
    assert (runs["zero3"] / "checkpoints" / "step_0000003" / "zero_to_fp32.py").is_file()
    for step in one:
        assert zero3[step][0] == pytest.approx(one[step][0], rel=1e-5), f"step {step}"
    a = load_file(str(runs["one"] / "model" / "model.safetensors"))
    b = load_file(str(runs["zero3"] / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=0, msg=name)


def test_sharded_sampler_gives_every_rank_the_same_count_and_covers_everything():
    for n, world in [(10, 3), (1, 4), (7, 2), (8, 4)]:
        shards = [list(ResumableSampler(n, seed=3, rank=r, world_size=world)) for r in range(world)]
        assert len({len(s) for s in shards}) == 1, (n, world)
        assert set().union(*shards) == set(range(n))
        assert sum(map(len, shards)) == -(-max(n, world) // world) * world
    # one process: no padding, a plain permutation
    assert sorted(ResumableSampler(10, seed=3)) == list(range(10))


def test_length_grouped_sampler_pads_less_and_resumes_exactly():
    """data.group_by_length: every epoch still covers every sample once per rank set, batches hold similar
    lengths (padding falls), the order is seeded, and a sampler restored mid-epoch continues identically."""
    n, batch, world = 403, 4, 2
    lengths = torch.randint(5, 300, (n,), generator=torch.Generator().manual_seed(0)).tolist()

    def batches(sampler):
        order = list(sampler)
        return [order[k : k + batch] for k in range(0, len(order), batch)]

    def padding(sampler):  # padded tokens / all tokens of right-padded batches
        rows = batches(sampler)
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in rows) / sum(
            max(lengths[i] for i in b) * len(b) for b in rows
        )

    grouped = [
        ResumableSampler(n, seed=5, rank=r, world_size=world, lengths=lengths, batch_size=batch)
        for r in range(world)
    ]
    shards = [list(s) for s in grouped]
    assert len({len(s) for s in shards}) == 1 and set().union(*shards) == set(range(n))
    plain = ResumableSampler(n, seed=5, rank=0, world_size=world)
    one = ResumableSampler(n, seed=5, rank=0, world_size=world, lengths=lengths, batch_size=batch)
    assert padding(one) < padding(plain) / 4, (padding(one), padding(plain))
    assert padding(plain) > 0.2
    # megabatches of 2, each longest first; a tie keeps the shuffled order
    assert group_by_length([3, 1, 2, 0, 4], [5, 9, 1, 7, 1], 2) == [1, 3, 0, 2, 4]
    assert group_by_length([2, 4, 0], [5, 9, 1, 7, 1], 4) == [0, 2, 4]
    # resume mid-epoch (epoch 1, after 7 samples) -> the same continuation
    full = ResumableSampler(n, seed=5, lengths=lengths, batch_size=batch)
    list(full)
    it = iter(full)
    head = [next(it) for _ in range(7)]
    state = full.state_dict()
    rest = list(it)
    resumed = ResumableSampler(n, seed=5, lengths=lengths, batch_size=batch)
    resumed.load_state_dict(state)
    assert list(resumed) == rest and sorted(head + rest) == list(range(n))
    with pytest.raises(ValueError, match="lengths: 3 given for 4 samples"):
        ResumableSampler(4, lengths=[1, 2, 3])


def test_deepspeed_auto_fields_come_from_the_train_section():
    from mm.config import TrainConfig

    train = TrainConfig(batch_size=3, grad_accum=2, grad_clip=0.5)
    for name in ("zero2", "zero3", "zero3_offload"):
        config = json.loads((REPO / "configs" / "deepspeed" / f"{name}.json").read_text())
        filled = fill_deepspeed_auto(config, train, world=4, hidden=64)
        assert filled["train_micro_batch_size_per_gpu"] == 3
        assert filled["gradient_accumulation_steps"] == 2
        assert filled["train_batch_size"] == 3 * 2 * 4
        assert filled["gradient_clipping"] == 0.5  # DeepSpeed clips: accelerate's clip_grad_norm_ does not
        zero = filled["zero_optimization"]
        assert zero["reduce_bucket_size"] == 64 * 64
        if zero["stage"] == 3:
            assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # the export gathers them
            assert zero["stage3_param_persistence_threshold"] == 640
        assert "auto" not in json.dumps({k: v for k, v in filled.items() if k not in ("fp16", "bf16")})
    explicit = fill_deepspeed_auto({"gradient_clipping": 2.0}, train, world=1, hidden=8)
    assert explicit["gradient_clipping"] == 2.0  # an explicit value stays


def test_a_missing_or_broken_deepspeed_config_is_named(tmp_path):
    from mm.config import ConfigError
    from mm.train import _deepspeed_plugin

    with pytest.raises(ConfigError, match=r"no DeepSpeed config at .*nope\.json"):
        _deepspeed_plugin(str(tmp_path / "nope.json"))
    broken = tmp_path / "broken.json"
    broken.write_text("{stage: 2")
    with pytest.raises(ConfigError, match=r"broken\.json is not valid JSON"):
        _deepspeed_plugin(str(broken))
