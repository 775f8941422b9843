"""Inputs a long job could not use: one record per bad input, with the file and the reason, never repeated.

A bad image, a record that breaks the schema or that cannot be tokenized never stops a run: it becomes a
``Skip`` (which split, which record, which file, why). ``SkipLog`` keeps each one once per run (a record
that fails every epoch is written once; a resumed run knows what is already written), appends them to a
JSONL file, says so on the console for the first few, and summarises them. When nothing at all is usable,
``NothingUsable`` stops the job with the first reasons instead of training on nothing or scoring zero.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .media import MediaError
from .schema import SchemaError

log = logging.getLogger("mm.data")
ECHO = 3  # skips of a split that are also printed as they happen


class NothingUsable(ValueError):
    """Every input of a dataset was skipped; the message gives the count and the first reasons."""


@dataclass(frozen=True)
class Skip:
    split: str  # train / val / eval
    index: int | None  # the record's position in its file
    id: Any
    reason: str
    path: str | None = None  # the media file, when a file was the problem

    @classmethod
    def from_error(cls, split: str, index: int | None, record_id: Any, err: Exception) -> Skip:
        if isinstance(err, MediaError):
            return cls(split, index, record_id, err.reason, err.path)
        if isinstance(err, SchemaError):
            reason = f"{err.field}: {err.reason}" if err.field else err.reason
            return cls(split, err.index if index is None else index, err.record_id or record_id, reason)
        return cls(split, index, record_id, str(err))

    @property
    def key(self) -> tuple[str, Any]:
        """What makes two skips the same input: its split and record (by position, else by id)."""
        return (self.split, self.index if self.index is not None else self.id)

    def describe(self) -> str:
        where = f"record {self.index}" if self.index is not None else "record"
        if self.id is not None:
            where += f" (id {self.id!r})"
        return f"{where}: {self.path + ': ' if self.path else ''}{self.reason}"


class SkipLog:
    """Skips of one run, by (split, index), appended to ``path`` (JSONL) if given."""

    def __init__(self, path: Path | None = None):
        self.path = path
        self.skips: dict[tuple[str, Any], Skip] = {}
        if path is not None and path.is_file():  # a resumed run: what is already written stays written once
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    skip = Skip(**row)
                except (ValueError, TypeError):
                    continue  # a line cut by a kill
                self.skips[skip.key] = skip

    def add(self, skip: Skip) -> bool:
        """Record ``skip`` unless this input is already recorded; returns whether it was new."""
        if skip.key in self.skips:
            return False
        self.skips[skip.key] = skip
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(asdict(skip)) + "\n")
        if self.count(skip.split) <= ECHO:
            log.warning("skipped %s input %s", skip.split, skip.describe())
        return True

    def extend(self, skips: Iterable[Skip]) -> None:
        for skip in skips:
            self.add(skip)

    def of(self, split: str) -> list[Skip]:
        """The skips of ``split`` in file order."""
        found = [s for s in self.skips.values() if s.split == split]
        return sorted(found, key=lambda s: (s.index is None, s.index if s.index is not None else 0))

    def count(self, split: str) -> int:
        return sum(1 for s in self.skips.values() if s.split == split)

    def summary(self, split: str, total: int | None = None, first: int = ECHO) -> str:
        """``skipped 3 of 40 train records (2 file not found, 1 ...): record 4 (id 'a'): ...; ...``."""
        skips = self.of(split)
        if not skips:
            return f"no {split} record skipped"
        of = f" of {total}" if total is not None else ""
        kinds = sorted(
            Counter(s.reason.split(":")[0] for s in skips).items(), key=lambda kv: (-kv[1], kv[0])
        )[:3]
        reasons = ", ".join(f"{n} {kind}" for kind, n in kinds)
        listed = "; ".join(s.describe() for s in skips[:first])
        more = f"; and {len(skips) - first} more" if len(skips) > first else ""
        where = f" (all in {self.path})" if self.path is not None else ""
        return f"skipped {len(skips)}{of} {split} records ({reasons}){where}: {listed}{more}"
