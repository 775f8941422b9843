"""Aten ops per training step (forward + backward) of each backbone: a deterministic, CPU-only proxy for the
per-op launch overhead that bounds small-resolution GPU training (see BENCHMARKS.md, issue 3).

Counts every aten op dispatched during ``loss.backward()`` of one step (batch 2, optionally under bf16
autocast), split into views/metadata ops and ops that do work (each launches at least one kernel on a GPU).
Prints a table with ratios against Swin-T and writes JSON.

    python bench/op_count.py --amp --json ops.json
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import timm  # noqa: E402

import vision  # noqa: E402,F401  (registers our backbones with timm)

MODELS = ["cswin_tiny_224", "biformer_tiny", "sgformer_s", "swin_tiny_patch4_window7_224"]
VIEW_OPS = {
    "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "unsqueeze", "squeeze",
    "select", "slice", "split", "split_with_sizes", "unbind", "detach", "as_strided", "alias", "unflatten",
    "flatten", "narrow", "chunk", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
    "lift_fresh", "_reshape_alias", "view_as",
}  # fmt: skip


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count(name: str, size: int, amp: bool) -> collections.Counter[str]:
    torch.manual_seed(0)
    model = timm.create_model(name).train()
    x = torch.randn(2, 3, size, size)
    target = torch.tensor([1, 2])

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(x).float(), target)
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm caches (index tables, plans) as a real training run would
    counter = OpCounter()
    with counter:
        step()
    return counter.counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (counts the weight casts too)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.models.split(","):
        counts = count(name, args.size, args.amp)
        work = sum(n for op, n in counts.items() if op not in VIEW_OPS)
        rows.append({"model": name, "ops": sum(counts.values()), "work_ops": work, "by_op": dict(counts)})
    base = next((r for r in rows if r["model"].startswith("swin_tiny")), rows[-1])
    print(f"{'model':32} {'all ops':>8} {'work ops':>9} {'work / Swin-T':>14}")
    for r in rows:
        r["work_ratio_vs_swin_t"] = r["work_ops"] / base["work_ops"]
        print(f"{r['model']:32} {r['ops']:8d} {r['work_ops']:9d} {r['work_ratio_vs_swin_t']:13.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "amp": args.amp, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
