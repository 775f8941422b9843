"""The README's main job and its no-vision baseline in one run: `mm quickstart`, then the same with every
image black (`--blind`), on the same data. Prints each metric with the sighted / blind ratio; writes JSON.

    python bench/quickstart.py --out qs --json quickstart.json                 # the CPU recipe (~2 x 12 min)
    python bench/quickstart.py --out qs --recipe quickstart_full --json full.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mm.quickstart import run_quickstart  # noqa: E402

HEADLINE = (
    "qa_exact_match",
    "caption_object_recall",
    "grounding_acc@0.5",
    "grounding_miou",
    "describe_exact_match",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="config overrides, as for mm quickstart")
    ap.add_argument("--out", type=Path, default=Path("quickstart"))
    ap.add_argument("--recipe", default="quickstart")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()

    runs = {}
    for blind in (False, True):
        start = time.perf_counter()
        path = run_quickstart(
            args.out, blind=blind, overrides=args.overrides, recipe_name=args.recipe, progress=not args.quiet
        )
        runs["blind" if blind else "sighted"] = {
            **json.loads(path.read_text()),
            "wall_minutes": round((time.perf_counter() - start) / 60, 2),
        }
    sighted, blind = runs["sighted"], runs["blind"]
    print(f"{'metric':24} {'sighted':>8} {'blind':>8} {'ratio':>7}")
    for key in HEADLINE:
        if key in sighted and key in blind:
            ratio = f"{sighted[key] / blind[key]:6.2f}x" if blind[key] else "      -"  # no ratio to a zero
            print(f"{key:24} {sighted[key]:8.3f} {blind[key]:8.3f} {ratio}")
    print(f"{'train minutes':24} {sighted['train_minutes']:8.2f} {blind['train_minutes']:8.2f}")
    if args.json:
        env = {"torch": torch.__version__, "cpu": platform.processor(), "threads": torch.get_num_threads()}
        result = {
            "recipe": args.recipe,
            "overrides": args.overrides,
            "date": datetime.date.today().isoformat(),
        }
        args.json.write_text(json.dumps({**result, "env": env, **runs}, indent=2))


if __name__ == "__main__":
    main()
