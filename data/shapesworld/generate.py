"""Writing ShapesWorld to disk: PNG images plus LLaVA JSON splits, reproducible per image from a seed."""

from __future__ import annotations

import io
import json
import math
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from data.boxes import DEFAULT_BOX_FORMAT, BoxFormat
from data.schema import save_llava_json, write_bytes_atomic, write_json_atomic

from .scene import COLOURS, SHAPES, SIZES, WORDS, Scene, sample_scene
from .tasks import box_format_meta, eval_records, make_tasks, train_record

SPLITS = ("train", "val", "test")
INFO_FILE = "shapesworld.json"


def scene_rng(seed: int, split: str, index: int) -> random.Random:
    """The RNG of one image: depends on (seed, split, index) only, never on the dataset size."""
    return random.Random(f"shapesworld/{seed}/{split}/{index}")


def split_sizes(n: int, splits: Sequence[float]) -> dict[str, int]:
    """Images per split: fractions of ``n`` rounded by largest remainder, so they always add up to ``n``."""
    if len(splits) != len(SPLITS) or any(f < 0 for f in splits) or abs(sum(splits) - 1.0) > 1e-6:
        raise ValueError(
            f"splits must be 3 non-negative fractions (train, val, test) adding up to 1, got {splits}"
        )
    exact = [n * f for f in splits]
    sizes = [math.floor(v) for v in exact]
    by_remainder = sorted(range(len(exact)), key=lambda k: (-(exact[k] - sizes[k]), k))
    for k in by_remainder[: n - sum(sizes)]:
        sizes[k] += 1
    return dict(zip(SPLITS, sizes))


def png_bytes(image: Image.Image) -> bytes:
    """Lossless PNG; zlib level 1 is twice as fast as the default for ~10% larger files."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def vocabulary() -> dict[str, list[str]]:
    return {"shapes": list(SHAPES), "colours": list(COLOURS), "sizes": list(SIZES), "words": list(WORDS)}


def all_texts(records: Iterable[dict]) -> Iterator[str]:
    """Every conversation string of the records as written (placeholders included), to train a tokenizer."""
    for record in records:
        for turn in record["conversations"]:
            yield turn["value"]


def example(
    seed: int,
    split: str,
    index: int,
    *,
    image_size: int = 96,
    p_text: float = 0.3,
    box_format: BoxFormat = DEFAULT_BOX_FORMAT,
    dense: bool | None = None,
) -> tuple[Scene, list[dict], random.Random]:
    """Scene and tasks of image ``index`` of ``split``; the RNG is returned to continue (e.g. shuffling).

    ``dense`` (default: only for the train split) asks grounding/description for every object."""
    rng = scene_rng(seed, split, index)
    scene = sample_scene(rng, image_size, p_text=p_text)
    dense = split == "train" if dense is None else dense
    return scene, make_tasks(scene, rng, box_format, dense=dense), rng


def generate(
    out_dir: str | Path,
    n: int = 1000,
    seed: int = 0,
    image_size: int = 96,
    splits: Sequence[float] = (0.8, 0.1, 0.1),
    box_format: BoxFormat = DEFAULT_BOX_FORMAT,
    p_text: float = 0.3,
    progress: bool = True,
) -> dict:
    """Write ShapesWorld to ``out_dir``: PNGs under ``images/<split>/``, ``train.json`` (one multi-turn record
    per image), ``val.json`` and ``test.json`` (one record per image and task, scorable by ``meta``) and
    ``shapesworld.json`` (settings and counts, also returned; written last, so it marks a complete set)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out_dir = Path(out_dir)
    sizes = split_sizes(n, splits)
    counts = {}
    with tqdm(total=n, disable=not progress, desc="ShapesWorld", unit="img") as bar:
        for split in SPLITS:
            records = []
            tasks_seen: Counter[str] = Counter()
            for index in range(sizes[split]):
                scene, tasks, rng = example(
                    seed, split, index, image_size=image_size, p_text=p_text, box_format=box_format
                )
                image_id = f"{split}_{index:06d}"
                image_path = f"images/{split}/{image_id}.png"
                write_bytes_atomic(out_dir / image_path, png_bytes(scene.render()))
                if split == "train":
                    records.append(train_record(image_id, image_path, scene, tasks, rng))
                else:
                    records += eval_records(image_id, image_path, scene, tasks)
                tasks_seen.update(task.get("qa_type", task["task"]) for task in tasks)
                bar.update()
            save_llava_json(out_dir / f"{split}.json", records)
            counts[split] = {
                "images": sizes[split],
                "records": len(records),
                "tasks": dict(sorted(tasks_seen.items())),
            }
    info = {
        "dataset": "shapesworld",
        "n": n,
        "seed": seed,
        "image_size": image_size,
        "splits": dict(zip(SPLITS, splits)),
        "p_text": p_text,
        "box_format": box_format_meta(box_format),
        "counts": counts,
        "vocabulary": vocabulary(),
    }
    write_json_atomic(out_dir / INFO_FILE, info)
    return info


def ensure_dataset(out_dir: str | Path, *, n: int, reuse: bool = True, **settings) -> tuple[dict, bool]:
    """The dataset in ``out_dir`` if one with the same ``n`` and settings is complete there, else a new one.

    Returns ``(info, reused)``. ``settings`` are ``generate``'s keyword arguments (seed, image_size, ...).
    """
    out_dir = Path(out_dir)
    info_path = out_dir / INFO_FILE
    if reuse and info_path.is_file():
        info = json.loads(info_path.read_text())
        wanted = {
            "n": n,
            "seed": settings.get("seed", 0),
            "image_size": settings.get("image_size", 96),
            "box_format": box_format_meta(settings.get("box_format", DEFAULT_BOX_FORMAT)),
        }
        if all(info.get(key) == value for key, value in wanted.items()):
            return info, True
    return generate(out_dir, n=n, **settings), False
