"""Images/s of `mm caption` batch runs at several batch sizes on the same inputs, in one run: the quickstart
model (mm/recipes/quickstart.yaml; random init by default, or --model DIR) captions the same ShapesWorld
images once per batch size, each into a fresh results file through ``mm.batch.run_batch`` (the code path of
`mm caption`: decode the next batch while this one generates, one padded generate, append + fsync). Prints
a table with the ratio to the first batch size (best of --repeats interleaved rounds); writes JSON.

    python bench/batch_throughput.py --json bench/results/batch_throughput_cpu.json   # ~2-3 min on 2 cores

A random-init model seldom says EOS, so nearly every image gets the full --max-new-tokens: every batch size
does the same work (new tokens are reported), which is what a throughput comparison needs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from data.shapesworld import generate  # noqa: E402
from mm.batch import BatchOptions, read_inputs, read_rows, run_batch  # noqa: E402
from mm.inference import Engine  # noqa: E402


def quickstart_model(out: Path, data_dir: Path, seed: int) -> Path:
    """The quickstart recipe's model, random weights, its tokenizer trained on the ShapesWorld text."""
    from data.schema import load_llava_json
    from mm.build import build_tokenizer, build_vlm, make_processor, save_vlm
    from mm.config import config_from_dict
    from mm.quickstart import recipe
    from mm.train import _corpus

    spec = recipe("quickstart")
    spec.pop("shapesworld")
    cfg = config_from_dict(spec)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(cfg.model, _corpus(load_llava_json(data_dir / "train.json")))
    model = build_vlm(cfg.model, tokenizer).eval()
    return save_vlm(model, make_processor(model, tokenizer, cfg.data), out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--images", type=int, default=32, help="ShapesWorld images captioned per batch size")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--model", type=Path, default=None, help="a model directory (default: random quickstart)")
    ap.add_argument(
        "--work", type=Path, default=None, help="where data, model and results go (default: temp)"
    )
    ap.add_argument("--repeats", type=int, default=2, help="rounds over the batch sizes; the best is kept")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="batch_throughput_"))
    data_dir = work / "sw"
    generate(data_dir, n=round(args.images / 0.8) + 2, seed=args.seed, progress=False)
    folder = data_dir / "images" / "train"
    items = read_inputs([folder], "caption")[: args.images]
    model_dir = args.model or quickstart_model(work / "model", data_dir, args.seed)
    engine = Engine.load(model_dir, max_batch=max(args.batch_sizes))
    warm = BatchOptions(
        "caption", model_dir, work / "warmup.jsonl", batch_size=2, max_new_tokens=4, progress=False
    )
    run_batch(items[:2], warm, engine=engine, say=lambda _: None)  # first-call costs out of the timings

    load_before = os.getloadavg()  # other work on the machine: the rounds' spread shows how much it hurt
    times: dict[int, list[float]] = {bs: [] for bs in args.batch_sizes}
    cpu: dict[int, list[float]] = {bs: [] for bs in args.batch_sizes}
    tokens: dict[int, int] = {}
    for _ in range(args.repeats):  # rounds interleave the batch sizes: load from elsewhere hits them alike
        for batch_size in args.batch_sizes:
            out = work / f"bs{batch_size}.jsonl"
            out.unlink(missing_ok=True)
            opts = BatchOptions(
                "caption",
                model_dir,
                out,
                batch_size=batch_size,
                max_new_tokens=args.max_new_tokens,
                progress=False,
            )
            cpu_start = time.process_time()  # CPU seconds of this process: less hurt by other work than wall
            summary = run_batch(items, opts, engine=engine, say=lambda _: None)
            cpu[batch_size].append(round(time.process_time() - cpu_start, 3))
            rows = read_rows(out)
            assert len(rows) == len(items) and not any("error" in r for r in rows)
            times[batch_size].append(round(summary.seconds, 3))
            tokens[batch_size] = sum(r["new_tokens"] for r in rows)
    runs = []
    for batch_size in args.batch_sizes:
        best = min(times[batch_size])  # the least disturbed round
        runs.append(
            {
                "batch_size": batch_size,
                "images": len(items),
                "seconds": best,
                "seconds_all": times[batch_size],
                "images_per_s": round(len(items) / best, 3),
                "new_tokens": tokens[batch_size],
                "new_tokens_per_s": round(tokens[batch_size] / best, 1),
                "cpu_seconds": min(cpu[batch_size]),
                "cpu_seconds_all": cpu[batch_size],
                "images_per_cpu_s": round(len(items) / min(cpu[batch_size]), 3),
            }
        )
    base = runs[0]["images_per_s"]
    for run in runs:
        run["ratio"] = round(run["images_per_s"] / base, 2)
    print(
        f"{'batch':>5} {'images':>6} {'seconds':>8} {'images/s':>9} {'ratio':>6} {'new tok':>8} {'tok/s':>7} "
        f"{'cpu s':>7} {'img/cpu-s':>9}"
    )
    for r in runs:
        print(
            f"{r['batch_size']:>5} {r['images']:>6} {r['seconds']:>8.2f} {r['images_per_s']:>9.2f} "
            f"{r['ratio']:>5.2f}x {r['new_tokens']:>8} {r['new_tokens_per_s']:>7.1f} "
            f"{r['cpu_seconds']:>7.2f} {r['images_per_cpu_s']:>9.2f}"
        )
    if args.json:
        env = {
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "device": str(engine.device),
            "cpus": os.cpu_count(),
            "load_average_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        }
        result = {
            "bench": "batch_throughput",
            "date": datetime.date.today().isoformat(),
            "model": str(args.model) if args.model else "quickstart recipe, random init",
            "task": "caption",
            "images": len(items),
            "max_new_tokens": args.max_new_tokens,
            "repeats": args.repeats,
            "env": env,
            "runs": runs,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
