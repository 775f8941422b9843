"""LLaVA-format conversation records: validation, loading and atomic writing.

A record is ``{"id": str, "image": str | list[str] (optional), "video": str | list[str] (optional),
"conversations": [{"from", "value"}, ...]}`` plus any extra keys; the turns hold as many ``<image>`` /
``<video>`` placeholders as the record has images / videos. Validation happens once at load time with messages
that name the file, the record and the field. ``load_llava_json`` stops at the first broken record
(``strict``); ``load_record_file`` keeps the valid records and returns the broken ones' errors, so a long job
can skip and record them.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
HUMAN, GPT, SYSTEM = "human", "gpt", "system"


class SchemaError(ValueError):
    """A record (or a whole file) does not follow the LLaVA schema.

    The message reads ``<file>: record <index> (id '<id>'): <field>: <reason>``, leaving out the parts that
    are not known.
    """

    def __init__(
        self,
        reason: str,
        *,
        source: str | os.PathLike | None = None,
        index: int | None = None,
        record_id: Any = None,
        field: str | None = None,
    ) -> None:
        self.reason = reason
        self.source = None if source is None else str(source)
        self.index = index
        self.record_id = record_id
        self.field = field
        parts = []
        if self.source is not None:
            parts.append(self.source)
        if index is not None or record_id is not None:
            where = "record" if index is None else f"record {index}"
            if record_id is not None:
                where += f" (id {str(record_id)!r})"
            parts.append(where)
        if field is not None:
            parts.append(field)
        parts.append(reason)
        super().__init__(": ".join(parts))


def _type_name(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", type(None): "null", bool: "boolean"}.get(
        type(value), type(value).__name__
    )


def image_list(rec: dict) -> list:
    """The record's ``image`` entry as a list (empty when the record has no image)."""
    return _media_list(rec, "image")


def video_list(rec: dict) -> list:
    """The record's ``video`` entry as a list (empty when the record has no video)."""
    return _media_list(rec, "video")


def _media_list(rec: dict, key: str) -> list:
    entry = rec.get(key)
    if entry is None:
        return []
    return entry if isinstance(entry, list) else [entry]


def _check_turns(conversations: Any, fail) -> dict[str, int]:
    """Check roles and values; returns how many ``<image>`` and ``<video>`` placeholders the turns hold."""
    if not isinstance(conversations, list) or not conversations:
        got = _type_name(conversations) if not isinstance(conversations, list) else "an empty list"
        fail("conversations", f"expected a non-empty list of turns, got {got}")
    placeholders = {"image": 0, "video": 0}
    expected = HUMAN
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            fail(f"conversations[{i}]", f"expected an object with 'from' and 'value', got {_type_name(turn)}")
        role, value = turn.get("from"), turn.get("value")
        if role == SYSTEM and i == 0:
            pass
        elif role == SYSTEM:
            fail(f"conversations[{i}].from", "'system' is only allowed as the first turn")
        elif role not in (HUMAN, GPT):
            fail(f"conversations[{i}].from", f"expected 'human' or 'gpt', got {role!r}")
        elif role != expected:
            fail(
                f"conversations[{i}].from", f"expected {expected!r} (turns alternate human/gpt), got {role!r}"
            )
        else:
            expected = GPT if role == HUMAN else HUMAN
        if not isinstance(value, str) or not value.strip():
            got = repr(value) if isinstance(value, str) else _type_name(value)
            fail(f"conversations[{i}].value", f"expected a non-empty string, got {got}")
        placeholders["image"] += value.count(IMAGE_TOKEN)
        placeholders["video"] += value.count(VIDEO_TOKEN)
    last_role = conversations[-1]["from"]
    if last_role != GPT:
        fail("conversations", f"the last turn must be from 'gpt', got {last_role!r}")
    return placeholders


def validate_record(rec: Any, index: int | None = None, source: str | os.PathLike | None = None) -> None:
    """Raise ``SchemaError`` if ``rec`` is not a valid LLaVA record.

    Checks: ``id`` is a string (integers are accepted, as some public sets use them); ``conversations`` is a
    non-empty list whose roles are an optional leading ``system`` then ``human``/``gpt`` alternating,
    starting with ``human`` and ending with ``gpt``; every value is a non-empty string; ``image`` (optional)
    is a non-empty string or a list of them, and so is ``video``; the ``<image>`` (``<video>``) placeholders
    across all turns number exactly as many as the images (videos).
    """
    record_id = rec.get("id") if isinstance(rec, dict) else None

    def fail(field: str | None, reason: str):
        raise SchemaError(reason, source=source, index=index, record_id=record_id, field=field)

    if not isinstance(rec, dict):
        fail(None, f"expected an object, got {_type_name(rec)}")
    if "id" not in rec:
        fail("id", "missing")
    if isinstance(record_id, bool) or not isinstance(record_id, (str, int)) or record_id == "":
        fail("id", f"expected a non-empty string, got {record_id!r}")
    if "conversations" not in rec:
        fail("conversations", "missing")
    placeholders = _check_turns(rec["conversations"], fail)
    for key, token in (("image", IMAGE_TOKEN), ("video", VIDEO_TOKEN)):
        value = rec.get(key)
        if value is not None and not isinstance(value, (str, list)):
            fail(key, f"expected a string or a list of strings, got {_type_name(value)}")
        entries = _media_list(rec, key)
        for k, entry in enumerate(entries):
            if not isinstance(entry, str) or not entry.strip():
                field = f"{key}[{k}]" if isinstance(value, list) else key
                got = repr(entry) if isinstance(entry, str) else _type_name(entry)
                fail(field, f"expected a non-empty string, got {got}")
        if placeholders[key] != len(entries):
            fail(
                "conversations",
                f"{placeholders[key]} {token!r} placeholder(s) but {len(entries)} {key}(s); they must match",
            )


def _invalid_json(path: Path, err: json.JSONDecodeError, line: int | None = None) -> SchemaError:
    where = f"line {line if line is not None else err.lineno}, column {err.colno}"
    return SchemaError(f"invalid JSON at {where}: {err.msg}", source=path)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise SchemaError("file not found", source=path) from err
    except (OSError, UnicodeDecodeError) as err:
        raise SchemaError(f"cannot read file: {err}", source=path) from err


def _read_records(path: Path, strict: bool) -> list[Any]:
    """The raw entries of a file; in a non-strict ``.jsonl`` a line that is not JSON becomes a SchemaError."""
    text = _read_text(path)
    if path.suffix == ".jsonl":
        records: list[Any] = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    error = _invalid_json(path, err, line_no)
                    if strict:
                        raise error from err
                    records.append(SchemaError(error.reason, source=path, index=len(records)))
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise _invalid_json(path, err) from err
    if not isinstance(records, list):
        raise SchemaError(f"expected a JSON list of records, got {_type_name(records)}", source=path)
    return records


@dataclass
class RecordFile:
    """The valid records of a LLaVA file, their positions in it, and what was wrong with the others."""

    path: Path
    records: list[dict]
    indices: list[int]  # position of each valid record in the file
    errors: list[SchemaError]
    total: int


def load_record_file(path: str | os.PathLike, *, strict: bool = False) -> RecordFile:
    """Read a LLaVA ``.json`` / ``.jsonl`` file; with ``strict`` the first broken record raises its error.

    A file that cannot be read or parsed as a whole always raises ``SchemaError``.
    """
    path = Path(path)
    entries = _read_records(path, strict)
    records, indices, errors = [], [], []
    for index, rec in enumerate(entries):
        try:
            if isinstance(rec, SchemaError):
                raise rec
            validate_record(rec, index=index, source=path)
        except SchemaError as err:
            if strict:
                raise
            errors.append(err)
            continue
        records.append(rec)
        indices.append(index)
    return RecordFile(path, records, indices, errors, len(entries))


def load_llava_json(path: str | os.PathLike, *, check_files: bool = False) -> list[dict]:
    """Read and validate a LLaVA ``.json`` (a list) or ``.jsonl`` (one record per line) file; the first
    broken record raises. With ``check_files`` every image and video must exist in the file's folder."""
    from .media import MediaError, MediaPaths

    path = Path(path)
    records = load_record_file(path, strict=True).records
    if check_files:
        media = MediaPaths(path.parent)
        for index, rec in enumerate(records):
            entries = [("image", k, e) for k, e in enumerate(image_list(rec))]
            for key, k, entry in entries + [("video", k, e) for k, e in enumerate(video_list(rec))]:
                field = f"{key}[{k}]" if isinstance(rec[key], list) else key
                try:
                    found = media.resolve(entry).is_file()
                except MediaError as err:
                    raise SchemaError(
                        str(err), source=path, index=index, record_id=rec["id"], field=field
                    ) from err
                if not found:
                    reason = f"{key} file not found: {media.resolve(entry)}"
                    raise SchemaError(reason, source=path, index=index, record_id=rec["id"], field=field)
    return records


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON through a temporary file and ``os.replace``, so readers never see a half-written file."""
    _write_text_atomic(Path(path), json.dumps(data, ensure_ascii=False, indent=1) + "\n")


def save_llava_json(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Validate and write records atomically: a ``.json`` list with one record per line, or ``.jsonl``."""
    path = Path(path)
    records = list(records)
    for index, rec in enumerate(records):
        validate_record(rec, index=index, source=path)
    lines = [json.dumps(rec, ensure_ascii=False) for rec in records]
    if path.suffix == ".jsonl":
        text = "".join(line + "\n" for line in lines)
    else:
        text = "[\n" + ",\n".join(lines) + "\n]\n" if lines else "[]\n"
    _write_text_atomic(path, text)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write through a temporary file in the same folder and ``os.replace`` it into place.

    The temporary name is unique per process and thread, so parallel writers never share one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))
