"""V2PE against plain positions on long multi-image ShapesWorld: accuracy vs the number of images K, far past
the trained window. Two models on the same data, steps and seed: ``plain`` (delta 1) and ``v2pe`` (each
training image draws delta from {1, 1/2, ..., 1/256}); each is evaluated at every K and delta.

    python bench/v2pe_length.py --out v2pe --steps 7000 --json v2pe.json --plot v2pe.png
    python bench/v2pe_length.py --out v2pe --steps 5 --pool 200 --eval-pool 200 --train-records 200 \
        --eval-records 8 --retrieve-records 8   # smoke

Training sees K <= 8 images (36 visual tokens each, ~400 positions); evaluation goes to K = 64 (~2500
positions at delta 1). Trainings run as two concurrent processes, evaluations ``--parallel`` at a time.

The headline is ``retrieve`` (a test set of that type only): its answer is a colour whatever K is, so its
accuracy far past the window measures the positions. The other types' answers are image numbers or counts,
which past K = 8 were never seen in training; they are reported per type, not used for the targets. The
targets compare the V2PE model at the largest delta that keeps K images in the positions 8 took at
delta 1 (K * delta <= 8) with its own in-window accuracy (K = 8, delta 1) and with the plain model at delta 1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.jobs import run_jobs  # noqa: E402

TRAIN_K = [1, 2, 4, 8]
TEST_K = [1, 2, 4, 8, 16, 32, 64]
DELTAS = [1.0, 0.25, 0.0625, 0.015625]
WINDOW_K = 8  # the largest K trained
LONG_K = (32, 64)  # 4x and 8x the trained window: where the targets are checked
LLMS = {  # the quickstart's LLM, and one with the depth and width to route a question to one of K images
    "quickstart": {
        "hidden_size": 192,
        "num_hidden_layers": 3,
        "num_attention_heads": 3,
        "intermediate_size": 576,
    },
    "small": {
        "hidden_size": 384,
        "num_hidden_layers": 6,
        "num_attention_heads": 6,
        "intermediate_size": 1536,
    },
}
MODEL = {
    "llm": {"family": "llama"},
    "tokenizer": {"vocab_size": 1024},
    "experts": [{"name": "main", "model": "resnet10t", "image_size": 96, "feature_index": 2}],
    "projector": {"type": "concat", "depth": 2, "pool": 2, "pos_embed": True},
}


def train_one(args: argparse.Namespace) -> None:
    """Child: train ``plain`` or ``v2pe`` on the multi-image training file."""
    from mm.config import config_from_dict
    from mm.train import train

    data = args.out / "data"
    spec = {
        "model": {
            **json.loads(json.dumps(MODEL)),
            "llm": {**MODEL["llm"], **LLMS[args.llm]},
            "v2pe": args.train == "v2pe",
            "init_from": args.init_from,
        },
        "data": {
            "train": str(data / "multi_train.json"),
            "val": str(data / "multi_val_k8.json"),
            "max_length": 1024,
            "cache_pixels": False,
            "num_workers": 4,
        },
        "train": {
            "output_dir": str(args.out / "runs" / args.train),
            "stage": "sft",
            "train_experts": True,
            "batch_size": args.batch_size,
            "lr": 1e-3,
            "warmup_steps": args.warmup,
            "max_steps": args.steps,
            "eval_every": args.steps,
            "save_every": args.steps,
            "seed": args.seed,
            "threads": 2,
        },
    }
    train(config_from_dict(spec), overwrite=True, progress=False)


def eval_one(args: argparse.Namespace) -> None:
    """Child: one model at one delta on every test K; writes results/<model>_d<delta>.json."""
    from mm.evaluate import evaluate_file
    from mm.inference import Engine

    engine = Engine.load(args.out / "runs" / args.model / "model", visual_delta=args.delta, max_batch=16)
    engine.processor.max_length = None  # the point is to go past the trained length
    rows = {}
    for k in TEST_K:
        metrics, _, _ = evaluate_file(
            engine, args.out / "data" / f"multi_test_k{k}.json", batch_size=16, progress=False
        )
        retrieve, _, _ = evaluate_file(
            engine, args.out / "retrieve" / f"multi_test_k{k}.json", batch_size=16, progress=False
        )
        rows[k] = {
            "retrieve": retrieve.get("multi_exact_match"),
            "accuracy": metrics.get("multi_exact_match"),
            "by_type": metrics.get("multi_by_type", {}),
            "positions": int(k * engine.processor.positions_per_image),
        }
    path = args.out / "results" / f"{args.model}_d{args.delta:g}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": args.model, "delta": args.delta, "by_k": rows}, indent=2))


def plot(results: list[dict[str, Any]], path: Path, title: str, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharey=True, sharex=True)
    for row, (metric, label) in enumerate(
        (("retrieve", "retrieve (answer: a colour)"), ("accuracy", "all types"))
    ):
        for ax, name in zip(axes[row], ("plain", "v2pe")):
            for r in sorted((r for r in results if r["model"] == name), key=lambda r: -r["delta"]):
                ks = sorted(int(k) for k in r["by_k"])
                ax.plot(
                    ks,
                    [r["by_k"][str(k)][metric] for k in ks],
                    marker="o",
                    label=f"eval delta {r['delta']:g}",
                )
            ax.axvline(WINDOW_K, color="grey", ls=":", lw=1)
            ax.text(
                WINDOW_K, 0.02, f" trained K <= {WINDOW_K} (~{window} positions)", fontsize=7, color="grey"
            )
            ax.set_xscale("log", base=2)
            ax.set_title(
                f"{label}; trained with {'random V2PE delta' if name == 'v2pe' else 'delta 1'}", fontsize=9
            )
            ax.legend(fontsize=7)
        axes[row][0].set_ylabel("exact match")
    for ax in axes[1]:
        ax.set_xlabel("images per conversation (K)")
    axes[0][0].set_ylim(0, 1)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def check_targets(results: list[dict[str, Any]]) -> dict[str, Any]:
    """V2PE's claim on ``retrieve``: at 4x and 8x the window (the V2PE model at the largest delta with
    K * delta <= 8, so its K images take no more positions than 8 did at delta 1) it keeps
    >= 90% of its in-window accuracy and beats the plain model (delta 1) by >= 20 points; in window the
    two are within 1 point."""
    acc = {(r["model"], r["delta"]): {int(k): v["retrieve"] for k, v in r["by_k"].items()} for r in results}
    if ("plain", 1.0) not in acc or ("v2pe", 1.0) not in acc:
        return {}
    inside = {m: acc[(m, 1.0)][WINDOW_K] for m in ("plain", "v2pe")}
    out: dict[str, Any] = {
        "in_window": inside,
        "in_window_gap": round(abs(inside["v2pe"] - inside["plain"]), 4),
        "in_window_met": abs(inside["v2pe"] - inside["plain"]) <= 0.01,
    }
    for k in LONG_K:
        delta = max(d for d in DELTAS if k * d <= WINDOW_K)
        v2pe = acc.get(("v2pe", delta), {}).get(k)
        if v2pe is None:
            continue
        plain, plain_same_delta = acc[("plain", 1.0)][k], acc.get(("plain", delta), {}).get(k)
        kept = v2pe / inside["v2pe"] if inside["v2pe"] else 0.0
        out[f"k{k}"] = {
            "v2pe_delta": delta,
            "v2pe": v2pe,
            "plain_delta1": plain,
            "plain_same_delta": plain_same_delta,
            "kept_of_in_window": round(kept, 4),
            "margin_over_plain": round(v2pe - plain, 4),
            "met": kept >= 0.9 and v2pe - plain >= 0.2,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("v2pe_length"))
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--llm", choices=sorted(LLMS), default="quickstart", help="the LLM's size")
    ap.add_argument("--warmup", type=int, default=50, help="warmup steps")
    ap.add_argument("--batch-size", type=int, default=32, help="training batch")
    ap.add_argument("--pool", type=int, default=20000, help="rendered training scenes")
    ap.add_argument("--eval-pool", type=int, default=2000, help="rendered scenes per val / test split")
    ap.add_argument("--train-records", type=int, default=40000)
    ap.add_argument("--eval-records", type=int, default=150, help="records per K, all types")
    ap.add_argument("--retrieve-records", type=int, default=300, help="records per K, retrieve only")
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument(
        "--init-from", default=None, help="a model directory both arms start from (e.g. a quickstart)"
    )
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--train", choices=("plain", "v2pe"), help=argparse.SUPPRESS)  # child processes
    ap.add_argument("--model", choices=("plain", "v2pe"), help=argparse.SUPPRESS)
    ap.add_argument("--delta", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.train:
        return train_one(args)
    if args.model:
        return eval_one(args)

    import torch

    from data.shapesworld.multi import generate_multi

    t0 = time.perf_counter()
    generate_multi(
        args.out / "data",
        k={"train": TRAIN_K, "val": [8], "test": TEST_K},
        records={"train": args.train_records, "val": 64, "test": args.eval_records},
        pool={"train": args.pool, "val": args.eval_pool, "test": args.eval_pool},
        seed=args.seed,
        progress=False,
    )
    generate_multi(
        args.out / "retrieve",
        k={"test": TEST_K},
        records={"test": args.retrieve_records},
        pool=args.eval_pool,
        seed=args.seed,
        types=["retrieve"],
        progress=False,
    )
    print(f"data in {time.perf_counter() - t0:.0f} s", flush=True)
    common = ["--out", str(args.out), "--steps", str(args.steps), "--seed", str(args.seed), "--llm", args.llm]
    common += ["--warmup", str(args.warmup), "--batch-size", str(args.batch_size)]
    common += ["--init-from", args.init_from] if args.init_from else []
    t1 = time.perf_counter()
    logs = args.out / "logs"
    codes = run_jobs(__file__, {f"train_{m}": ["--train", m, *common] for m in ("plain", "v2pe")}, 2, logs)
    train_minutes = (time.perf_counter() - t1) / 60
    evals = {
        f"eval_{m}_d{d:g}": ["--model", m, "--delta", str(d), *common]
        for m in ("plain", "v2pe")
        if codes[f"train_{m}"] == 0
        for d in DELTAS
    }
    run_jobs(__file__, evals, args.parallel, logs)
    results = [json.loads(p.read_text()) for p in sorted((args.out / "results").glob("*.json"))]
    window = next((r["by_k"][str(WINDOW_K)]["positions"] for r in results if r["delta"] == 1.0), 0)
    for metric in ("retrieve", "accuracy"):
        print(f"\n{metric}:\n{'model':6} {'delta':>8} " + " ".join(f"{'K=' + str(k):>6}" for k in TEST_K))
        for r in results:
            print(
                f"{r['model']:6} {r['delta']:8.4g} "
                + " ".join(f"{r['by_k'][str(k)][metric]:6.3f}" for k in TEST_K)
            )
    targets = check_targets(results)
    print(json.dumps(targets, indent=2))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    summary = {
        "date": datetime.date.today().isoformat(),
        "device": device,
        "torch": torch.__version__,
        "settings": {
            **{
                k: v
                for k, v in vars(args).items()
                if k
                in (
                    "steps",
                    "seed",
                    "llm",
                    "warmup",
                    "pool",
                    "eval_pool",
                    "train_records",
                    "eval_records",
                    "retrieve_records",
                )
            },
            "train_k": TRAIN_K,
            "test_k": TEST_K,
            "deltas": DELTAS,
        },
        "train_minutes": round(train_minutes, 2),
        "window_positions_k8": window,
        "targets": targets,
        "results": results,
    }
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    if args.plot and results:
        plot(
            results,
            args.plot,
            f"Long multi-image ShapesWorld, {args.llm} LLM, {args.steps} steps, seed {args.seed}, {device}",
            window,
        )


if __name__ == "__main__":
    main()
