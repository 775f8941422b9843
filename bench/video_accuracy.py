"""ShapesWorld video accuracy: the video model against the single-frame baseline, per question type.

Two runs of the same model on the same clips, steps, batch and seed, through the real Trainer:
``video`` (``data.video``: 4 segments x 4 frames, pooled per segment, VideoGPT+-style) and ``frame``
(``data.video.middle_frame``: the clip's middle frame in every slot; the same model, tokens and positions).
Each is evaluated on the test split (exact match per ``meta.video_type``); the table gives both and the
difference in points. Issue 14's targets: on motion and order the video model beats the baseline by >= 25
points; on state the two are within 5.

    python bench/video_accuracy.py --out video_bench --json video_accuracy.json --plot video_accuracy.png
    python bench/video_accuracy.py --out /tmp/vb --steps 20 --clips 40 --batch-size 8 --cpu   # smoke, CPU

By default both runs train at once (two processes: on one GPU they share it); ``--parallel 1`` runs them one
after the other.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.jobs import run_jobs  # noqa: E402

ARMS = ("video", "frame")
TYPES = ("motion", "order", "count", "state", "caption")
TARGETS = {"motion": 0.25, "order": 0.25}  # video - frame, at least
SAME = {"state": 0.05}  # |video - frame|, at most
MODEL = {  # the quickstart's model: 36 tokens per frame (a 6x6 grid)
    "llm": {
        "family": "llama",
        "hidden_size": 192,
        "num_hidden_layers": 3,
        "num_attention_heads": 3,
        "intermediate_size": 576,
    },
    "tokenizer": {"vocab_size": 1024},
    "experts": [{"name": "main", "model": "resnet10t", "image_size": 96, "feature_index": 2}],
    "projector": {"type": "concat", "depth": 2, "pool": 2, "pos_embed": True},
}


def run_spec(args: argparse.Namespace, arm: str) -> dict[str, Any]:
    """The run config of one arm: identical but for ``data.video.middle_frame``."""
    data = args.out / "data"
    return {
        "model": {
            **json.loads(json.dumps(MODEL)),
            "video": {"segments": args.segments, "spatial_pool": args.spatial_pool},
        },
        "data": {
            "train": str(data / "train.json"),
            "val": str(data / "val.json"),
            "max_length": 1024,
            "cache_pixels": args.cache,
            "num_workers": args.workers,
            "val_max_records": 64,
            "video": {
                "mode": "segments",
                "segments": args.segments,
                "per_segment": args.per_segment,
                "backend": "pyav",
                "middle_frame": arm == "frame",
            },
        },
        "train": {
            "output_dir": str(args.out / "runs" / arm),
            "stage": "sft",
            "train_experts": True,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "warmup_steps": min(args.warmup, max(1, args.steps // 10)),
            "max_steps": args.steps,
            "eval_every": args.steps,
            "save_every": args.steps,
            "log_every": max(1, min(25, args.steps)),
            "seed": args.seed,
            "threads": args.threads,
            **({"mixed_precision": "no"} if args.cpu else {}),
        },
    }


def run_arm(args: argparse.Namespace) -> None:
    """Child: train one arm, evaluate it on the test split, write ``results/<arm>.json``."""
    from mm.config import config_from_dict
    from mm.evaluate import evaluate_file
    from mm.inference import Engine
    from mm.train import train

    arm = args.arm
    start = time.perf_counter()
    export = train(config_from_dict(run_spec(args, arm)), overwrite=True, progress=False)
    train_minutes = (time.perf_counter() - start) / 60
    engine = Engine.load(export, device="cpu" if args.cpu else None, max_batch=args.eval_batch)
    metrics, rows, _ = evaluate_file(
        engine,
        args.out / "data" / "test.json",
        limit=args.eval_records or None,
        batch_size=args.eval_batch,
        progress=False,
    )
    result = {
        "arm": arm,
        "train_minutes": round(train_minutes, 2),
        "tokens_per_video": engine.processor.tokens_per_video,
        "frames_per_video": engine.processor.video.frames_per_video,
        "middle_frame": engine.processor.video.middle_frame,
        "metrics": metrics,
    }
    out = args.out / "results" / f"{arm}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    (args.out / "results" / f"{arm}_predictions.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows)
    )


def compare(results: dict[str, dict]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (type, video, frame, difference in points) and the issue's targets, met or not."""
    by_type = {arm: results[arm]["metrics"].get("video_by_type", {}) for arm in results}
    rows = []
    for kind in TYPES:
        video, frame = by_type.get("video", {}).get(kind), by_type.get("frame", {}).get(kind)
        diff = None if video is None or frame is None else round(100 * (video - frame), 1)
        rows.append({"type": kind, "video": video, "frame": frame, "diff_points": diff})
    overall = {arm: results[arm]["metrics"].get("video_exact_match") for arm in results}
    rows.append(
        {
            "type": "all",
            "video": overall.get("video"),
            "frame": overall.get("frame"),
            "diff_points": None
            if None in (overall.get("video"), overall.get("frame"))
            else round(100 * (overall["video"] - overall["frame"]), 1),
        }
    )
    targets = {}
    for row in rows:
        if row["diff_points"] is None:
            continue
        if row["type"] in TARGETS:
            targets[row["type"]] = {
                "need": f">= +{100 * TARGETS[row['type']]:g}",
                "met": row["diff_points"] >= 100 * TARGETS[row["type"]],
            }
        if row["type"] in SAME:
            targets[row["type"]] = {
                "need": f"within {100 * SAME[row['type']]:g}",
                "met": abs(row["diff_points"]) <= 100 * SAME[row["type"]],
            }
    return rows, targets


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [r for r in rows if r["video"] is not None and r["frame"] is not None]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    xs = range(len(kinds))
    ax.bar([x - 0.2 for x in xs], [r["video"] for r in kinds], 0.4, label="video (4 segments)")
    ax.bar([x + 0.2 for x in xs], [r["frame"] for r in kinds], 0.4, label="middle frame")
    ax.set_xticks(list(xs), [r["type"] for r in kinds])
    ax.set_ylim(0, 1)
    ax.set_ylabel("exact match")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("video_accuracy"))
    ap.add_argument(
        "--clips", type=int, default=3000, help="ShapesWorld clips, split 80/10/10 (5 records each)"
    )
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--segments", type=int, default=4, help="temporal segments (model.video.segments)")
    ap.add_argument("--per-segment", type=int, default=4, help="frames sampled per segment")
    ap.add_argument(
        "--spatial-pool", type=int, default=1, help="model.video.spatial_pool (1: 36 tokens a segment)"
    )
    ap.add_argument("--workers", type=int, default=6, help="data loader processes per run (decoding)")
    ap.add_argument("--cache", action="store_true", help="keep decoded frames in memory (small runs)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per run")
    ap.add_argument("--eval-records", type=int, default=0, help="first N test records (0: all)")
    ap.add_argument("--eval-batch", type=int, default=64)
    ap.add_argument("--parallel", type=int, default=2, help="runs at once")
    ap.add_argument("--cpu", action="store_true", help="train and evaluate on the CPU (fp32)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # child processes
    args = ap.parse_args()
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if args.arm:
        return run_arm(args)

    import torch

    from data.shapesworld.video import generate_video

    t0 = time.perf_counter()
    info = generate_video(
        args.out / "data", args.clips, seed=args.seed, frames=16, fps=8, image_size=96, progress=True
    )
    data_minutes = (time.perf_counter() - t0) / 60
    print(f"data: {info['counts']} in {data_minutes:.1f} min", flush=True)
    passthrough = [a for a in sys.argv[1:]]
    t1 = time.perf_counter()
    # each arm in its own process (a fresh Trainer each), --parallel at a time
    jobs = {arm: [*passthrough, "--arm", arm] for arm in ARMS}
    codes = run_jobs(__file__, jobs, args.parallel, args.out / "logs", threads=args.threads)
    results = {
        arm: json.loads((args.out / "results" / f"{arm}.json").read_text())
        for arm in ARMS
        if codes.get(arm) == 0
    }
    rows, targets = compare(results) if len(results) == 2 else ([], {})
    print(f"\n{'type':8} {'video':>7} {'frame':>7} {'diff (points)':>14}")
    for r in rows:
        cells = [f"{r[k]:7.3f}" if r[k] is not None else f"{'-':>7}" for k in ("video", "frame")]
        diff = f"{r['diff_points']:+14.1f}" if r["diff_points"] is not None else f"{'-':>14}"
        print(f"{r['type']:8} {cells[0]} {cells[1]} {diff}")
    print(json.dumps(targets, indent=2))
    device = "cpu" if args.cpu or not torch.cuda.is_available() else torch.cuda.get_device_name()
    summary = {
        "date": datetime.date.today().isoformat(),
        "device": device,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "command": "python bench/video_accuracy.py " + " ".join(sys.argv[1:]),
        "settings": {
            k: v
            for k, v in vars(args).items()
            if k in ("clips", "steps", "batch_size", "lr", "seed", "segments", "per_segment", "spatial_pool")
        },
        "data": {"counts": info["counts"], "chance": info.get("chance"), "minutes": round(data_minutes, 2)},
        "wall_minutes": round((time.perf_counter() - t1) / 60, 2),
        "exit_codes": codes,
        "table": rows,
        "targets": targets,
        "results": results,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
    if args.plot and rows:
        plot(rows, args.plot, f"ShapesWorld video, {args.steps} steps, seed {args.seed}, {device}")
    if any(code != 0 for code in codes.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
