"""Batch captioning and grounding (``mm caption``, ``mm ground``): many images through one ``Engine`` into a
JSONL file that survives being killed.

Why it is built this way: a job over a large image set gets interrupted (preemption, out of memory, Ctrl-C).
So results are appended one batch at a time, flushed and fsynced; a rerun reads the ids already written and
skips them, after repairing a last line that a kill cut short, so nothing is lost and nothing is written
twice. A bad image is one error row naming the file, never the end of the run. Under ``accelerate launch``
(``RANK`` / ``WORLD_SIZE`` in the environment) process r takes inputs r, r+W, r+2W, ... into its own
``OUT-stem.rank{r}.jsonl`` (resumable the same way) and leaves a ``.done`` marker; the main process waits
for every marker and merges the rank files into OUT in input order, one row per id. A single-process run
first folds in rank files an interrupted multi-process run left behind.

Inputs (``read_inputs``): a folder (its image and video files, recursively, sorted), a glob, an image or
video file, a text file with one path per line, a JSON / JSONL list of ``{"id", "image"}`` (optional
``prompt``, ``object``, ``meta``), or a LLaVA ``.json`` / ``.jsonl`` (``data.schema``), whose ``meta`` is the
ground truth that ``--eval`` scores with ``data.scoring`` (caption ``meta.objects``; grounding ``meta.box``).
A video (by its suffix, ``VIDEO_SUFFIXES``) is captioned from the frames the model's saved ``data.video``
settings sample (``<video>`` instead of ``<image>``; its row says ``"media": "video"``); grounding takes
images only, so a video given to ``mm ground`` is an error row.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from data.media import MediaError, MediaPaths, load_image
from data.schema import IMAGE_TOKEN, VIDEO_TOKEN, image_list, load_record_file, video_list, write_bytes_atomic

try:  # POSIX: one writer per results file
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

TASKS = ("caption", "ground")
# The first of ShapesWorld's caption and grounding questions (data/shapesworld/tasks.py): the wording the
# quickstart models are trained on. ``{object}`` is replaced by the object to find.
CAPTION_PROMPT = "Describe the image."
VIDEO_CAPTION_PROMPT = "Describe what happens in the video."  # ShapesWorld video's first caption question
GROUND_PROMPT = "Where is the {object}?"
MAX_NEW_TOKENS = {"caption": 64, "ground": 32}  # data.scoring's budgets for caption / ground answers
SCORED_TASK = {"caption": "caption", "ground": "ground"}  # the meta.task a LLaVA record of each job has
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov")  # the demo's video uploads (demo/app.py)
GLOB_CHARS = "*?["
RUN_ID_VARS = ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT")  # tell one launch from another


@dataclass
class Item:
    """One input: its id (the resume key), the image as written in results, the prompt, and what ``--eval``
    scores against (a LLaVA-style record whose ``meta.task`` is caption / ground), or why it cannot run."""

    id: str
    image: str
    path: Path | None = None
    prompt: str = ""
    label: str | None = None  # grounding: the object asked for (drawn beside its box)
    truth: dict[str, Any] | None = None
    error: str | None = None
    media: str = "image"  # or "video" (by the file's suffix)


def media_of(path: str | os.PathLike) -> str:
    """``"video"`` for a video file's suffix, else ``"image"``."""
    return "video" if Path(path).suffix.lower() in VIDEO_SUFFIXES else "image"


def _not_groundable(item_id: str, path: Path) -> Item:
    return Item(item_id, str(path), path, error=f"grounding takes images; {path} is a video", media="video")


# -- inputs -----------------------------------------------------------------------------------------
def read_inputs(
    sources: Sequence[str | os.PathLike],
    task: str,
    *,
    prompt: str | None = None,
    obj: str | None = None,
    image_folder: str | os.PathLike | None = None,
    media_roots: Sequence[str | os.PathLike] = (),
) -> list[Item]:
    """Every input of ``sources`` in order; ``ValueError`` / ``FileNotFoundError`` (naming the source) for
    a source that cannot be read as a whole, for ids that repeat, and for grounding without an object."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {TASKS}")
    if not sources:
        raise ValueError("no input: give a folder, a glob, an image, a path list or a LLaVA JSON")
    items: list[Item] = []
    for source in sources:
        items += _read_source(str(source), task, prompt, obj, image_folder, media_roots)
    seen: dict[str, Item] = {}
    for item in items:
        if item.id in seen:
            raise ValueError(
                f"input id {item.id!r} appears twice ({seen[item.id].image} and {item.image}); ids are how "
                "a rerun knows what is done, so they must be unique (give one folder, or a list with ids)"
            )
        seen[item.id] = item
    return items


def _read_source(source, task, prompt, obj, image_folder, media_roots) -> list[Item]:
    path = Path(source)
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES
            and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            suffixes = ", ".join(IMAGE_SUFFIXES + VIDEO_SUFFIXES)
            raise ValueError(f"{source}: no image or video files in this folder ({suffixes})")
        return [_plain(p.relative_to(path).as_posix(), p, task, prompt, obj, source) for p in files]
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES + VIDEO_SUFFIXES:
            return [_plain(source, path, task, prompt, obj, source)]
        if suffix in (".json", ".jsonl"):
            return _read_structured(path, task, prompt, obj, image_folder, media_roots)
        return _read_path_list(path, task, prompt, obj)
    if any(c in source for c in GLOB_CHARS):
        matches = sorted(m for m in glob.glob(source, recursive=True) if Path(m).is_file())
        if not matches:
            raise FileNotFoundError(f"{source}: the glob matches no file")
        return [_plain(m, Path(m), task, prompt, obj, source) for m in matches]
    raise FileNotFoundError(f"{source}: no such file or folder (and no glob characters {GLOB_CHARS})")


def _plain(
    item_id: str,
    path: Path,
    task: str,
    prompt: str | None,
    obj: str | None,
    source: str,
    row: dict[str, Any] | None = None,
) -> Item:
    """An input that is just an image or a video (from a folder, glob or list); ``row``: its JSON list
    entry."""
    row = row or {}
    meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
    own_prompt = row.get("prompt") if isinstance(row.get("prompt"), str) else None
    template = own_prompt or prompt
    media = media_of(path)
    if task == "caption":
        text = template or (VIDEO_CAPTION_PROMPT if media == "video" else CAPTION_PROMPT)
        truth = _caption_truth(item_id, text, meta)
        return Item(item_id, str(path), path, text, truth=truth, media=media)
    if media == "video":
        return _not_groundable(item_id, path)
    label = obj or (row.get("object") if isinstance(row.get("object"), str) else None)
    if label is None and own_prompt is None:
        raise ValueError(
            f"{source}: input {item_id!r} has no object to find: pass --object TEXT, or give a JSONL list "
            "with an 'object' (or 'prompt') per image, or a LLaVA file of grounding questions"
        )
    text = (template or GROUND_PROMPT).replace("{object}", label or "")
    truth = None if obj is not None else _ground_truth(item_id, text, meta, None)
    return Item(item_id, str(path), path, text, label=label or text, truth=truth)


def _caption_truth(item_id: str, prompt: str, meta: dict[str, Any]) -> dict[str, Any] | None:
    if not isinstance(meta.get("objects"), list):
        return None
    turns = [{"from": "human", "value": prompt}, {"from": "gpt", "value": ""}]
    return {"id": item_id, "conversations": turns, "meta": {**meta, "task": SCORED_TASK["caption"]}}


def _ground_truth(
    item_id: str, prompt: str, meta: dict[str, Any], record: dict[str, Any] | None
) -> dict[str, Any] | None:
    """A box in ``meta.box`` or, for a LLaVA record, one written in its answer."""
    if record is None and not meta.get("box"):
        return None
    turns = (
        record["conversations"]
        if record
        else [{"from": "human", "value": prompt}, {"from": "gpt", "value": ""}]
    )
    return {"id": item_id, "conversations": turns, "meta": {**meta, "task": SCORED_TASK["ground"]}}


def _read_path_list(path: Path, task, prompt, obj) -> list[Item]:
    """One image path per line (blank lines and ``#`` comments skipped); relative paths start at the list's
    folder; the id is the line as written."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read this path list: {err}") from err
    items = []
    for line in lines:
        entry = line.strip()
        if entry and not entry.startswith("#"):
            items.append(_plain(entry, path.parent / entry, task, prompt, obj, str(path)))
    if not items:
        raise ValueError(f"{path}: the path list names no image")
    return items


def _read_structured(path: Path, task, prompt, obj, image_folder, media_roots) -> list[Item]:
    """A JSON / JSONL file: LLaVA records if any entry has ``conversations``, else an ``{id, image}`` list."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read: {err}") from err
    entries: list[Any] = []
    if path.suffix.lower() == ".jsonl":
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError as err:
                    if '"conversations"' in line:  # a LLaVA file: load_record_file records the bad line
                        entries.append({"conversations": None})
                        continue
                    raise ValueError(f"{path}: line {n} is not JSON: {err.msg}") from err
    else:
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not JSON (line {err.lineno}, column {err.colno}): {err.msg}") from err
        if not isinstance(entries, list):
            raise ValueError(f"{path}: expected a JSON list (LLaVA records or {{id, image}} entries)")
    if any(isinstance(e, dict) and "conversations" in e for e in entries):
        return _read_llava(path, task, prompt, obj, image_folder, media_roots)
    items = []
    for n, entry in enumerate(entries, start=1):
        where = f"{path}: {'line' if path.suffix.lower() == '.jsonl' else 'entry'} {n}"
        if isinstance(entry, str):
            entry = {"image": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not entry["image"]:
            raise ValueError(f"{where}: expected an object with an 'image' path (and an 'id'), got {entry!r}")
        item_id = entry.get("id", entry["image"])
        if isinstance(item_id, bool) or not isinstance(item_id, (str, int)) or item_id == "":
            raise ValueError(f"{where}: 'id' must be a non-empty string, got {item_id!r}")
        image = Path(entry["image"])
        full = image if image.is_absolute() else path.parent / image
        items.append(_plain(str(item_id), full, task, prompt, obj, where, row=entry))
    if not items:
        raise ValueError(f"{path}: the list names no image")
    return items


def _question(record: dict[str, Any]) -> str:
    """The record's last question without its image and video placeholders."""
    turns = record["conversations"]
    human = [t["value"] for t in turns if t.get("from") == "human"]
    return " ".join(human[-1].replace(IMAGE_TOKEN, " ").replace(VIDEO_TOKEN, " ").split()) if human else ""


def _read_llava(path: Path, task, prompt, obj, image_folder, media_roots) -> list[Item]:
    """LLaVA records: a file holding records of the job's ``meta.task`` gives those only (a ShapesWorld
    test file has caption, QA and grounding records per image), else every record. Images resolve
    through ``MediaPaths`` (the file's folder or ``image_folder``, plus ``media_roots``)."""
    from data.scoring import task_of

    loaded = load_record_file(path)
    media = MediaPaths(image_folder or path.parent, media_roots)
    wanted = SCORED_TASK[task]
    keep = any(task_of(r) == wanted for r in loaded.records)
    found: list[tuple[int, Item]] = []
    for err in loaded.errors:
        item_id = str(err.record_id) if err.record_id is not None else f"{path.name}#{err.index}"
        found.append((err.index if err.index is not None else -1, Item(item_id, "", error=str(err))))
    for index, rec in zip(loaded.indices, loaded.records):
        if keep and task_of(rec) != wanted:
            continue
        found.append((index, _llava_item(rec, path, media, task, prompt, obj)))
    return [item for _, item in sorted(found, key=lambda pair: pair[0])]


def _llava_item(rec, path: Path, media: MediaPaths, task, prompt, obj) -> Item:
    from data.scoring import task_of

    item_id = str(rec["id"])
    meta = rec.get("meta") if isinstance(rec.get("meta"), dict) else {}
    images, videos = image_list(rec), video_list(rec)
    entries = images + videos
    if len(entries) != 1:
        reason = (
            f"{path}: record {item_id!r} has {len(images)} images and {len(videos)} videos; mm {task} takes "
            "one image (or, for captions, one video) per input"
        )
        return Item(item_id, ", ".join(map(str, entries)), error=reason)
    try:
        full = media.resolve(entries[0])
    except MediaError as err:
        return Item(item_id, str(entries[0]), error=f"{path}: record {item_id!r}: {err}")
    kind = "video" if videos else "image"
    if task == "caption":  # a caption record's own question: ShapesWorld words them several ways
        default = VIDEO_CAPTION_PROMPT if videos else CAPTION_PROMPT
        text = prompt or (_question(rec) if task_of(rec) == "caption" else "") or default
        return Item(item_id, str(full), full, text, truth=_caption_truth(item_id, text, meta), media=kind)
    if videos:
        return _not_groundable(item_id, full)
    if obj is not None:  # the record's own truth is about another object
        return Item(item_id, str(full), full, (prompt or GROUND_PROMPT).replace("{object}", obj), label=obj)
    target = meta.get("target") if isinstance(meta.get("target"), str) else None
    question = _question(rec)
    text = prompt.replace("{object}", target) if prompt and target else question
    if not text:
        return Item(item_id, str(full), error=f"{path}: record {item_id!r} asks nothing: pass --object TEXT")
    return Item(
        item_id,
        str(full),
        full,
        text,
        label=target or question,
        truth=_ground_truth(item_id, text, meta, rec),
    )


# -- results files ----------------------------------------------------------------------------------
def shard_path(out: Path, rank: int) -> Path:
    return out.with_name(f"{out.stem}.rank{rank}{out.suffix}")


def marker_path(out: Path, rank: int) -> Path:
    return out.with_name(f"{out.stem}.rank{rank}.done")


def shard_files(out: Path) -> list[Path]:
    """The rank files next to ``out`` (listed, not globbed: ``out``'s name may hold ``[`` or ``*``)."""
    if not out.parent.is_dir():
        return []
    pattern = re.compile(re.escape(out.stem) + r"\.rank(\d+)" + re.escape(out.suffix) + "$")
    found = [(int(m.group(1)), p) for p in out.parent.iterdir() if (m := pattern.match(p.name))]
    return [p for _, p in sorted(found)]


def _parse_rows(path: Path, data: bytes) -> tuple[list[dict[str, Any]], int, bool]:
    """The rows of a results file, the byte length of its complete lines, and whether an unterminated last
    line is itself a whole row (a kill between the row and its newline) rather than a cut one."""
    rows = []
    lines = data.split(b"\n")
    for n, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            row, problem = None, str(err)
        else:
            problem = "no 'id'"
        if not isinstance(row, dict) or "id" not in row:
            raise ValueError(
                f"{path}: line {n} is not a result row ({problem}); only its last line can be cut by a kill, "
                "so this file was edited or written by something else: move it away or choose another --out"
            )
        rows.append(row)
    complete = len(data) - len(lines[-1])
    tail_whole = False
    if lines[-1].strip():
        try:
            row = json.loads(lines[-1])
            tail_whole = isinstance(row, dict) and "id" in row
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
        if tail_whole:
            rows.append(row)
    return rows, complete, tail_whole


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a results file another process may be appending to (a cut last line is left out)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return _parse_rows(path, data)[0]


class ResultsFile:
    """The JSONL file this process appends to: locked against a second writer, a last line cut by a kill
    repaired on open (dropped, or given its newline when the row itself is whole), each batch flushed and
    fsynced so a kill loses at most the batch being generated."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a+b")  # noqa: SIM115 - held open for the run
        if fcntl is not None:
            try:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as err:
                self._file.close()
                raise ValueError(
                    f"{path} is being written by another run; wait for it or pick another --out"
                ) from err
        self.note = ""
        self.rows = self._repair()

    def _repair(self) -> list[dict[str, Any]]:
        self._file.seek(0)
        data = self._file.read()
        rows, complete, tail_whole = _parse_rows(self.path, data)
        if complete < len(data):
            if tail_whole:
                self._file.write(b"\n")
                self.note = f"{self.path}: gave the last row its missing newline (an interrupted run)"
            else:
                self._file.truncate(complete)
                cut = len(data) - complete
                self.note = f"{self.path}: dropped a cut last line ({cut} bytes) left by an interrupted run"
            self._sync()
        return rows

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def drop_errors(self) -> int:
        """Remove the error rows (``--retry-errors``) by rewriting the file under the lock."""
        keep = [r for r in self.rows if "error" not in r]
        dropped = len(self.rows) - len(keep)
        if dropped:
            self._file.seek(0)
            self._file.truncate(0)
            self._file.write(b"".join(_line(r) for r in keep))
            self._sync()
            self.rows = keep
        return dropped

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        self._file.write(b"".join(_line(r) for r in rows))
        self._sync()

    def close(self) -> None:
        self._file.close()


def _line(row: dict[str, Any]) -> bytes:
    return (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")


def merge_results(out: Path, items: Sequence[Item]) -> int:
    """Fold every rank file into ``out`` (atomically): one row per id, a result preferred over an error
    row, in input order (ids not among ``items`` after, as found); then remove the rank files and markers.
    Returns the number of rows in ``out``."""
    shards = shard_files(out)
    best: dict[str, dict[str, Any]] = {}
    for path in [out, *shards]:
        for row in read_rows(path):
            key = str(row["id"])
            if key not in best or ("error" in best[key] and "error" not in row):
                best[key] = row
    position = {item.id: k for k, item in enumerate(items)}
    order = sorted(best, key=lambda key: (0, position[key]) if key in position else (1, 0))
    write_bytes_atomic(out, b"".join(_line(best[key]) for key in order))
    for path in shards:
        path.unlink(missing_ok=True)
        rank = int(path.stem.rsplit(".rank", 1)[1])
        marker_path(out, rank).unlink(missing_ok=True)
    return len(order)


# -- drawing ----------------------------------------------------------------------------------------
COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


def draw_path(draw_dir: Path, item_id: str) -> Path:
    """Where ``item_id``'s drawing goes: the id's own folders under ``draw_dir`` (never outside it) and
    ``.png``; an id that had to be changed to fit a file name gets a short hash, so two ids never share."""
    parts = [re.sub(r"[^A-Za-z0-9._-]", "_", p) for p in item_id.replace("\\", "/").split("/")]
    parts = [p for p in parts if p not in ("", ".", "..")] or ["image"]
    if "/".join(parts) != item_id:
        parts[-1] += "-" + hashlib.sha1(item_id.encode()).hexdigest()[:8]
    if not parts[-1].lower().endswith(".png"):
        parts[-1] += ".png"
    return draw_dir.joinpath(*parts)


def draw_result(image: Image.Image, row: dict[str, Any]) -> Image.Image:
    """The image (same size) with each box and its label, or with the caption written along the bottom."""
    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    width = max(1, round(min(canvas.size) / 100))
    boxes = row.get("boxes") or []
    for k, box in enumerate(boxes):
        colour = COLOURS[k % len(COLOURS)]
        draw.rectangle(box, outline=colour, width=width)
        label = row.get("object") or ""
        if label:
            x, y = box[0], max(0, box[1] - 12)
            left, top, right, bottom = draw.textbbox((x, y), label, font=font)
            draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=colour)
            draw.text((x, y), label, fill=(255, 255, 255), font=font)
    text = row.get("text", "") if "boxes" not in row else ("" if boxes else f"no box: {row.get('text', '')}")
    if text:
        chars = max(8, canvas.width // 6)
        lines = textwrap.wrap(text, chars)[: max(1, canvas.height // 24)]
        line_h = draw.textbbox((0, 0), "Ag", font=font)[3] + 2
        top = canvas.height - line_h * len(lines) - 2
        draw.rectangle((0, top, canvas.width, canvas.height), fill=(0, 0, 0))
        for k, line in enumerate(lines):
            draw.text((2, top + 1 + k * line_h), line, fill=(255, 255, 255), font=font)
    return canvas


def write_drawing(path: Path, image: Image.Image) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())


# -- scoring ----------------------------------------------------------------------------------------
def score_results(items: Sequence[Item], rows: Sequence[dict[str, Any]], box_format: Any) -> dict[str, Any]:
    """Metrics of the results whose input carries ground truth (``data.scoring``: caption object recall,
    grounding Acc@0.5 and mIoU), and how many inputs could not be scored and why."""
    from data.scoring import ScoreContext, aggregate, score_record

    by_id = {str(r["id"]): r for r in rows}
    scored, why = [], {"error": 0, "not run": 0, "unscorable": 0}
    without_truth = 0
    for item in items:
        if item.truth is None:
            without_truth += 1
            continue
        row = by_id.get(item.id)
        if row is None:
            why["not run"] += 1
        elif "error" in row:
            why["error"] += 1
        else:
            size = tuple(row["size"]) if row.get("size") else None
            try:
                scored.append(score_record(item.truth, row["text"], ScoreContext(box_format, size)))
            except ValueError:  # the record lacks what its scorer needs (no box anywhere)
                why["unscorable"] += 1
    metrics = aggregate(scored) if scored else {}
    metrics.update(
        scored=len(scored), skipped=sum(why.values()), skipped_why=why, without_truth=without_truth
    )
    return metrics


# -- the run ----------------------------------------------------------------------------------------
@dataclass
class BatchOptions:
    task: str
    model: str | os.PathLike
    out: Path
    batch_size: int = 16
    max_new_tokens: int | None = None
    device: str | None = None
    visual_delta: float | None = None
    draw: Path | None = None
    limit: int | None = None
    retry_errors: bool = False
    workers: int = 4
    progress: bool = True


@dataclass
class BatchSummary:
    rank: int
    world_size: int
    inputs: int  # all inputs (every rank)
    shard: int  # this rank's inputs
    already_done: int
    processed: int  # answered or errored in this run
    errors: int
    seconds: float  # the generation loop (images decoded, answered, written), model load excluded
    main: bool
    out: Path  # the file this rank wrote (OUT for the main process once merged)
    rows: list[dict[str, Any]] = field(default_factory=list, repr=False)  # OUT's rows (main process)
    notes: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


def rank_and_world() -> tuple[int, int]:
    """This process's place under ``accelerate launch`` / ``torchrun`` (``RANK``, ``WORLD_SIZE``)."""
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError as err:
        raise ValueError(f"RANK / WORLD_SIZE must be integers: {err}") from err
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
    return rank, world


def _launch_id() -> str:
    """What the ranks of one launch share and a later launch does not: on one machine their parent (the
    launcher); across machines the rendezvous (accelerate reuses it, so there a stale marker from a killed
    launch is only cleared by its rank's restart)."""
    world = os.environ.get("WORLD_SIZE", "1")
    if os.environ.get("LOCAL_WORLD_SIZE", world) == world:
        return f"launcher pid {os.getppid()}"
    return "|".join(os.environ.get(v, "") for v in RUN_ID_VARS)


def _device(requested: str | None, world: int) -> str | None:
    """Each process of a multi-GPU launch on its own card."""
    import torch

    local = int(os.environ.get("LOCAL_RANK", 0))
    if world > 1 and requested in (None, "cuda") and torch.cuda.is_available():
        return f"cuda:{local}"
    return requested


def _load(item: Item, processor: Any = None) -> Any:
    """The decoded image, a video's frames (uint8 ``[F, H, W, 3]``, sampled by ``processor.load_video``:
    the model's saved ``data.video``), or the reason it cannot be used (a string naming the file)."""
    if item.error is not None:
        return item.error
    try:
        return processor.load_video(item.path) if item.media == "video" else load_image(item.path)
    except (MediaError, OSError) as err:
        return str(err) if isinstance(err, MediaError) else f"{item.path}: {err}"


def _still(media: Any) -> Image.Image:
    """What ``--draw`` draws on: the image, or a video's middle sampled frame."""
    return media if isinstance(media, Image.Image) else Image.fromarray(media[len(media) // 2])


def answer_batch(engine: Any, task: str, batch: Sequence[Item], images: Sequence[Any], settings):
    """One row per input of the batch, in order: the answer (with boxes in pixels for grounding), or an
    error row for an image, video or prompt that cannot be used; one padded ``engine.generate`` for the
    rest (images and videos mixed). ``images``: ``_load``'s per input."""
    from .inference import Request, user_turn

    def head(item: Item) -> dict[str, Any]:  # a video row says so; an image row stays as it always was
        return {"id": item.id, "image": item.image, **({"media": "video"} if item.media == "video" else {})}

    rows: list[dict[str, Any] | None] = [None] * len(batch)
    requests, slots = [], []
    for k, (item, image) in enumerate(zip(batch, images)):
        if isinstance(image, str):
            rows[k] = {**head(item), "error": image}
            continue
        try:
            if item.media == "video":
                request = Request([user_turn(item.prompt, 0, 1)], [], settings, videos=[image])
            else:
                request = Request([user_turn(item.prompt, 1)], [image], settings)
            engine.prepare(request)
        except ValueError as err:  # an empty or too long prompt
            rows[k] = {**head(item), "error": f"{item.image}: prompt refused: {err}"}
            continue
        requests.append(request)
        slots.append(k)
    answers = engine.generate(requests) if requests else []
    for k, answer in zip(slots, answers):
        item, image = batch[k], images[k]
        row = {**head(item), "prompt": item.prompt, "text": answer.text}
        if task == "ground":
            row["object"] = item.label
            row["boxes"] = [[round(v, 2) for v in box] for box in engine.boxes(answer.text, image)]
        if item.media == "video":  # the sampled frames (shrunk by data.video.max_side) and what they cost
            row["frames"] = len(image)
            row["video_tokens"] = answer.video_tokens
        else:
            row["size"] = list(image.size)
        row["new_tokens"] = answer.new_tokens
        rows[k] = row
    return rows


def run_batch(
    items: Sequence[Item],
    opts: BatchOptions,
    *,
    engine: Any = None,
    say: Callable[[str], None] | None = None,
) -> BatchSummary:
    """Answer this process's inputs that OUT (and the rank files) do not hold yet; on the main process,
    merge the rank files once every rank is done. ``engine``: an already loaded ``Engine`` (else loaded
    from ``opts.model`` only when something is left to do)."""
    from tqdm.auto import tqdm

    from .generation import GenerationSettings

    say = say or (lambda text: print(text, file=sys.stderr))
    if opts.task not in TASKS:
        raise ValueError(f"unknown task {opts.task!r}; known: {TASKS}")
    if opts.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {opts.batch_size}")
    out = Path(opts.out)
    if out.suffix != ".jsonl":
        raise ValueError(f"--out {out}: results are JSONL, name the file *.jsonl")
    rank, world = rank_and_world()
    main = rank == 0
    notes: list[str] = []
    if world == 1 and shard_files(out):
        count = len(shard_files(out))
        merge_results(out, items)
        notes.append(f"folded {count} rank file(s) of an interrupted multi-process run into {out}")
    own = out if world == 1 else shard_path(out, rank)
    if world > 1:
        marker_path(out, rank).unlink(missing_ok=True)
    writer = ResultsFile(own)
    try:
        if writer.note:
            notes.append(writer.note)
        if opts.retry_errors and (dropped := writer.drop_errors()):
            notes.append(f"{own}: dropped {dropped} error row(s) to retry them")
        done = {str(r["id"]) for r in writer.rows}
        if world > 1:  # what the merged file and the other ranks' files (any earlier world size) hold
            for path in [out, *shard_files(out)]:
                if path != own:
                    theirs = read_rows(path)  # --retry-errors: their error rows are to be redone too
                    done |= {str(r["id"]) for r in theirs if not (opts.retry_errors and "error" in r)}
        mine = [item for k, item in enumerate(items) if k % world == rank]
        todo = [item for item in mine if item.id not in done]
        if opts.limit is not None:
            todo = todo[: max(0, opts.limit)]
        for note in notes:
            say(note)
        who = f"rank {rank}/{world}: " if world > 1 else ""
        already = sum(item.id in done for item in mine)
        say(f"mm {opts.task}: {who}{len(mine)} input(s), {already} already in {own.name}, {len(todo)} to do")
        errors, start = 0, time.perf_counter()
        if todo:
            if engine is None:
                from .inference import Engine

                engine = Engine.load(
                    opts.model,
                    device=_device(opts.device, world),
                    visual_delta=opts.visual_delta,
                    max_batch=opts.batch_size,
                )
            start = time.perf_counter()
            settings = GenerationSettings(max_new_tokens=opts.max_new_tokens or MAX_NEW_TOKENS[opts.task])
            batches = [todo[i : i + opts.batch_size] for i in range(0, len(todo), opts.batch_size)]
            bar = tqdm(
                total=len(todo), unit="input", desc=f"mm {opts.task}", disable=not (opts.progress and main)
            )
            with ThreadPoolExecutor(max_workers=max(1, opts.workers)) as pool:
                pending = [pool.submit(_load, item, engine.processor) for item in batches[0]]
                for k, batch in enumerate(batches):
                    images = [f.result() for f in pending]
                    if k + 1 < len(batches):  # decode the next batch while this one generates
                        pending = [pool.submit(_load, item, engine.processor) for item in batches[k + 1]]
                    rows = answer_batch(engine, opts.task, batch, images, settings)
                    if opts.draw is not None:  # before the rows: a kill leaves no row without its drawing
                        for row, image in zip(rows, images):
                            if "error" not in row:
                                write_drawing(
                                    draw_path(Path(opts.draw), row["id"]), draw_result(_still(image), row)
                                )
                    writer.append(rows)
                    errors += sum("error" in r for r in rows)
                    bar.update(len(batch))  # inputs/s as a postfix: tqdm's own rate flips to s/input below 1
                    rate = bar.n / max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix_str(f"{rate:.2f} inputs/s" + (f", {errors} errors" if errors else ""))
            bar.close()
        seconds = time.perf_counter() - start if todo else 0.0
    finally:
        writer.close()
    summary = BatchSummary(
        rank, world, len(items), len(mine), already, len(todo), errors, seconds, main, own, notes=notes
    )
    if world > 1:
        write_bytes_atomic(
            marker_path(out, rank), json.dumps({"rank": rank, "launch": _launch_id()}).encode()
        )
        if not main:
            return summary
        _wait_for_ranks(out, world, say)
        rows = merge_results(out, items)
        say(f"mm {opts.task}: merged the {world} rank files into {out} ({rows} rows)")
        summary.out = out
    summary.rows = read_rows(out)
    return summary


def _wait_for_ranks(out: Path, world: int, say: Callable[[str], None], poll_s: float = 0.5) -> None:
    """Block until every rank of this launch has left its ``.done`` marker (no process group needed, and
    no timeout: a rank with more left to do may take hours longer)."""
    launch, told = _launch_id(), False
    while True:
        missing = []
        for rank in range(world):
            try:
                marker = json.loads(marker_path(out, rank).read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                marker = None
            if not marker or marker.get("launch") != launch:
                missing.append(rank)
        if not missing:
            return
        if not told:
            say(f"waiting for rank(s) {missing} to finish ({marker_path(out, missing[0]).name}, ...)")
            told = True
        time.sleep(poll_s)


def error_summary(rows: Sequence[dict[str, Any]], limit: int = 3) -> str:
    errors = [r for r in rows if "error" in r]
    lines = [f"{len(errors)} input(s) could not be used (an error row each in the results):"]
    lines += [f"  {r['id']}: {r['error']}" for r in errors[:limit]]
    if len(errors) > limit:
        lines.append(f"  ... and {len(errors) - limit} more")
    return "\n".join(lines)


def model_box_format(model_dir: str | os.PathLike) -> Any:
    """The box format a model directory writes (its processor settings; the weights are not loaded)."""
    from data.processor import VLMProcessor

    return VLMProcessor.from_pretrained(model_dir, {}).box_format


def batch_command(task: str, args: Any) -> int:
    """``mm caption`` / ``mm ground``: read the inputs (failing early, before the model loads, on a source
    that cannot be read), run this process's share, and on the main process report errors, score
    (``--eval``) and print OUT's path."""
    from data.schema import write_json_atomic
    from data.skips import NothingUsable

    items = read_inputs(
        args.inputs,
        task,
        prompt=args.prompt,
        obj=getattr(args, "object", None),
        image_folder=args.image_folder,
        media_roots=args.media_root or (),
    )
    opts = BatchOptions(
        task=task,
        model=args.model,
        out=Path(args.out),
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        visual_delta=args.v2pe_delta,
        draw=Path(args.draw) if args.draw else None,
        limit=args.limit,
        retry_errors=args.retry_errors,
        workers=args.workers,
        progress=not args.quiet,
    )
    summary = run_batch(items, opts)
    if not summary.main:
        print(summary.out.resolve())
        return 0
    rows = summary.rows
    if summary.processed:
        rate = f"{summary.images_per_s:.2f} inputs/s" if summary.seconds else ""
        print(f"mm {task}: {summary.processed} input(s) in {summary.seconds:.1f} s ({rate})", file=sys.stderr)
    if any("error" in r for r in rows):
        print(error_summary(rows), file=sys.stderr)
    if summary.processed and summary.errors == summary.processed and summary.world_size == 1:
        raise NothingUsable(
            f"every input of this run failed; results in {summary.out}\n{error_summary(rows)}"
        )
    if args.eval:
        from .report import print_metrics

        metrics = score_results(items, rows, model_box_format(args.model))
        if metrics["scored"] == 0:
            why = (
                "no input carries ground truth (LLaVA meta.objects / meta.box, or a list's 'meta')"
                if metrics["without_truth"] == len(items)
                else f"nothing with ground truth has a result: {metrics['skipped_why']}"
            )
            raise NothingUsable(f"--eval: nothing scored: {why}; results in {summary.out}")
        metrics_path = Path(args.metrics) if args.metrics else summary.out.with_suffix(".metrics.json")
        metrics.update(task=task, model=str(args.model), results=str(summary.out.resolve()))
        shown = {k: v for k, v in metrics.items() if k not in ("skipped_why", "without_truth")}
        print_metrics(shown, title=f"mm {task} --eval: {args.model}")
        print(
            f"scored {metrics['scored']}, skipped {metrics['skipped']} {metrics['skipped_why']}, "
            f"without ground truth {metrics['without_truth']}",
            file=sys.stderr,
        )
        write_json_atomic(metrics_path, metrics)
        print(metrics_path.resolve())
    print(summary.out.resolve())
    return 0
