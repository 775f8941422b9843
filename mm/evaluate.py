"""Scoring a VLM on ShapesWorld-style records (``meta`` says the task and the answer).

Metrics (fractions in [0, 1]): ``qa_exact_match`` and ``qa_by_type``; ``caption_object_recall`` (share
of ground-truth objects whose colour and shape the caption names); ``grounding_acc@0.5`` and
``grounding_miou`` (IoU of the parsed box with the target); ``describe_exact_match``. Records without
``meta`` are scored by exact match against their last answer (``exact_match``).
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from data.boxes import BoxFormat, box_iou, parse_box
from data.media import MediaError, load_image
from data.processor import VLMProcessor
from data.schema import resolve_image_paths

from .model import VLM

MAX_NEW_TOKENS = {"caption": 64, "ground": 32, "describe": 16, "qa": 8}
_PUNCT = re.compile(r"[^\w\s]")


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, single spaces — the usual VQA-style normalisation."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def caption_object_hits(caption: str, objects: Sequence[dict[str, Any]]) -> int:
    """How many ground-truth objects the caption names by colour and shape (each mention counts once).

    Mentions are adjacent word pairs ("red circle", plural "red circles" too); each ground-truth object
    consumes one matching mention, so three listed objects cannot be matched by one mention.
    """
    words = normalize_answer(caption).split()
    said: Counter[tuple[str, str]] = Counter()
    for first, second in zip(words, words[1:]):
        said[(first, second)] += 1
        # both singular candidates: "crosses" -> "cross", but "circles" -> "circle" (not "circl")
        for suffix in ("es", "s"):
            if second.endswith(suffix):
                said[(first, second[: -len(suffix)])] += 1
    hits = 0
    for obj in objects:
        key = (obj["colour"], obj["shape"])
        if said[key] > 0:
            said[key] -= 1
            hits += 1
    return hits


def _first_prompt(rec: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation up to (not including) the last assistant answer."""
    conv = rec["conversations"]
    return conv[:-1] if conv and conv[-1]["from"] == "gpt" else conv


def _task(rec: dict[str, Any]) -> str:
    return (rec.get("meta") or {}).get("task", "other")


def score(rec: dict[str, Any], prediction: str, box_format: BoxFormat) -> dict[str, Any]:
    """Per-record score: the fields that the aggregate metrics average."""
    meta = rec.get("meta") or {}
    task = meta.get("task", "other")
    answer = meta.get("answer", rec["conversations"][-1]["value"])
    out: dict[str, Any] = {"task": task}
    if task == "qa":
        out["qa_type"] = meta.get("qa_type", "other")
        out["correct"] = normalize_answer(prediction) == normalize_answer(str(answer))
    elif task == "caption":
        objects = meta.get("objects", [])
        out["hits"], out["total"] = caption_object_hits(prediction, objects), len(objects)
    elif task == "ground":
        size = meta.get("image_size", 0)
        wh = (size, size) if isinstance(size, (int, float)) else tuple(size)
        box = parse_box(prediction, wh, box_format)
        out["iou"] = 0.0 if box is None else box_iou(box, meta["box"])
        out["parsed"] = box is not None
    else:
        out["correct"] = normalize_answer(prediction) == normalize_answer(str(answer))
    return out


def aggregate(scores: Sequence[dict[str, Any]]) -> dict[str, Any]:
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in scores:
        by_task[s["task"]].append(s)

    def mean(xs: Sequence[float]) -> float:
        return float(sum(xs) / len(xs)) if xs else 0.0

    qa = by_task.get("qa", [])
    by_type: dict[str, list[bool]] = defaultdict(list)
    for s in qa:
        by_type[s["qa_type"]].append(s["correct"])
    captions = by_task.get("caption", [])
    ground = by_task.get("ground", [])
    metrics: dict[str, Any] = {
        "qa_exact_match": mean([s["correct"] for s in qa]),
        "qa_by_type": {k: mean(v) for k, v in sorted(by_type.items())},
        "caption_object_recall": sum(s["hits"] for s in captions) / max(1, sum(s["total"] for s in captions)),
        "grounding_acc@0.5": mean([s["iou"] >= 0.5 for s in ground]),
        "grounding_miou": mean([s["iou"] for s in ground]),
        "describe_exact_match": mean([s["correct"] for s in by_task.get("describe", [])]),
        "counts": {k: len(v) for k, v in sorted(by_task.items())},
    }
    if by_task.get("other"):
        metrics["exact_match"] = mean([s["correct"] for s in by_task["other"]])
    return metrics


def box_format_for(data_path: Path) -> BoxFormat:
    """The box format the data was written with (ShapesWorld records it next to the splits)."""
    info = data_path.parent / "shapesworld.json"
    if info.is_file():
        fmt = json.loads(info.read_text()).get("box_format") or {}
        return BoxFormat(**{k: v for k, v in fmt.items() if k in ("frame", "template")})
    return BoxFormat()


@torch.inference_mode()
def predict(
    model: VLM,
    processor: VLMProcessor,
    records: Sequence[dict[str, Any]],
    base_dir: Path,
    *,
    batch_size: int = 64,
    blind: bool = False,
    progress: bool = True,
) -> list[str | None]:
    """Greedy answers for each record's last question (None where its image could not be read)."""
    device = next(model.parameters()).device
    order = sorted(range(len(records)), key=lambda i: (_task(records[i]), len(json.dumps(records[i]))))
    predictions: list[str | None] = [None] * len(records)
    tok = processor.tokenizer
    bar = tqdm(total=len(records), desc="eval", disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        feats, kept = [], []
        for i in chunk:
            rec = records[i]
            try:
                images = [load_image(p) for p in resolve_image_paths(rec, base_dir)]
            except MediaError:
                continue
            if blind:
                images = [im.point(lambda _: 0) for im in images]
            feats.append(processor(_first_prompt(rec), images, for_generation=True))
            kept.append(i)
        bar.update(len(chunk))
        if not feats:
            continue
        batch = processor.collate(feats, padding_side="left")
        pv = batch["pixel_values"]
        pv = None if pv is None else {k: v.to(device) for k, v in pv.items()}
        max_new = max(MAX_NEW_TOKENS.get(_task(records[i]), 64) for i in kept)
        new = model.generate(
            batch["input_ids"].to(device), batch["attention_mask"].to(device), pv, max_new_tokens=max_new
        )
        for i, row in zip(kept, new.tolist()):
            predictions[i] = tok.decode(row, skip_special_tokens=True).strip()
    bar.close()
    return predictions


def evaluate(
    model: VLM,
    processor: VLMProcessor,
    records: Sequence[dict[str, Any]],
    base_dir: Path,
    box_format: BoxFormat,
    **kwargs: Any,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics and per-record predictions (with their scores) for ``records``."""
    predictions = predict(model, processor, records, base_dir, **kwargs)
    rows, scores = [], []
    for rec, pred in zip(records, predictions):
        if pred is None:
            rows.append({"id": rec.get("id"), "error": "unreadable media"})
            continue
        s = score(rec, pred, box_format)
        scores.append(s)
        rows.append(
            {
                "id": rec.get("id"),
                "image": rec.get("image"),
                "question": _first_prompt(rec)[-1]["value"],
                "answer": rec["conversations"][-1]["value"],
                "prediction": pred,
                **s,
            }
        )
    metrics = aggregate(scores)
    metrics["skipped"] = sum(1 for p in predictions if p is None)
    return metrics, rows
