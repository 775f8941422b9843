"""Diagnostic runs of the quickstart design, one variant per process (used on a lent GPU, several at once).

    python bench/quickstart_probe.py --steps 2500 --n 20000 OUT NAME PATCHES [override ...]

PATCHES (comma list, or ``none``) change the model for a diagnosis only, never for a real run:
- ``oracle``: the expert is replaced by per-cell ground-truth features (colour / shape / size one-hots and box
  edges from ``meta.objects`` on the 12x12 grid), answering "would perfect vision make the LLM learn faster?";
- ``freeze``: freeze the expert after dense pretraining (``train.expert_pretrain_steps``).
Overrides are ``mm quickstart`` config overrides. Prints one RESULT line; metrics.json gets the setup.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("name")
ap.add_argument("patches")
ap.add_argument("overrides", nargs="*")
ap.add_argument("--steps", type=int, default=600)
ap.add_argument("--n", type=int, default=None)
args = ap.parse_args()
patches = set(args.patches.split(",")) - {"none"}
out = Path(args.out)

if "oracle" in patches:
    from data.media import load_image
    from data.shapesworld import COLOURS, SHAPES, SIZES
    from mm.expert_pretrain import cell_targets
    from vision.experts import VisualExpert

    VOCAB = {"colour": sorted(COLOURS), "shape": sorted(SHAPES), "size": sorted(SIZES)}
    NC, NS, NZ = len(COLOURS) + 1, len(SHAPES) + 1, len(SIZES) + 1
    CH = NC + NS + NZ + 4
    table: dict[str, torch.Tensor] = {}

    def _key(im):
        return hashlib.md5(np.asarray(im.convert("RGB")).tobytes()).hexdigest()

    def _build():
        data = out / args.name / "data"
        for split in ("train", "val", "test"):
            for rec in json.loads((data / f"{split}.json").read_text()):
                objs = rec["meta"]["objects"]
                im = load_image(data / rec["image"])
                key = _key(im)
                if key in table:
                    continue
                cls, edges = cell_targets(objs, im.size, (12, 12), VOCAB)
                feats = [
                    torch.nn.functional.one_hot(cls[0], NC),
                    torch.nn.functional.one_hot(cls[1], NS),
                    torch.nn.functional.one_hot(cls[2], NZ),
                ]
                f = torch.cat(feats, -1).permute(2, 0, 1).float()
                table[key] = torch.cat([f, edges * 4], 0)
        print("oracle table", len(table), VOCAB, flush=True)

    orig_init = VisualExpert.__init__

    def _init(self, cfg):
        orig_init(self, cfg)
        self.out_dim = CH

    def _pre(self, images):
        if not table:
            _build()
        return torch.stack([table[_key(im)] for im in images])

    def _fwd(self, x):
        return x.float().flatten(2).transpose(1, 2)

    VisualExpert.__init__ = _init
    VisualExpert.preprocess = _pre
    VisualExpert.forward = _fwd

if "freeze" in patches:
    import mm.train as MT

    orig_pre = MT.Trainer._pretrain_experts

    def _pre_and_freeze(self, model, records, base_dir):
        orig_pre(self, model, records, base_dir)
        for expert in model.experts.values():
            expert.cfg.frozen = True
            expert.requires_grad_(False)
            expert.eval()
        print("experts frozen after dense pretraining", flush=True)

    MT.Trainer._pretrain_experts = _pre_and_freeze

from mm.quickstart import run_quickstart  # noqa: E402

t = time.perf_counter()
path = run_quickstart(
    out / args.name,
    steps=args.steps,
    n=args.n,
    blind=args.name.startswith("blind"),
    overrides=args.overrides,
    progress=False,
)
m = json.loads(path.read_text())
m["wall_s"] = round(time.perf_counter() - t, 1)
m["patches"], m["overrides"], m["steps"] = sorted(patches), args.overrides, args.steps
path.write_text(json.dumps(m, indent=2))
keys = ("qa_exact_match", "caption_object_recall", "grounding_acc@0.5", "grounding_miou")
keys += ("describe_exact_match",)
by_type = {k: round(v, 2) for k, v in m["qa_by_type"].items()}
print("RESULT", args.name, {k: round(m[k], 3) for k in keys}, by_type, f"{m['wall_s']}s", flush=True)
