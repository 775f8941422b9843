"""Backbone throughput on one device in one run: our CSWin / BiFormer / SG-Former against timm baselines.

Per model and resolution it measures inference img/s (weights in bf16, ``--batch-infer``), training img/s
(bf16 autocast forward + backward + AdamW step, ``--batch-train``) and the peak memory of each phase. The same
batch, input layout and compile setting apply to every model. A model that is not registered is reported as
``missing``; an OOM or error is recorded and the run goes on. Prints a table with ratios against Swin-T (and
Swin-B for the B-size models) at the same resolution and writes JSON with the environment.

    python bench/backbones.py --device cuda --json bench/backbones.json
    python bench/backbones.py --device cuda --cuda-graph --json bench/backbones_graphed.json
    python bench/backbones.py --device cuda --rounds 5 --high-res 0 --json bench/backbones_rounds.json
    python bench/backbones.py --device cpu --batch-infer 2 --batch-train 2 --iters 1 --warmup 0 \\
        --models cswin_tiny_224,swin_tiny_patch4_window7_224

``--rounds R`` (R > 1) interleaves the models instead of measuring them one after another: all of a
resolution's models are built and warmed up, then R rounds time every model for ``--iters`` steps each (the
order rotates per round). Speeds are medians over rounds and ratios are medians of the per-round ratios, so a
drift in the host's speed during the run (eager training at 224 is bound by the host's per-op cost) hits the
model and its baseline alike. Peak memory is then each model's own (allocated during its warm-up, above what
was allocated before it was built).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import timm  # noqa: E402

import vision  # noqa: E402,F401  (registers our backbones with timm)

OURS_T = ["cswin_tiny_224", "biformer_tiny", "sgformer_s"]
OURS_B = ["cswin_base_224", "biformer_base", "sgformer_b"]
SWIN_T, SWIN_B = "swin_tiny_patch4_window7_224", "swin_base_patch4_window7_224"
BASELINES = [SWIN_T, SWIN_B, "convnext_tiny"]
DEFAULT_MODELS = OURS_T + OURS_B + BASELINES
B_MODELS = set(OURS_B) | {SWIN_B}
# timm Swin ties its attention masks to the build size; everything else runs at any size as built.
SIZE_KWARGS: dict[str, Callable[[int], dict[str, Any]]] = {
    SWIN_T: lambda res: {"img_size": res},
    SWIN_B: lambda res: {"img_size": res},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-infer", type=int, default=128)
    p.add_argument("--batch-train", type=int, default=64)
    p.add_argument("--iters", type=int, default=20, help="timed iterations per phase")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations per phase")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated timm names")
    p.add_argument("--res", type=int, default=224, help="base resolution for every model")
    p.add_argument(
        "--high-res",
        type=int,
        default=448,
        help="second resolution for our models and Swin/ConvNeXt baselines (0: skip)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile every model alike")
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="capture each whole step (training: forward + backward + AdamW) in a CUDA graph, alike for "
        "every model: measures the GPU work without the host's per-launch overhead",
    )
    p.add_argument("--no-channels-last", action="store_true", help="keep NCHW inputs and weights")
    p.add_argument("--phase", choices=("both", "infer", "train"), default="both", help="which steps to time")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="> 1: interleave the models, R rounds of --iters steps each; medians over rounds",
    )
    p.add_argument("--json", type=Path, default=None, help="write results here")
    return p.parse_args(argv)


def selected_phases(args: argparse.Namespace) -> list[str]:
    return ["infer", "train"] if args.phase == "both" else [args.phase]


def environment(device: torch.device) -> dict[str, Any]:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "gpu": None,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu": platform.processor() or platform.machine(),
        "host": platform.node(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


class Timer:
    """Wall time of a block of queued work: CUDA events on GPU, perf_counter elsewhere."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> Timer:
        self._sync()
        if self.device.type == "cuda":
            self._start, self._end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self._end.record()
            self._sync()
            self.seconds = self._start.elapsed_time(self._end) / 1000.0
        else:
            self.seconds = time.perf_counter() - self._t0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def build(name: str, res: int, args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    kwargs = SIZE_KWARGS[name](res) if name in SIZE_KWARGS and res != 224 else {}
    with torch.device(device):
        model = timm.create_model(name, pretrained=False, **kwargs)
    model = model.to(device)
    if not args.no_channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def make_input(batch: int, res: int, args: argparse.Namespace, device: torch.device, dtype) -> torch.Tensor:
    x = torch.randn(batch, 3, res, res, device=device, dtype=dtype)
    return x if args.no_channels_last else x.contiguous(memory_format=torch.channels_last)


def run_phase(step: Callable[[], torch.Tensor], args: argparse.Namespace, device: torch.device, batch: int):
    """Warm up, then time ``iters`` steps; returns (img/s, peak GiB, last output finite)."""
    out = None
    for _ in range(args.warmup):
        out = step()
    with Timer(device) as timer:
        for _ in range(args.iters):
            out = step()
    finite = bool(torch.isfinite(out).all()) if out is not None else None
    return batch * args.iters / timer.seconds, peak_gib(device), finite


def graphed(step: Callable[[], torch.Tensor], before_capture: Callable[[], None] = lambda: None):
    """``step`` captured in a CUDA graph (after warm-up on a side stream, as the PyTorch docs prescribe);
    returns a callable that replays it and returns the captured output."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    before_capture()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def inference_step(name: str, res: int, args: argparse.Namespace, device: torch.device):
    """The benchmark's inference step (bf16 weights, ``--batch-infer``) and the model's parameter count."""
    model = build(name, res, args, device).eval().to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    fn = torch.compile(model) if args.compile else model
    x = make_input(args.batch_infer, res, args, device, torch.bfloat16)
    release(device)

    @torch.no_grad()
    def forward() -> torch.Tensor:
        return fn(x)

    step = graphed(forward) if args.cuda_graph else torch.inference_mode()(forward)
    return step, params


def training_step(name: str, res: int, args: argparse.Namespace, device: torch.device):
    """The benchmark's training step: bf16 autocast forward + backward + AdamW, ``--batch-train``."""
    model = build(name, res, args, device).train()
    fn = torch.compile(model) if args.compile else model
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-4, weight_decay=0.05, fused=fused, capturable=args.cuda_graph
    )
    x = make_input(args.batch_train, res, args, device, torch.float32)
    num_classes = getattr(model, "num_classes", 1000) or 1000
    y = torch.randint(0, num_classes, (args.batch_train,), device=device)
    release(device)

    def step() -> torch.Tensor:
        # A graph cannot hold autocast's weight-cast cache: without it every model re-casts its weights
        # each step, alike.
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not args.cuda_graph):
            loss = F.cross_entropy(fn(x).float(), y)
        loss.backward()
        optimizer.step()
        if not args.cuda_graph:  # captured: the backward writes the graph's own gradient buffers each replay
            optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    if args.cuda_graph:
        step = graphed(step, before_capture=lambda: optimizer.zero_grad(set_to_none=True))
    return step


def measure_inference(name: str, res: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    step, params = inference_step(name, res, args, device)
    img_s, mem, finite = run_phase(step, args, device, args.batch_infer)
    return {"params_m": params / 1e6, "infer_img_s": img_s, "infer_peak_gib": mem, "infer_finite": finite}


def measure_training(name: str, res: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    img_s, mem, finite = run_phase(training_step(name, res, args, device), args, device, args.batch_train)
    return {"train_img_s": img_s, "train_peak_gib": mem, "train_finite": finite}


def measure(name: str, res: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name, "res": res, "status": "ok"}
    if not timm.is_model(name):
        row["status"] = "missing"
        return row
    measures = {"infer": measure_inference, "train": measure_training}
    for phase in [measures[key] for key in selected_phases(args)]:
        try:
            row.update(phase(name, res, args, device))
        except torch.cuda.OutOfMemoryError as exc:
            row["status"] = "oom"
            row["error"] = f"{phase.__name__}: {str(exc).splitlines()[0]}"
        except Exception as exc:  # noqa: BLE001  (record and go on with the next model)
            row["status"] = "error"
            row["error"] = f"{phase.__name__}: {type(exc).__name__}: {exc}".splitlines()[0][:300]
            row["traceback"] = traceback.format_exc(limit=4)
        finally:
            release(device)
        if row["status"] != "ok":
            break
    return row


PHASES = {"infer": (lambda *a: inference_step(*a)[0], "batch_infer"), "train": (training_step, "batch_train")}


def interleaved(names: list[str], res: int, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Rows for ``names`` at ``res``, each phase timed in ``--rounds`` interleaved rounds (module docstring).

    Per-round ratios against Swin-T go in the rows as ``{phase}_vs_swin_t_rounds``; ``add_ratios`` takes
    their median."""
    rows = {name: {"model": name, "res": res, "status": "ok"} for name in names}
    for name, row in rows.items():
        if not timm.is_model(name):
            row["status"] = "missing"
        else:
            row["params_m"] = sum(p.numel() for p in build(name, res, args, "meta").parameters()) / 1e6
    for phase in selected_phases(args):
        make_step, batch_key = PHASES[phase]
        batch, steps = getattr(args, batch_key), {}
        for name, row in rows.items():
            if row["status"] != "ok":
                continue
            try:
                release(device)
                before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
                step = make_step(name, res, args, device)
                out = None
                for _ in range(max(args.warmup, 1)):
                    out = step()
                row[f"{phase}_finite"] = bool(torch.isfinite(out).all())
                mem = peak_gib(device)
                row[f"{phase}_peak_gib"] = None if mem is None else mem - before / 2**30
                steps[name] = step
            except Exception as exc:  # noqa: BLE001  (record and go on with the other models)
                row["status"] = "oom" if isinstance(exc, torch.cuda.OutOfMemoryError) else "error"
                row["error"] = f"{phase}: {type(exc).__name__}: {exc}".splitlines()[0][:300]
        speeds: dict[str, list[float]] = {name: [] for name in steps}
        order = list(steps)
        for r in range(args.rounds if order else 0):
            for name in order[r % len(order) :] + order[: r % len(order)]:
                with Timer(device) as timer:
                    for _ in range(args.iters):
                        steps[name]()
                speeds[name].append(batch * args.iters / timer.seconds)
        for name, values in speeds.items():
            rows[name][f"{phase}_img_s"] = statistics.median(values)
            rows[name][f"{phase}_img_s_rounds"] = values
            if SWIN_T in speeds:
                rows[name][f"{phase}_vs_swin_t_rounds"] = [v / b for v, b in zip(values, speeds[SWIN_T])]
        del steps
        release(device)
    return list(rows.values())


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Throughput ratios against Swin-T (all) and Swin-B (B-size models) at the same resolution."""
    by_key = {(r["model"], r["res"]): r for r in rows}
    for row in rows:
        refs = {"swin_t": SWIN_T} | ({"swin_b": SWIN_B} if row["model"] in B_MODELS else {})
        for tag, ref_name in refs.items():
            ref = by_key.get((ref_name, row["res"]))
            for metric in ("infer_img_s", "train_img_s"):
                per_round = row.get(f"{metric.split('_')[0]}_vs_{tag}_rounds")
                if per_round:  # interleaved rounds: the median of the per-round ratios
                    row[f"{metric.split('_')[0]}_vs_{tag}"] = statistics.median(per_round)
                elif ref and row.get(metric) and ref.get(metric):
                    row[f"{metric.split('_')[0]}_vs_{tag}"] = row[metric] / ref[metric]


def plan(args: argparse.Namespace) -> list[tuple[str, int]]:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    runs = [(m, args.res) for m in models]
    if args.high_res:
        runs += [(m, args.high_res) for m in models]
    return runs


def fmt(value: Any, spec: str) -> str:
    """``value`` formatted with ``spec`` (e.g. ``'8.2f'``), or a right-aligned dash when absent."""
    return format(value, spec) if value is not None else format("-", f">{spec.split('.')[0]}")


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'model':32} {'res':>4} {'status':>7} {'params M':>8} {'infer/s':>9} {'train/s':>8} "
        f"{'inf GiB':>7} {'trn GiB':>7} {'inf/swT':>7} {'trn/swT':>7} {'inf/swB':>7} {'trn/swB':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['model']:32} {r['res']:>4} {r['status']:>7} {fmt(r.get('params_m'), '8.2f')} "
            f"{fmt(r.get('infer_img_s'), '9.1f')} {fmt(r.get('train_img_s'), '8.1f')} "
            f"{fmt(r.get('infer_peak_gib'), '7.2f')} {fmt(r.get('train_peak_gib'), '7.2f')} "
            f"{fmt(r.get('infer_vs_swin_t'), '7.2f')} {fmt(r.get('train_vs_swin_t'), '7.2f')} "
            f"{fmt(r.get('infer_vs_swin_b'), '7.2f')} {fmt(r.get('train_vs_swin_b'), '7.2f')}"
        )
        if r.get("error"):
            lines.append(f"    {r['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.cuda_graph and device.type != "cuda":
        raise SystemExit(f"--cuda-graph needs a CUDA device, not {device}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    rows = []
    if args.rounds > 1:
        for res in dict.fromkeys(res for _, res in plan(args)):
            rows += interleaved([name for name, r in plan(args) if r == res], res, args, device)
            print(f"[{len(rows)}] rounds at {res} done", file=sys.stderr, flush=True)
    for name, res in plan(args) if args.rounds <= 1 else []:
        row = measure(name, res, args, device)
        rows.append(row)
        speeds = {k: row[k] for k in ("infer_img_s", "train_img_s") if row.get(k) is not None}
        print(f"[{len(rows)}] {name}@{res}: {row['status']} {speeds}", file=sys.stderr, flush=True)
    add_ratios(rows)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = {"env": environment(device), "settings": settings, "results": rows}
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
