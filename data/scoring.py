"""Scoring predictions against LLaVA records: a small registry of scorers keyed by the record's ``meta.task``.

Each scorer works on any LLaVA JSON, not only ShapesWorld:

- ``exact_match`` (tasks ``qa``, ``describe`` and anything unregistered): the normalised prediction equals
  ``meta.answer`` (or the record's last answer). Metric ``<task>_exact_match`` (plain ``exact_match`` for
  records without a task).
- ``object_recall`` (``caption``): the share of ``meta.objects`` the caption names; an object is a phrase
  (``"red circle"``) or a dict with a ``name``. Pooled over objects: ``caption_object_recall``.
- ``box_iou`` (``ground``): IoU of the first box parsed from the prediction with ``meta.box`` (absolute pixels
  of the image) or, without one, with the box written in the reference answer. ``grounding_acc@0.5`` and
  ``grounding_miou``.

A dataset can add a breakdown of one task's metric by a ``meta`` field (ShapesWorld: QA accuracy per question
type) with ``register_breakdown``; dataset modules listed in ``PLUGINS`` register theirs on first use.
"""

from __future__ import annotations

import importlib
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .boxes import BoxFormat, box_iou, parse_box

_PUNCT = re.compile(r"[^\w\s]")
OTHER = "other"  # the task of records without meta.task
PLUGINS = ("data.shapesworld.scoring",)  # dataset modules that register their own breakdowns


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, single spaces: the usual VQA-style normalisation."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


@dataclass
class ScoreContext:
    """What a scorer may need beyond the record: how boxes are written, and the image's (width, height)."""

    box_format: BoxFormat = field(default_factory=BoxFormat)
    image_size: tuple[int, int] | None = None


def reference_answer(record: dict[str, Any]) -> str:
    meta = record.get("meta") or {}
    return str(meta["answer"]) if "answer" in meta else record["conversations"][-1]["value"]


class Scorer:
    """Scores one prediction (``score`` returns the per-record fields) and aggregates a task's rows."""

    name = ""
    max_new_tokens = 64  # generation budget for this kind of answer

    def score(self, record: dict[str, Any], prediction: str, ctx: ScoreContext) -> dict[str, Any]:
        raise NotImplementedError

    def metrics(self, task: str, rows: Sequence[dict[str, Any]]) -> dict[str, float]:
        raise NotImplementedError


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


class ExactMatch(Scorer):
    name = "exact_match"

    def __init__(self, max_new_tokens: int = 64):
        self.max_new_tokens = max_new_tokens

    def score(self, record, prediction, ctx):
        return {"correct": normalize_answer(prediction) == normalize_answer(reference_answer(record))}

    def metrics(self, task, rows):
        key = "exact_match" if task == OTHER else f"{task}_exact_match"
        return {key: _mean([r["correct"] for r in rows])}


def mention_count(words: Sequence[str], phrase: Sequence[str]) -> int:
    """How often ``phrase`` occurs in ``words``, its last word also in the plural (+s, +es)."""
    k = len(phrase)
    if k == 0:
        return 0
    last = {phrase[-1], phrase[-1] + "s", phrase[-1] + "es"}
    return sum(
        list(words[i : i + k - 1]) == list(phrase[:-1]) and words[i + k - 1] in last
        for i in range(len(words) - k + 1)
    )


def object_hits(caption: str, objects: Sequence[str | dict[str, Any]]) -> int:
    """How many of ``objects`` the caption names; each mention counts once, so one "red circle" cannot
    stand for three listed red circles."""
    words = normalize_answer(caption).split()
    names = [normalize_answer(o if isinstance(o, str) else str(o["name"])) for o in objects]
    left = Counter({name: mention_count(words, name.split()) for name in set(names)})
    hits = 0
    for name in names:
        if left[name] > 0:
            left[name] -= 1
            hits += 1
    return hits


class ObjectRecall(Scorer):
    name = "object_recall"

    def __init__(self, max_new_tokens: int = 64):
        self.max_new_tokens = max_new_tokens

    def score(self, record, prediction, ctx):
        objects = (record.get("meta") or {}).get("objects")
        if not isinstance(objects, list):
            raise ValueError("object_recall needs meta.objects (a list of names or of {'name': ...})")
        return {"hits": object_hits(prediction, objects), "total": len(objects)}

    def metrics(self, task, rows):
        total = sum(r["total"] for r in rows)
        return {f"{task}_object_recall": sum(r["hits"] for r in rows) / total if total else 0.0}


class BoxIoU(Scorer):
    name = "box_iou"

    def __init__(self, prefix: str | None = None, max_new_tokens: int = 32):
        self.prefix, self.max_new_tokens = prefix, max_new_tokens

    def score(self, record, prediction, ctx):
        meta = record.get("meta") or {}
        size = meta.get("image_size", ctx.image_size)
        if size is None:
            raise ValueError("box_iou needs the image size (meta.image_size or the decoded image)")
        wh = (size, size) if isinstance(size, (int, float)) else tuple(size)
        target = meta.get("box") or parse_box(reference_answer(record), wh, ctx.box_format)
        if target is None:
            raise ValueError("box_iou needs meta.box or a box in the reference answer")
        box = parse_box(prediction, wh, ctx.box_format)
        return {"iou": 0.0 if box is None else box_iou(box, target), "parsed": box is not None}

    def metrics(self, task, rows):
        prefix = self.prefix or task
        ious = [r["iou"] for r in rows]
        return {f"{prefix}_acc@0.5": _mean([iou >= 0.5 for iou in ious]), f"{prefix}_miou": _mean(ious)}


SCORERS: dict[str, type[Scorer]] = {
    "exact_match": ExactMatch,
    "object_recall": ObjectRecall,
    "box_iou": BoxIoU,
}
TASKS: dict[str, Scorer] = {
    "qa": ExactMatch(max_new_tokens=8),
    "describe": ExactMatch(max_new_tokens=16),
    "caption": ObjectRecall(max_new_tokens=64),
    "ground": BoxIoU(prefix="grounding", max_new_tokens=32),
}
DEFAULT_SCORER = ExactMatch()
BREAKDOWNS: dict[str, list[tuple[str, str]]] = {}  # task -> [(meta field, metric name)]
_plugins_loaded = False


def register_task(task: str, scorer: Scorer) -> None:
    """Score records whose ``meta.task`` is ``task`` with ``scorer``."""
    TASKS[task] = scorer


def register_breakdown(task: str, meta_field: str, metric: str) -> None:
    """Also report ``task``'s metric per value of ``meta[meta_field]``, as ``metrics[metric]``."""
    if (meta_field, metric) not in BREAKDOWNS.setdefault(task, []):
        BREAKDOWNS[task].append((meta_field, metric))


def _load_plugins() -> None:
    global _plugins_loaded
    if not _plugins_loaded:
        _plugins_loaded = True
        for module in PLUGINS:
            importlib.import_module(module)


def task_of(record: dict[str, Any]) -> str:
    meta = record.get("meta")
    return str(meta.get("task", OTHER)) if isinstance(meta, dict) else OTHER


def scorer_for(task: str, override: str | None = None) -> Scorer:
    """The scorer of ``task``, or the scorer named ``override`` (``mm eval --scorer``) for every task."""
    if override is not None:
        if override not in SCORERS:
            raise ValueError(f"unknown scorer {override!r}; known: {sorted(SCORERS)}")
        registered = TASKS.get(task)
        return registered if isinstance(registered, SCORERS[override]) else SCORERS[override]()
    return TASKS.get(task, DEFAULT_SCORER)


def score_record(
    record: dict[str, Any], prediction: str, ctx: ScoreContext, scorer: str | None = None
) -> dict[str, Any]:
    """The per-record row: ``task``, the scorer's fields, and the ``meta`` fields a breakdown groups by."""
    _load_plugins()
    task = task_of(record)
    row = {"task": task, **scorer_for(task, scorer).score(record, prediction, ctx)}
    meta = record.get("meta") or {}
    for meta_field, _ in BREAKDOWNS.get(task, []):
        row[meta_field] = meta.get(meta_field, OTHER)
    return row


def aggregate(rows: Sequence[dict[str, Any]], scorer: str | None = None) -> dict[str, Any]:
    """Metrics of the scored rows: each present task's metrics, registered breakdowns, and ``counts``.

    Only tasks that have rows report metrics: a task with nothing scored is absent, never a silent 0.
    """
    _load_plugins()
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_task[row["task"]].append(row)
    metrics: dict[str, Any] = {}
    for task, task_rows in sorted(by_task.items()):
        scorer_obj = scorer_for(task, scorer)
        metrics.update(scorer_obj.metrics(task, task_rows))
        for meta_field, metric in BREAKDOWNS.get(task, []):
            groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
            for row in task_rows:
                groups[str(row[meta_field])].append(row)
            metrics[metric] = {
                value: next(iter(scorer_obj.metrics(task, group).values()))
                for value, group in sorted(groups.items())
            }
    metrics["counts"] = {task: len(task_rows) for task, task_rows in sorted(by_task.items())}
    return metrics
