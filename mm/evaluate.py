"""Evaluation: answer each record's last question through the one generation path, then score it.

Scoring is ``data.scoring`` (a scorer per ``meta.task``). Every record ends up as one row: scored (question,
answer, prediction, the scorer's fields) or skipped (which file, why): a record with a broken schema, an
unreadable or refused image or video, a prompt that does not fit, or fields its scorer needs but lacks. A run
where nothing could be scored raises ``NothingUsable`` rather than reporting zeros.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from data.media import MediaPaths, load_image
from data.schema import RecordFile, image_list, load_record_file, video_list
from data.scoring import ScoreContext, aggregate, score_record, scorer_for, task_of
from data.skips import NothingUsable, Skip, SkipLog

from .generation import GenerationSettings
from .inference import Engine, Request
from .kv_cache import KVCompression


def question_turns(rec: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation up to (not including) the last assistant answer."""
    conv = rec["conversations"]
    return conv[:-1] if conv and conv[-1]["from"] == "gpt" else conv


def _skipped_row(skip: Skip, skips: SkipLog) -> dict[str, Any]:
    skips.add(skip)
    return {"id": skip.id, "index": skip.index, "skipped": skip.reason, "path": skip.path}


@torch.inference_mode()
def evaluate(
    engine: Engine,
    records: Sequence[dict[str, Any]],
    media: MediaPaths,
    *,
    indices: Sequence[int] | None = None,
    scorer: str | None = None,
    batch_size: int = 64,
    max_new_tokens: int | None = None,
    blind: bool = False,
    kv: KVCompression | None = None,
    progress: bool = True,
    skips: SkipLog | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics and one row per record (in order), answered through ``engine`` ``batch_size`` records at a
    time. ``indices``: the records' positions in their file; ``skips`` collects the skipped ones (and
    prints the first few). ``kv``: compress each prompt's KV cache after the prefill. The metrics hold the
    mean KV bytes of a prompt after the prefill and after compression (``kv_bytes_prompt``,
    ``kv_bytes_kept``) and, when there are videos, the mean visual tokens of a prompt per medium
    (``image_tokens``, ``video_tokens``)."""
    indices = list(range(len(records))) if indices is None else list(indices)
    skips = skips if skips is not None else SkipLog()
    processor = engine.processor
    rows: list[dict[str, Any] | None] = [None] * len(records)
    kv_sizes: list[tuple[int, int]] = []
    media_tokens: list[tuple[int, int]] = []  # visual tokens of each answered prompt: (image, video)
    order = sorted(range(len(records)), key=lambda i: (task_of(records[i]), len(json.dumps(records[i]))))
    bar = tqdm(total=len(records), desc="eval", disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        chunk, requests, sizes = [], [], []
        for i in order[start : start + batch_size]:
            rec = records[i]
            try:
                images = [load_image(media.resolve(entry)) for entry in image_list(rec)]
                videos = [processor.load_video(media.resolve(entry)) for entry in video_list(rec)]
                if blind:  # black images (and frames) of the same sizes: the no-vision baseline
                    images = [Image.new("RGB", im.size) for im in images]
                    videos = [np.zeros_like(frames) for frames in videos]
                request = Request(question_turns(rec), images, videos=videos)
                engine.prepare(request)
                requests.append(request)
            except ValueError as err:  # MediaError, or a prompt the processor cannot take
                rows[i] = _skipped_row(Skip.from_error("eval", indices[i], rec.get("id"), err), skips)
                continue
            chunk.append(i)
            sizes.append(images[0].size if images else None)
        bar.update(min(batch_size, len(order) - start))
        if not chunk:
            continue
        budget = max_new_tokens or max(scorer_for(task_of(records[i]), scorer).max_new_tokens for i in chunk)
        for request in requests:
            request.settings = GenerationSettings(max_new_tokens=budget, kv=kv)
        answers = engine.generate(requests)
        kv_sizes += [(a.kv_bytes_prompt, a.kv_bytes_kept) for a in answers]
        media_tokens += [(a.image_tokens, a.video_tokens) for a in answers]
        predictions = [a.text for a in answers]
        for i, prediction, size in zip(chunk, predictions, sizes):
            rec = records[i]
            ctx = ScoreContext(box_format=processor.box_format, image_size=size)
            try:
                scored = score_record(rec, prediction, ctx, scorer)
            except ValueError as err:  # the record lacks what its scorer needs (e.g. meta.objects)
                skip = Skip("eval", indices[i], rec.get("id"), str(err))
                rows[i] = {**_skipped_row(skip, skips), "prediction": prediction}
                continue
            rows[i] = {
                "id": rec.get("id"),
                "index": indices[i],
                "image": rec.get("image"),
                **({"video": rec["video"]} if "video" in rec else {}),
                "question": question_turns(rec)[-1]["value"],
                "answer": rec["conversations"][-1]["value"],
                "prediction": prediction,
                **scored,
            }
    bar.close()
    done = [r for r in rows if r is not None]
    scored_rows = [r for r in done if "skipped" not in r]
    metrics = aggregate(scored_rows, scorer)
    metrics["scored"], metrics["skipped"] = len(scored_rows), len(done) - len(scored_rows)
    if kv_sizes:
        metrics["kv_bytes_prompt"] = sum(b for b, _ in kv_sizes) / len(kv_sizes)
        metrics["kv_bytes_kept"] = sum(a for _, a in kv_sizes) / len(kv_sizes)
    if any(video for _, video in media_tokens):  # what each medium cost a prompt, where videos were asked
        metrics["image_tokens"] = sum(i for i, _ in media_tokens) / len(media_tokens)
        metrics["video_tokens"] = sum(v for _, v in media_tokens) / len(media_tokens)
    return metrics, done


def evaluate_file(
    engine: Engine,
    path: str | Path,
    *,
    image_folder: str | Path | None = None,
    media_roots: Sequence[str | Path] = (),
    strict: bool = False,
    limit: int | None = None,
    **kwargs: Any,
) -> tuple[dict[str, Any], list[dict[str, Any]], SkipLog]:
    """``evaluate`` on the first ``limit`` records of a LLaVA file; records that break the schema are
    skipped rows of their own (``strict``: raise). Raises ``NothingUsable`` when nothing could be scored."""
    loaded: RecordFile = load_record_file(path, strict=strict)
    keep = [k for k, index in enumerate(loaded.indices) if not limit or index < limit]
    skips = SkipLog()
    rows = [
        _skipped_row(Skip.from_error("eval", None, None, err), skips)
        for err in loaded.errors
        if not limit or err.index is None or err.index < limit
    ]
    metrics, scored = evaluate(
        engine,
        [loaded.records[k] for k in keep],
        MediaPaths(image_folder or loaded.path.parent, media_roots),
        indices=[loaded.indices[k] for k in keep],
        skips=skips,
        **kwargs,
    )
    rows = sorted(rows + scored, key=lambda r: -1 if r["index"] is None else r["index"])
    metrics["skipped"] = skips.count("eval")
    if metrics["scored"] == 0:
        raise NothingUsable(f"nothing was scored in {path}: {skips.summary('eval', len(rows))}")
    return metrics, rows, skips
