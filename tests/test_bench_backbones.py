"""bench/backbones.py runs on CPU with tiny settings, records missing / failing models and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from timm.models import register_model
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "backbones.py"
TINY_ARGS = ["--device", "cpu", "--batch-infer", "2", "--batch-train", "2", "--iters", "1", "--warmup", "0"]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_backbones", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # full-size CSWin-T and Swin-T on the CPU (~50 s): pytest -m slow
def test_cli_tiny_run_writes_json_and_table(tmp_path):
    out = tmp_path / "bench.json"
    models = "cswin_tiny_224,swin_tiny_patch4_window7_224,no_such_model"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY_ARGS, "--high-res", "0", "--models", models, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    env = report["env"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["gpu"] is None
    assert env["date"][:2] == "20"
    assert report["settings"]["batch_infer"] == 2 and report["settings"]["iters"] == 1
    rows = {(r["model"], r["res"]): r for r in report["results"]}
    assert list(rows) == [(m, 224) for m in models.split(",")]
    for res in (224,):
        ours, swin = rows[("cswin_tiny_224", res)], rows[("swin_tiny_patch4_window7_224", res)]
        assert ours["status"] == swin["status"] == "ok"
        assert ours["params_m"] == pytest.approx(22.320552)
        for row in (ours, swin):
            assert row["infer_img_s"] > 0 and row["train_img_s"] > 0
            assert row["infer_finite"] and row["train_finite"]
        assert swin["infer_vs_swin_t"] == 1.0
        assert ours["infer_vs_swin_t"] == pytest.approx(ours["infer_img_s"] / swin["infer_img_s"])
        assert ours["train_vs_swin_t"] == pytest.approx(ours["train_img_s"] / swin["train_img_s"])
        assert "infer_vs_swin_b" not in ours  # Swin-B ratios only for B-size models
        assert rows[("no_such_model", res)] == {"model": "no_such_model", "res": res, "status": "missing"}
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["model", "res", "status"]
    assert any(line.split()[:3] == ["no_such_model", "224", "missing"] for line in lines)


def test_default_plan_is_every_model_at_224_and_448():
    bench = load_bench()
    runs = bench.plan(bench.parse_args([]))
    assert runs[: len(bench.DEFAULT_MODELS)] == [(m, 224) for m in bench.DEFAULT_MODELS]
    assert runs[len(bench.DEFAULT_MODELS) :] == [(m, 448) for m in bench.DEFAULT_MODELS]
    ours = {"cswin_tiny_224", "biformer_tiny", "sgformer_s", "cswin_base_224", "biformer_base", "sgformer_b"}
    baselines = {"swin_tiny_patch4_window7_224", "swin_base_patch4_window7_224", "convnext_tiny"}
    assert set(bench.DEFAULT_MODELS) == ours | baselines


class _FailsInForward(nn.Module):
    """A registered model that raises, to check that one failure does not stop the run."""

    num_classes = 10

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 10)

    def forward(self, x):
        raise RuntimeError("deliberate failure in forward")


@register_model
def bench_test_fails_in_forward(pretrained=False, **kwargs):
    return _FailsInForward()


def test_error_is_recorded_and_run_goes_on():
    bench = load_bench()
    models = "bench_test_fails_in_forward,test_vit"
    report = bench.main([*TINY_ARGS, "--high-res", "0", "--no-channels-last", "--models", models])
    failed, ok = report["results"]
    assert failed["status"] == "error" and "infer_img_s" not in failed
    assert failed["error"] == "measure_inference: RuntimeError: deliberate failure in forward"
    assert "deliberate failure" in failed["traceback"]
    assert ok["model"] == "test_vit" and ok["status"] == "ok" and ok["train_img_s"] > 0
    assert "infer_vs_swin_t" not in ok  # no Swin-T in this run: no ratio rather than a made-up one


def test_cuda_graph_mode_refuses_a_cpu_device():
    bench = load_bench()
    with pytest.raises(SystemExit, match="--cuda-graph needs a CUDA device, not cpu"):
        bench.main([*TINY_ARGS, "--cuda-graph", "--models", "test_vit"])


@pytest.mark.slow  # three rounds of a full-size Swin-T on the CPU (~45 s): pytest -m slow
def test_interleaved_rounds_report_medians_and_record_failures():
    """--rounds: every model is timed once per round; speeds and ratios are medians over the rounds."""
    bench = load_bench()
    models = f"test_vit,bench_test_fails_in_forward,no_such_model,{bench.SWIN_T}"
    args = ["--device", "cpu", "--batch-infer", "1", "--batch-train", "1", "--iters", "1", "--warmup", "0"]
    report = bench.main([*args, "--rounds", "3", "--high-res", "0", "--models", models])
    rows = {r["model"]: r for r in report["results"]}
    assert list(rows) == models.split(",")
    vit, failed, swin = rows["test_vit"], rows["bench_test_fails_in_forward"], rows[bench.SWIN_T]
    assert rows["no_such_model"] == {"model": "no_such_model", "res": 224, "status": "missing"}
    assert failed["status"] == "error"
    assert failed["error"] == "infer: RuntimeError: deliberate failure in forward"
    assert "infer_img_s" not in failed and "train_img_s" not in failed
    for row in (vit, swin):
        assert row["status"] == "ok" and row["infer_finite"] and row["train_finite"]
        for phase in ("infer", "train"):
            rounds = row[f"{phase}_img_s_rounds"]
            assert len(rounds) == 3 and min(rounds) > 0
            assert row[f"{phase}_img_s"] == sorted(rounds)[1]
    built = bench.build("test_vit", 224, bench.parse_args([]), "meta")
    assert vit["params_m"] == pytest.approx(sum(p.numel() for p in built.parameters()) / 1e6)
    for phase in ("infer", "train"):
        per_round = [v / s for v, s in zip(vit[f"{phase}_img_s_rounds"], swin[f"{phase}_img_s_rounds"])]
        assert vit[f"{phase}_vs_swin_t_rounds"] == pytest.approx(per_round)
        assert vit[f"{phase}_vs_swin_t"] == pytest.approx(sorted(per_round)[1])
        assert swin[f"{phase}_vs_swin_t"] == 1.0


@pytest.mark.parametrize("rounds", ["1", "2"])
def test_phase_option_times_only_that_phase(rounds):
    bench = load_bench()
    report = bench.main(
        [*TINY_ARGS, "--high-res", "0", "--models", "test_vit", "--phase", "train", "--rounds", rounds]
    )
    (row,) = report["results"]
    assert row["status"] == "ok" and row["train_img_s"] > 0 and row["train_finite"]
    assert not any(key.startswith("infer_") for key in row)
    assert report["settings"]["phase"] == "train"
