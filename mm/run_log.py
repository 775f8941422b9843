"""``train_log.jsonl`` and tensorboard: appended every step, cut back to the resumed step on resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data.schema import write_bytes_atomic


class RunLog:
    """``train_log.jsonl`` (+ tensorboard), cut back to ``resumed_step`` so no step is logged twice."""

    def __init__(self, out: Path, enabled: bool, resumed_step: int):
        self.path, self.enabled, self.tb = out / "train_log.jsonl", enabled, None
        if not enabled:
            return
        if self.path.is_file():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut by a kill
                if row.get("step", 0) <= resumed_step and not row.get("final"):
                    keep.append(line + "\n")
            write_bytes_atomic(self.path, "".join(keep).encode())
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=resumed_step + 1)
        except ImportError:  # tensorboard is optional at run time
            self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(k, v, record.get("step", 0))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
