"""Shared set-up of the quickstart step benchmarks (`train_step.py`, `cpu_step_variants.py`)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from data.schema import load_llava_json  # noqa: E402
from data.shapesworld import generate  # noqa: E402
from mm.build import build_tokenizer, build_vlm, make_processor  # noqa: E402
from mm.config import apply_overrides, config_from_dict  # noqa: E402
from mm.quickstart import recipe  # noqa: E402
from mm.train import _corpus  # noqa: E402


def quickstart_model(
    overrides: list[str], data: str | Path | None, n_images: int, tokenizer_records: int | None = None
) -> tuple[Any, Any, list[dict], Path]:
    """The CPU quickstart recipe (with ``overrides``) as a fresh model in train mode and its processor, on a
    ShapesWorld directory (generated with ``n_images`` if it has no train split). The tokenizer is trained on
    the first ``tokenizer_records`` train records (all when None). Returns (model, processor, train records,
    data directory)."""
    data = Path(data) if data else Path(tempfile.mkdtemp()) / "sw"
    if not (data / "train.json").is_file():
        generate(data, n=n_images, seed=0, image_size=96, progress=False)
    spec = apply_overrides(recipe(), list(overrides))
    spec.pop("shapesworld")
    cfg = config_from_dict(spec)
    records = load_llava_json(data / "train.json")
    torch.manual_seed(0)
    tokenizer = build_tokenizer(cfg.model, _corpus(records[:tokenizer_records]))
    model = build_vlm(cfg.model, tokenizer).train()
    return model, make_processor(model, tokenizer, cfg.data), records, data
