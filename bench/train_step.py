"""Seconds per training step of the quickstart VLM for each branch layout, in one run (ratios vs packed).

One step = forward + backward + AdamW on one batch of ShapesWorld records (bf16 autocast where supported),
the same batch for every layout: ``packed`` (one row per record, 4-D segment mask) against ``split`` (prefix
rows + branch rows sharing the prefix's KV cache) with 1-3 length groups. Prints a table, writes JSON.

    python bench/train_step.py --json step.json model.projector.pool=1   # recipe overrides
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from quickstart_setup import quickstart_model  # noqa: E402

from data.dataset import Collator, ConversationDataset  # noqa: E402
from mm.train import MODEL_INPUTS  # noqa: E402

LAYOUTS = {"packed": None, "split-1": 1, "split-2": 2, "split-3": 3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="recipe overrides, e.g. model.projector.pool=1")
    ap.add_argument("--data", default=None, help="a ShapesWorld directory (default: generate 400 images)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    model, processor, records, data = quickstart_model(
        args.overrides, args.data, n_images=400, tokenizer_records=args.batch
    )
    records = records[: args.batch]
    dataset = ConversationDataset(
        records, processor, data, cache_pixels=True, branch_turns=True, progress=False
    )
    samples = [dataset[i] for i in range(len(dataset))]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    amp = torch.bfloat16 if torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX") else None

    rows = []
    for name, groups in LAYOUTS.items():
        batch = Collator(processor, split_branches=groups is not None, branch_groups=groups or 1)(samples)
        inputs = {k: v for k, v in batch.items() if k in (*MODEL_INPUTS, "pixel_values")}

        def step(inputs=inputs) -> float:
            with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
                loss = model(**inputs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return float(loss.detach())

        for _ in range(args.warmup):
            step()
        start = time.perf_counter()
        for _ in range(args.iters):
            step()
        seconds = (time.perf_counter() - start) / args.iters
        slots = batch["input_ids"].numel()
        if "branch_input_ids" in batch:
            slots += sum((end - first) * length for first, end, length in batch["branch_groups"])
        rows.append({"layout": name, "step_s": seconds, "token_slots": slots})
    base = rows[0]["step_s"]
    print(f"{'layout':10} {'step s':>8} {'token slots':>12} {'speed-up':>9}")
    for r in rows:
        r["speedup_vs_packed"] = base / r["step_s"]
        print(f"{r['layout']:10} {r['step_s']:8.3f} {r['token_slots']:12d} {r['speedup_vs_packed']:8.2f}x")
    if args.json:
        env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor()}
        result = {"overrides": args.overrides, "batch": args.batch, "env": env, "rows": rows}
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
