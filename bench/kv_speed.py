"""KV-cache compression: decode speed, KV memory and the prefill cost of scoring, against context length.

A random-init Qwen2-shaped LLM (Qwen2-1.5B's layers: d=1536, 28 layers, 12 heads, 2 KV heads) inside our VLM,
prompts made mostly of images (144 visual tokens each) up to 4K / 16K / 32K tokens, batch 1 and 8; the full
cache against every method at a 20% budget, in one run (ratios, not absolute numbers, carry over).

    python bench/kv_speed.py --json kv_speed.json                                  # GPU
    python bench/kv_speed.py --lengths 512 --batches 1 --layers 2 --hidden 128 --new 8   # CPU smoke

Every cell runs ``--repeats`` times and reports the last: on a GPU the first decode at a new cache size pays
the caching allocator's growth, which made the first methods of each length look slower in the first run.
Per cell: prefill seconds (to the first new token, scoring and compression included), decode tokens/s per
row (one over the median decode step), KV bytes per row after compression, peak GPU memory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
from PIL import Image  # noqa: E402

METHODS = ["full", "lookm", "h2o", "snapkv", "streaming", "random"]
TOKENS_PER_IMAGE = 144


def build(args: argparse.Namespace):
    from mm.build import build_tokenizer, build_vlm, make_processor
    from mm.config import ModelConfig, build

    llm = {
        "family": "qwen2",
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "intermediate_size": args.hidden * 35 // 6,
        "max_position_embeddings": 65536,
    }
    section = build(
        ModelConfig,
        {
            "llm": llm,
            "tokenizer": {"vocab_size": 512},
            "experts": [{"name": "main", "model": "resnet10t", "image_size": 96, "feature_index": 2}],
            "projector": {"type": "concat", "pool": 1},
        },
        "model",
    )
    corpus = ["Image 1: what colour is the star? the red circle is left of a blue square."] * 50
    torch.manual_seed(0)
    tok = build_tokenizer(section, corpus)
    model = build_vlm(section, tok).eval()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = model.to(device=device, dtype=dtype)
    processor = make_processor(model, tok)
    processor.max_length = None
    return model, processor, device


def requests(length: int, batch: int, kv, new: int):
    from mm.generation import GenerationSettings
    from mm.inference import Request

    k = max(1, (length - 16) // (TOKENS_PER_IMAGE + 6))
    text = " ".join(f"Image {i + 1}: <image>" for i in range(k)) + " What colour is the star?"
    images = [Image.new("RGB", (96, 96), (30 * (i % 8), 90, 200 - 20 * (i % 8))) for i in range(k)]
    return [
        Request([{"from": "human", "value": text}], images, GenerationSettings(max_new_tokens=new, kv=kv))
        for _ in range(batch)
    ]


def run_cell(
    engine, length: int, batch: int, method: str, budget: float, new: int, device, queries: int | None = None
) -> dict:
    from mm.kv_cache import KVCompression

    kv = None if method == "full" else KVCompression(method, budget, queries=queries)
    reqs = requests(length, batch, kv, new)
    prepared = engine._batch(reqs)
    stamps: list[float] = []
    stats: dict = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def on_step(tokens, finished):
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    start = time.perf_counter()
    with torch.inference_mode():
        engine.model.generate(
            **prepared, settings=[r.settings for r in reqs], on_step=on_step, stats=stats, eos_token_id=-1
        )
    prefill = stamps[0] - start
    # per row: one over the median step (a host hiccup in one step of a short run moved the mean by 30%)
    steps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    decode = 1 / steps[len(steps) // 2] if steps else 0.0
    mean = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if steps else 0.0
    per_entry = stats["kv_bytes_per_entry"]
    return {
        "length": int(prepared["attention_mask"].shape[1]),
        "batch": batch,
        "method": method,
        "budget": 1.0 if method == "full" else budget,
        "prefill_s": round(prefill, 4),
        "decode_tok_s_per_row": round(decode, 2),
        "decode_tok_s_per_row_mean": round(mean, 2),
        "kv_bytes_per_row": per_entry * stats["kv_entries_after"][0],
        "kv_bytes_prompt_per_row": per_entry * stats["kv_entries_before"][0],
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--repeats", type=int, default=2, help="runs per cell; the last one is reported")
    ap.add_argument("--new", type=int, default=64, help="new tokens per row")
    ap.add_argument("--queries", type=int, default=None, help="LOOK-M / H2O score with this many queries")
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from mm.inference import Engine

    model, processor, device = build(args)
    engine = Engine(model, processor, max_batch=max(args.batches))
    params = sum(p.numel() for p in model.llm.parameters()) / 1e9
    run_cell(engine, min(args.lengths), 1, "lookm", args.budget, 4, device)  # warm-up
    rows = []
    head = [
        "len",
        "B",
        "method",
        "prefill s",
        "dec tok/s",
        "x full",
        "KV MiB/row",
        "KV cut",
        "prefill x",
        "peak GiB",
    ]
    print(" ".join(f"{h:>9}" for h in head))
    for length in args.lengths:
        for batch in args.batches:
            base = None
            for method in ["full", *[m for m in args.methods if m != "full"]]:
                try:
                    # the last of --repeats runs: the first run of a cache size pays the allocator's growth
                    # (on the H100, 72 vs 18 ms per decode step for the first method at a size)
                    for _ in range(args.repeats):
                        row = run_cell(
                            engine, length, batch, method, args.budget, args.new, device, args.queries
                        )
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    print(f"{length:>9} {batch:>9} {method:>9} out of memory", flush=True)
                    rows.append({"length": length, "batch": batch, "method": method, "oom": True})
                    continue
                base = row if method == "full" else base
                if base:
                    row["decode_x_full"] = round(
                        row["decode_tok_s_per_row"] / base["decode_tok_s_per_row"], 3
                    )
                    row["kv_cut"] = round(1 - row["kv_bytes_per_row"] / base["kv_bytes_per_row"], 4)
                    row["prefill_x_full"] = round(row["prefill_s"] / base["prefill_s"], 3)
                rows.append(row)
                cells = [
                    f"{row['length']}",
                    f"{batch}",
                    method,
                    f"{row['prefill_s']:.3f}",
                    f"{row['decode_tok_s_per_row']:.1f}",
                    f"{row.get('decode_x_full', 0):.2f}",
                    f"{row['kv_bytes_per_row'] / 2**20:.1f}",
                    f"{row.get('kv_cut', 0):.1%}",
                    f"{row.get('prefill_x_full', 0):.2f}",
                    f"{row['peak_gib'] or 0:.2f}",
                ]
                print(" ".join(f"{c:>9}" for c in cells), flush=True)
                save(args, device, params, rows)  # after every cell: a run cut short keeps what it measured


def save(args: argparse.Namespace, device: torch.device, params: float, rows: list[dict]) -> None:
    if not args.json:
        return
    summary = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "llm_params_b": round(params, 3),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "rows": rows,
    }
    args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
