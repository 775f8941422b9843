"""Sweep quickstart variants (same data, fixed step budgets) to see what reaches the targets.

Runs ``mm quickstart`` for each variant given as ``NAME:override;override;...`` and writes a table + JSON.
Used on a lent GPU to explore learning dynamics quickly: the same steps and batch give the same
learning curve on the CPU, only slower. Example:
    python bench/quickstart_sweep.py --out /tmp/sweep --steps 500 base: \
        'lr2e3:train.lr=2e-3;train.warmup_steps=100'
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mm.quickstart import run_quickstart

KEYS = (
    "qa_exact_match",
    "caption_object_recall",
    "grounding_acc@0.5",
    "grounding_miou",
    "describe_exact_match",
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("variants", nargs="+", help="NAME:override;override (prefix 'blind-' for a blind run)")
    args = ap.parse_args()
    out = Path(args.out)
    results = {}
    for variant in args.variants:
        name, _, rest = variant.partition(":")
        overrides = [o for o in rest.split(";") if o]
        t = time.perf_counter()
        path = run_quickstart(
            out / name,
            steps=args.steps,
            n=args.n,
            blind=name.startswith("blind"),
            overrides=overrides,
            progress=False,
        )
        m = json.loads(path.read_text())
        m["wall_s"] = round(time.perf_counter() - t, 1)
        results[name] = {"overrides": overrides, **m}
        print(name, {k: round(m[k], 3) for k in KEYS}, m["qa_by_type"], f"{m['wall_s']}s", flush=True)
    (out / "sweep.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
