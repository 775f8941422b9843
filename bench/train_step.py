"""Seconds per training step of the quickstart VLM: branched records against their single-turn rows.

One step = forward + backward + AdamW on one batch of ShapesWorld training records (bf16 autocast where the
CPU or GPU has it). The baseline trains every question of the batch as its own single-turn row (the function
branched training stands for: same loss, same gradients, tested); ``branched-G`` runs each record's image
prefix once and its questions as short rows on the prefix's KV cache, in G length groups. Both attention
kernels the trainer offers are timed. Prints a table with ratios against the baseline; writes JSON.

    python bench/train_step.py --json step.json                      # the CPU quickstart recipe
    python bench/train_step.py --device cuda model.projector.pool=1  # recipe overrides (quickstart_full)
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from data.dataset import Collator, ConversationDataset  # noqa: E402
from data.media import MediaPaths  # noqa: E402
from data.schema import load_llava_json  # noqa: E402
from data.shapesworld import generate  # noqa: E402
from mm.build import build_tokenizer, build_vlm, make_processor  # noqa: E402
from mm.config import apply_overrides, config_from_dict  # noqa: E402
from mm.quickstart import recipe  # noqa: E402
from mm.train import _corpus, _to_device  # noqa: E402


def single_turn_records(records: list[dict]) -> list[dict]:
    """Every (question, answer) of multi-turn one-image records as its own single-turn record."""
    out = []
    for rec in records:
        conv = rec["conversations"]
        for k in range(len(conv) // 2):
            question = conv[2 * k]["value"].removeprefix("<image>\n")
            turns = [{"from": "human", "value": "<image>\n" + question}, conv[2 * k + 1]]
            out.append({**rec, "id": f"{rec['id']}-{k}", "conversations": turns})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="recipe overrides, e.g. model.projector.pool=1")
    ap.add_argument("--data", default=None, help="a ShapesWorld directory (default: generate 64 images)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=32, help="records per step")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    data = Path(args.data) if args.data else Path(tempfile.mkdtemp()) / "sw"
    if not (data / "train.json").is_file():
        generate(data, n=max(64, args.batch * 5 // 4), seed=0, image_size=96, progress=False)
    spec = apply_overrides(recipe(), list(args.overrides))
    spec.pop("shapesworld")
    cfg = config_from_dict(spec)
    records = load_llava_json(data / "train.json")[: args.batch]
    device = torch.device(args.device)
    torch.manual_seed(0)
    tokenizer = build_tokenizer(cfg.model, _corpus(records))
    model = build_vlm(cfg.model, tokenizer).to(device).train()
    processor = make_processor(model, tokenizer, cfg.data)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if device.type == "cuda":
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    else:
        amp = torch.bfloat16 if torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX") else None
    media = MediaPaths(data)

    def batch_of(recs: list[dict], branched: bool, groups: int) -> dict:
        dataset = ConversationDataset(
            recs, processor, media, cache_pixels=True, branch_turns=branched, progress=False
        )
        return Collator(processor, branch_groups=groups)([dataset[i] for i in range(len(dataset))])

    layouts = {
        "single-turn rows": batch_of(single_turn_records(records), False, 1),
        **{f"branched-{g}": batch_of(records, True, g) for g in (1, 2, 3)},
    }
    rows = []
    for attention in ("sdpa", "eager"):
        model.llm.set_attn_implementation(attention)
        for name, batch in layouts.items():
            inputs = _to_device(batch, device)

            def step(inputs=inputs) -> None:
                with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    loss = model(**inputs).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            for _ in range(args.warmup):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.iters):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            slots = batch["input_ids"].numel()
            if "branches" in batch:
                slots += sum((end - first) * length for first, end, length in batch["branches"].groups)
            seconds = (time.perf_counter() - start) / args.iters
            rows.append({"attention": attention, "layout": name, "step_s": seconds, "token_slots": slots})
    base = rows[0]["step_s"]  # single-turn rows, sdpa: what training without branches costs
    print(f"{'attention':9} {'layout':17} {'step s':>8} {'token slots':>12} {'speed-up':>9}")
    for r in rows:
        r["speedup_vs_single_turn_sdpa"] = base / r["step_s"]
        print(
            f"{r['attention']:9} {r['layout']:17} {r['step_s']:8.3f} {r['token_slots']:12d} "
            f"{r['speedup_vs_single_turn_sdpa']:8.2f}x"
        )
    if args.json:
        env = {
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
            "threads": torch.get_num_threads(),
            "date": datetime.date.today().isoformat(),
            "autocast": str(amp),
        }
        result = {"overrides": args.overrides, "records": len(records), "env": env, "rows": rows}
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
