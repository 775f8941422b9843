"""The run folder and its checkpoints: never collide with an earlier run, never lose a complete checkpoint.

A checkpoint is written into ``step_N.tmp`` and renamed to ``step_N`` once complete, with a manifest of its
files and their sizes written last; ``latest`` names the newest. Resuming takes the newest checkpoint whose
manifest matches its files (a kill mid-write, a truncated copy or a deleted folder is passed over, and said
so), ordered by step number, not by name. Pruning keeps the newest ``keep`` by step. A new run refuses a
folder that holds an earlier run's checkpoints or logs unless told to resume or overwrite.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from data.schema import write_bytes_atomic, write_json_atomic

from .build import ModelLoadError, check_safetensors

log = logging.getLogger("mm.train")
CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "checkpoint.json"
RUN_ARTIFACTS = (CHECKPOINTS, "model", "train_log.jsonl", "skipped.jsonl", "tensorboard")
_STEP = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint is missing or corrupt; the message names it and the file, and what to do instead."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int

    @classmethod
    def at(cls, path: str | Path) -> Checkpoint:
        """The checkpoint folder ``path`` (``step_N``), e.g. from ``--resume-from``."""
        path = Path(path)
        match = _STEP.match(path.name)
        if match is None:
            raise CheckpointError(f"{path}: not a checkpoint folder (expected a name like step_0000040)")
        return cls(path, int(match.group(1)))


def claim_output_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Make ``out`` ready for a run: a new run may not mix with an earlier run's checkpoints and logs."""
    found = [name for name in RUN_ARTIFACTS if (out / name).exists()]
    if found and overwrite:
        for name in found:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        log.warning("--overwrite: removed the earlier run's %s from %s", ", ".join(found), out)
    elif found and not resume:
        raise CheckpointError(
            f"{out} already holds a run ({', '.join(found)}): pass --resume to continue it, "
            "--overwrite to delete it and start over, or choose another train.output_dir"
        )
    out.mkdir(parents=True, exist_ok=True)


class CheckpointManager:
    def __init__(self, output_dir: Path, keep: int = 2):
        self.root = Path(output_dir) / CHECKPOINTS
        self.keep = max(1, keep)

    # -- reading --------------------------------------------------------------------------------------
    def checkpoints(self) -> list[Checkpoint]:
        """Every ``step_N`` folder (complete or not), oldest first by step number."""
        if not self.root.is_dir():
            return []
        found = [
            Checkpoint(p, int(m.group(1)))
            for p in self.root.iterdir()
            if p.is_dir() and (m := _STEP.match(p.name))
        ]
        return sorted(found, key=lambda c: c.step)

    def problem(self, ckpt: Checkpoint) -> str | None:
        """Why ``ckpt`` cannot be resumed from (naming the file), or None if it is complete."""
        manifest = ckpt.path / MANIFEST
        if not manifest.is_file():
            return f"{manifest}: missing (the checkpoint was not completely written)"
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError, TypeError) as err:
            return f"{manifest}: unreadable ({err})"
        for name, size in files.items():
            path = ckpt.path / name
            if not path.is_file():
                return f"{path}: missing"
            if path.stat().st_size != size:
                return f"{path}: {path.stat().st_size} bytes, {size} were written (truncated or replaced)"
            if path.suffix == ".safetensors":
                try:
                    check_safetensors(path)
                except ModelLoadError as err:
                    return str(err)
        return None

    def newest_valid(self, before: int | None = None) -> Checkpoint | None:
        """The newest complete checkpoint (below step ``before`` if given); incomplete ones are reported."""
        for ckpt in reversed(self.checkpoints()):
            if before is not None and ckpt.step >= before:
                continue
            problem = self.problem(ckpt)
            if problem is None:
                return ckpt
            log.warning("checkpoint %s is not usable: %s", ckpt.path.name, problem)
        return None

    def resume_point(self) -> Checkpoint | None:
        """The checkpoint ``--resume`` continues from: the newest complete one, said out loud."""
        ckpt = self.newest_valid()
        pointer = self.root / LATEST
        named = pointer.read_text().strip() if pointer.is_file() else None
        if ckpt is not None:
            note = "" if named in (None, ckpt.path.name) else f" ('{LATEST}' named {named})"
            log.warning("resuming from %s, the newest complete checkpoint%s", ckpt.path, note)
        return ckpt

    def previous_hint(self, ckpt: Checkpoint) -> str:
        """A sentence offering the newest complete checkpoint before ``ckpt``."""
        previous = self.newest_valid(before=ckpt.step)
        if previous is None:
            return "no earlier complete checkpoint exists: --overwrite starts the run again"
        return f"the previous complete checkpoint is {previous.path}: continue from it with --resume-from"

    # -- writing --------------------------------------------------------------------------------------
    def begin(self, step: int) -> Path:
        """A clean temporary folder for the checkpoint of ``step`` (left-overs of a killed write go)."""
        tmp = self.root / f"step_{step:07d}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, step: int) -> Path:
        """Seal the temporary folder (manifest last), rename it into place, point ``latest`` at it, prune."""
        name = f"step_{step:07d}"
        tmp, final = self.root / f"{name}.tmp", self.root / name
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        write_json_atomic(tmp / MANIFEST, {"step": step, "files": files})
        if final.exists():  # a step of this run written before a kill, and now again
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_bytes_atomic(self.root / LATEST, name.encode())
        self.prune(step)
        return final

    def prune(self, current: int) -> None:
        """Keep the ``keep`` newest checkpoints up to ``current`` by step; stale ``.tmp`` folders go too."""
        kept = [c for c in self.checkpoints() if c.step <= current]
        for ckpt in kept[: -self.keep]:
            shutil.rmtree(ckpt.path, ignore_errors=True)
        for tmp in self.root.glob("step_*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
