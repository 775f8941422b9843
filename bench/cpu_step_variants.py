"""Seconds per quickstart training step on the CPU for numeric variants of the same model and batch.

Same batch (32 ShapesWorld records, split branch layout, 2 length groups), same weights at the start; each
variant changes only how the step computes: ``amp`` (bf16 autocast, the trainer's CPU default), ``fp32``,
``bf16w`` (bf16 weights, no autocast: the cost without per-op casts), ``eager`` (attention as matmul +
softmax instead of the CPU flash kernel), ``cl`` (channels-last CNN), ``compile`` (``eager`` with every
decoder layer under ``torch.compile(dynamic=True)``; the first warm-up step's time, the compile, is reported
as ``first_step_s``). Run one variant per process, pinned:

    OMP_NUM_THREADS=2 taskset -c 2,3 python bench/cpu_step_variants.py amp --json amp.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quickstart_setup import quickstart_model  # noqa: E402

from data.dataset import Collator, ConversationDataset  # noqa: E402
from mm.train import MODEL_INPUTS  # noqa: E402

VARIANTS = ("amp", "fp32", "bf16w", "eager", "cl", "compile")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variant", choices=VARIANTS)
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--batches", type=int, default=1, help="distinct batches timed once each (1: repeat one)")
    args = ap.parse_args()
    n_images = max(400, 40 * (args.batches + args.warmup))
    model, processor, all_records, data = quickstart_model(args.overrides, args.data, n_images)
    distinct = args.batches + args.warmup if args.batches > 1 else 1
    records = all_records[: 32 * distinct]
    if len(records) < 32 * distinct:
        raise SystemExit(f"{data}: {len(records)} train records, --batches needs {32 * distinct}")
    ds = ConversationDataset(records, processor, data, cache_pixels=True, branch_turns=True)
    collate = Collator(processor, split_branches=True, branch_groups=2)
    batches = [collate([ds[i] for i in range(32 * b, 32 * b + 32)]) for b in range(distinct)]
    inputs_list = [{k: v for k, v in b.items() if k in (*MODEL_INPUTS, "pixel_values")} for b in batches]
    v = args.variant
    if v in ("eager", "compile"):
        model.llm.set_attn_implementation("eager")  # as train.attn_implementation does
    if v == "compile":
        layers = model.llm.model.layers
        for i, layer in enumerate(layers):
            layers[i] = torch.compile(layer, dynamic=True)
    if v == "bf16w":
        model.to(torch.bfloat16)
    if v == "cl":
        model.experts.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    amp = v in ("amp", "eager", "cl", "compile")

    def step(inputs) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    warmup = (inputs_list * args.warmup)[: args.warmup]
    timed = inputs_list[args.warmup :] if distinct > 1 else inputs_list * args.iters
    all_times = []
    for inputs in warmup + timed:
        t = time.perf_counter()
        step(inputs)
        all_times.append(time.perf_counter() - t)
    warmup_times, times = all_times[: len(warmup)], all_times[len(warmup) :]
    slots = [
        int(b["input_ids"].numel()) + sum((e - s) * n for s, e, n in b["branch_groups"])
        for b in (batches[args.warmup :] if distinct > 1 else batches)
    ]
    res = {
        "variant": v,
        "overrides": args.overrides,
        "batches": args.batches,
        "median_s": statistics.median(times),
        "mean_s": statistics.mean(times),
        "times": times,
        "first_step_s": warmup_times[0] if warmup_times else None,
        "token_slots_mean": statistics.mean(slots),
        "threads": torch.get_num_threads(),
        "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    print("RESULT", json.dumps(res), flush=True)
    if args.json:
        args.json.write_text(json.dumps(res))


if __name__ == "__main__":
    main()
