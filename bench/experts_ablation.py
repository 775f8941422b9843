"""Poly-visual expert ablation on ShapesWorld (MouSi's questions, measured here): which experts, which fusion,
which position scheme. Every row trains from scratch on the same data with the same steps and seed.

    python bench/experts_ablation.py --out abl --seeds 0 1 --json abl.json --plot abl.png
    python bench/experts_ablation.py --out abl --rows cnn triple --steps 20 --n 400   # a quick smoke run
    python bench/experts_ablation.py --merge s0.json s1.json --json abl.json --plot abl.png  # seeds run apart

Experts (96 px ShapesWorld, all three give a 12x12 grid; none has pretrained weights offline, so all train):
``cnn`` timm resnet10t at stride 8; ``cswin`` our CSWin-T (timm) at stage 1; ``clip`` an HF CLIPVisionModel
tower (ViT, patch 8) written to a local directory and read LLaVA-style (penultimate layer). Rows: each single
expert, each pair, the triple (``concat``, each expert pooled 2x2 to 36 tokens), the triple through
``channel_concat`` and ``resampler`` at the same 108-token budget, and the triple with ``share_by_row`` and
``share_all`` positions. Rows of one seed run as concurrent processes (``--parallel``), so the step times
are under contention: compare them with each other, not with solo runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

RECIPE = "quickstart_full"  # the LLM, data and schedule of the single-expert design that meets the targets
EXPERTS = {
    "cnn": {"name": "cnn", "model": "resnet10t", "image_size": 96, "feature_index": 2},
    "cswin": {"name": "cswin", "model": "cswin_tiny_224", "image_size": 96, "feature_index": 1},
    "clip": {"name": "clip", "kind": "hf", "model": "{clip_dir}"},
}
CONCAT = {"type": "concat", "depth": 2, "pool": 2, "pos_embed": True}
ROWS: dict[str, dict[str, Any]] = {
    "cnn": {"experts": ["cnn"], "projector": CONCAT},
    "cswin": {"experts": ["cswin"], "projector": CONCAT},
    "clip": {"experts": ["clip"], "projector": CONCAT},
    "cnn+cswin": {"experts": ["cnn", "cswin"], "projector": CONCAT},
    "cnn+clip": {"experts": ["cnn", "clip"], "projector": CONCAT},
    "cswin+clip": {"experts": ["cswin", "clip"], "projector": CONCAT},
    "triple": {"experts": ["cnn", "cswin", "clip"], "projector": CONCAT},
    "triple/channel_concat": {
        "experts": ["cnn", "cswin", "clip"],
        "projector": {"type": "channel_concat", "depth": 2, "pool": 1, "grid": [9, 12], "pos_embed": True},
    },
    "triple/resampler": {
        "experts": ["cnn", "cswin", "clip"],
        "projector": {"type": "resampler", "pool": 1, "grid": [9, 12], "layers": 2, "heads": 4},
    },
    "triple/share_by_row": {
        "experts": ["cnn", "cswin", "clip"],
        "projector": CONCAT,
        "positions": "share_by_row",
    },
    "triple/share_all": {"experts": ["cnn", "cswin", "clip"], "projector": CONCAT, "positions": "share_all"},
}
HEADLINE = ("qa_exact_match", "grounding_acc@0.5", "caption_object_recall")
QA_TYPES = ("colour", "shape", "count", "position", "text")


def make_clip_dir(path: Path) -> Path:
    """A randomly initialised CLIP ViT tower (patch 8 at 96 px: 12x12 tokens) saved as HF saves one."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if (path / "config.json").is_file():
        return path
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=192,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=3,
        image_size=96,
        patch_size=8,
    )
    CLIPVisionModel(config).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "crop_size": {"height": 96, "width": 96},
                "do_center_crop": True,
                "size": {"shortest_edge": 96},
                "resample": 3,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
            }
        )
    )
    return path


def row_config(row: str, seed: int, steps: int, data_dir: Path, clip_dir: Path, run_dir: Path):
    from mm.config import config_from_dict
    from mm.quickstart import recipe

    spec = recipe(RECIPE)
    box_frame = spec.pop("shapesworld").get("box_frame", 1000)
    r = ROWS[row]
    experts = [json.loads(json.dumps(EXPERTS[e]).replace("{clip_dir}", str(clip_dir))) for e in r["experts"]]
    spec["model"].update(
        experts=experts, projector=r["projector"], visual_positions=r.get("positions", "original")
    )
    spec["data"].update(
        train=str(data_dir / "train.json"), val=str(data_dir / "val.json"), box_format={"frame": box_frame}
    )
    spec["train"].update(
        output_dir=str(run_dir), max_steps=steps, seed=seed, eval_every=steps, save_every=steps, threads=1
    )
    return config_from_dict(spec)


def run_one(args: argparse.Namespace) -> None:
    """Child process: train one row with one seed, evaluate on the test split, write its JSON."""
    from mm.evaluate import evaluate_file
    from mm.inference import Engine
    from mm.train import train

    out = args.out
    run_dir = out / "runs" / f"{args.run.replace('/', '_')}_s{args.seed}"
    cfg = row_config(args.run, args.seed, args.steps, out / "data", out / "clip", run_dir)
    t0 = time.perf_counter()
    export = train(cfg, overwrite=True, progress=False)
    train_s = time.perf_counter() - t0
    engine = Engine.load(export)
    model, processor = engine.model, engine.processor
    metrics, _, _ = evaluate_file(engine, out / "data" / "test.json", limit=args.eval_records, progress=False)
    steps = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed"] for r in steps if "elapsed" in r]
    gaps = sorted(b - a for a, b in zip(elapsed, elapsed[1:]))  # median: robust to validation steps
    result = {
        "row": args.run,
        "seed": args.seed,
        "steps": args.steps,
        "visual_tokens": processor.tokens_per_image,
        "positions_per_image": processor.positions_per_image,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "train_s": round(train_s, 1),
        "step_ms": round(1000 * gaps[len(gaps) // 2], 1) if gaps else None,
        **{k: v for k, v in metrics.items() if k != "qa_by_type"},
        **{f"qa_{t}": v for t, v in metrics.get("qa_by_type", {}).items()},
    }
    path = out / "results" / f"{args.run.replace('/', '_')}_s{args.seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))


def launch(args: argparse.Namespace, rows: list[str]) -> list[dict[str, Any]]:
    """Every (row, seed) as its own process, ``--parallel`` at a time; results as they finish."""
    jobs = [(row, seed) for seed in args.seeds for row in rows]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    running: list[tuple[subprocess.Popen, str, int, float]] = []
    done: list[dict[str, Any]] = []
    deadline = time.time() + args.deadline_minutes * 60 if args.deadline_minutes else None
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    while jobs or running:
        while jobs and len(running) < args.parallel:
            row, seed = jobs.pop(0)
            cmd = [sys.executable, __file__, "--run", row, "--seed", str(seed), "--out", str(args.out)]
            cmd += ["--steps", str(args.steps), "--eval-records", str(args.eval_records)]
            log = open(logs / f"{row.replace('/', '_')}_s{seed}.log", "w")
            running.append(
                (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), row, seed, time.time())
            )
        time.sleep(2)
        for job in list(running):
            proc, row, seed, started = job
            if proc.poll() is None:
                if deadline and time.time() > deadline:
                    proc.kill()
                    print(f"  {row} seed {seed}: killed at the deadline", flush=True)
                continue
            running.remove(job)
            path = args.out / "results" / f"{row.replace('/', '_')}_s{seed}.json"
            if proc.returncode == 0 and path.is_file():
                done.append(json.loads(path.read_text()))
                print(f"  {row} seed {seed}: done in {time.time() - started:.0f} s", flush=True)
            else:
                print(f"  {row} seed {seed}: FAILED (exit {proc.returncode}), see {logs}", flush=True)
    return done


def table(results: list[dict[str, Any]], rows: list[str]) -> list[dict[str, Any]]:
    """Per row: mean and (min, max) over seeds of the headline metrics; the QA types and the costs."""
    summary = []
    for row in rows:
        runs = [r for r in results if r["row"] == row]
        if not runs:
            continue
        entry: dict[str, Any] = {"row": row, "seeds": sorted(r["seed"] for r in runs)}
        keys = list(HEADLINE) + [f"qa_{t}" for t in QA_TYPES]
        for key in keys:
            values = [r[key] for r in runs if key in r]
            if values:
                entry[key] = round(sum(values) / len(values), 4)
                entry[key + "_range"] = [round(min(values), 4), round(max(values), 4)]
        for key in ("visual_tokens", "positions_per_image", "params_m"):
            entry[key] = runs[0][key]
        times = [r["step_ms"] for r in runs if r.get("step_ms")]
        entry["step_ms"] = round(sum(times) / len(times), 1) if times else float("nan")
        summary.append(entry)
    return summary


def print_table(summary: list[dict[str, Any]]) -> None:
    cols = f"{'QA':>6} {'col/shp/cnt/pos/txt':>25} {'gnd@.5':>7} {'capt':>6} {'tok':>4} {'pos':>4} {'ms':>6}"
    print(f"{'row':22} {cols}")
    for e in summary:
        nan = float("nan")
        types = "/".join(f"{e.get(f'qa_{t}', nan):.2f}" for t in QA_TYPES)
        print(
            f"{e['row']:22} {e.get('qa_exact_match', nan):6.3f} {types:>25} "
            f"{e.get('grounding_acc@0.5', nan):7.3f} {e.get('caption_object_recall', nan):6.3f} "
            f"{e['visual_tokens']:4d} {e['positions_per_image']:4g} {e['step_ms']:6.1f}"
        )


def plot(summary: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.2))
    width = 0.27
    xs = range(len(summary))
    for k, (key, label) in enumerate(
        [
            ("qa_exact_match", "QA exact match"),
            ("grounding_acc@0.5", "grounding Acc@0.5"),
            ("caption_object_recall", "caption recall"),
        ]
    ):
        means = [e.get(key, 0.0) for e in summary]
        lo = [m - e.get(key + "_range", [m, m])[0] for m, e in zip(means, summary)]
        hi = [e.get(key + "_range", [m, m])[1] - m for m, e in zip(means, summary)]
        ax.bar([x + (k - 1) * width for x in xs], means, width, yerr=[lo, hi], capsize=2, label=label)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(
        [f"{e['row']}\n{e['visual_tokens']} tok / {e['positions_per_image']:g} pos" for e in summary],
        rotation=35,
        ha="right",
        fontsize=8,
    )
    ax.set_ylim(0, 1)
    ax.set_ylabel("test split (bars: mean, whiskers: seed range)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, ncol=3, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def merge(args: argparse.Namespace) -> None:
    """One table, JSON and plot from runs made apart (e.g. one seed per 10-minute device call)."""
    parts = [json.loads(p.read_text()) for p in args.merge]
    runs = [r for part in parts for r in part["runs"]]
    rows = [row for row in ROWS if any(r["row"] == row for r in runs)]
    summary = table(runs, rows)
    print_table(summary)
    seeds = sorted({r["seed"] for r in runs})
    settings = {**parts[0]["settings"], "seeds": seeds, "merged_from": [str(p) for p in args.merge]}
    first = parts[0]
    if args.json:
        body = {
            "date": first["date"],
            "device": first["device"],
            "torch": first["torch"],
            "settings": settings,
        }
        args.json.write_text(json.dumps({**body, "summary": summary, "runs": runs}, indent=2))
    if args.plot:
        steps, device = settings["steps"], first["device"]
        title = f"ShapesWorld expert ablation: {steps} steps x batch 32, seeds {seeds}, {device}"
        plot(summary, args.plot, title)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("experts_ablation"))
    ap.add_argument(
        "--rows", nargs="*", default=list(ROWS), help=f"rows to run (default all): {', '.join(ROWS)}"
    )
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--n", type=int, default=None, help="ShapesWorld images (default: the recipe's 20k)")
    ap.add_argument("--eval-records", type=int, default=4000, help="first N test records scored per run")
    ap.add_argument("--parallel", type=int, default=11, help="runs at once (one GPU holds all of a seed)")
    ap.add_argument("--deadline-minutes", type=float, default=None, help="kill runs still going after this")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--merge", nargs="*", type=Path, default=None, help="combine the JSON of earlier runs")
    ap.add_argument("--run", default=None, help=argparse.SUPPRESS)  # child process: one row
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        return run_one(args)
    if args.merge:
        return merge(args)
    unknown = sorted(set(args.rows) - set(ROWS))
    if unknown:
        ap.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")

    import torch

    from data.boxes import BoxFormat
    from data.shapesworld import ensure_dataset
    from mm.quickstart import recipe

    t0 = time.perf_counter()
    data_spec = recipe(RECIPE)["shapesworld"]
    n = args.n or data_spec["n"]
    args.out.mkdir(parents=True, exist_ok=True)
    ensure_dataset(
        args.out / "data",
        n=n,
        seed=data_spec.get("seed", 0),
        image_size=data_spec["image_size"],
        box_format=BoxFormat(frame=data_spec.get("box_frame", 1000)),
        progress=False,
    )
    make_clip_dir(args.out / "clip")
    print(f"data ({n} images) and the CLIP tower ready in {time.perf_counter() - t0:.0f} s", flush=True)
    results = launch(args, args.rows)
    summary = table(results, args.rows)
    print_table(summary)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "date": datetime.date.today().isoformat(),
                    "device": device,
                    "torch": torch.__version__,
                    "settings": {
                        "recipe": RECIPE,
                        "n": n,
                        "steps": args.steps,
                        "seeds": args.seeds,
                        "eval_records": args.eval_records,
                        "parallel": args.parallel,
                    },
                    "summary": summary,
                    "runs": results,
                },
                indent=2,
            )
        )
    if args.plot and summary:
        title = f"ShapesWorld expert ablation: {args.steps} steps x batch 32, seeds {args.seeds}, {device}"
        plot(summary, args.plot, title)


if __name__ == "__main__":
    main()
