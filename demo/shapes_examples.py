"""The demo's bundled examples: a handful of ShapesWorld test scenes drawn by ``data.shapesworld``.

They are generated once and committed (a few KB), so the demo starts with clickable examples and no data
folder; ``python -m demo.shapes_examples`` rewrites them, pixel for pixel the same (the scenes depend on the
seed, split and index only).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from data.boxes import DEFAULT_BOX_FORMAT
from data.schema import write_bytes_atomic
from data.shapesworld import example, png_bytes

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
INDEX_FILE = "examples.json"
SEED, SPLIT = 0, "test"
# (scene index, task): one grounding question first (the demo draws its box), then the other task kinds
CHOSEN = ((0, "ground"), (1, "caption"), (3, "qa"), (4, "describe"))


def example_records(chosen=CHOSEN) -> list[tuple[str, bytes, dict]]:
    """(file name, PNG bytes, record) for each chosen scene: its question and the generator's true answer."""
    out = []
    for index, task_kind in chosen:
        scene, tasks, _ = example(SEED, SPLIT, index, box_format=DEFAULT_BOX_FORMAT)
        task = next(t for t in tasks if t["task"] == task_kind)
        name = f"shapesworld_{SPLIT}_{index:03d}.png"
        record = {"image": name, "task": task_kind, "question": task["question"], "answer": task["answer"]}
        out.append((name, png_bytes(scene.render()), record))
    return out


def write_examples(folder: str | Path = EXAMPLES_DIR) -> Path:
    """Write the example PNGs and ``examples.json`` (questions with their true answers) into ``folder``."""
    folder = Path(folder)
    records = []
    for name, data, record in example_records():
        write_bytes_atomic(folder / name, data)
        records.append(record)
    index = folder / INDEX_FILE
    write_bytes_atomic(index, (json.dumps(records, indent=2) + "\n").encode())
    return index


def load_examples(folder: str | Path = EXAMPLES_DIR) -> list[dict]:
    """The bundled examples with absolute image paths; an empty list if the folder has none."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if not index.is_file():
        return []
    return [{**r, "image": str(folder / r["image"])} for r in json.loads(index.read_text())]


if __name__ == "__main__":
    print(write_examples(sys.argv[1] if len(sys.argv) > 1 else EXAMPLES_DIR))
