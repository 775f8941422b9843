"""The training budget: the learning-rate schedule over steps or wall-clock time, and a progress bar in the
unit of whichever budget will stop the run."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm


@dataclass
class Schedule:
    """Linear warmup, then cosine to ``min_lr_ratio`` over training progress.

    Progress is ``step / max_steps``, or the fraction of the wall-clock budget spent if that is larger, so a
    time-budgeted run still anneals fully and stops on time. Deterministic when no budget is set.
    """

    max_steps: int
    warmup_steps: int
    min_lr_ratio: float
    max_seconds: float | None = None

    def progress(self, step: int, elapsed: float) -> float:
        p = step / max(1, self.max_steps)
        if self.max_seconds:
            p = max(p, elapsed / self.max_seconds)
        return min(1.0, p)

    def factor(self, step: int, elapsed: float) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        p = self.progress(step, elapsed)
        w = self.warmup_steps / max(1, self.max_steps)  # cosine over the progress after warmup
        q = 0.0 if p <= w else min(1.0, (p - w) / max(1e-9, 1 - w))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * q))


class Progress:
    """A bar in the unit of the budget that will stop the run: steps, or minutes when time-budgeted."""

    def __init__(self, schedule: Schedule, state: Any, desc: str, enabled: bool):
        self.schedule, self.state = schedule, state
        self.minutes = schedule.max_seconds / 60 if schedule.max_seconds else None
        if self.minutes:
            fmt = "{l_bar}{bar}| {n:.1f}/{total:.1f} min [{elapsed}<{remaining}{postfix}]"
            self.bar = tqdm(total=self.minutes, desc=desc, bar_format=fmt, disable=not enabled)
        else:
            self.bar = tqdm(total=schedule.max_steps, desc=desc, unit="step", disable=not enabled)
        self.update()

    def update(self, **postfix: str) -> None:
        s = self.state
        if self.minutes:
            self.bar.n = self.schedule.progress(s.step, s.elapsed) * self.minutes
            postfix = {"step": str(s.step), **postfix}
        else:
            self.bar.n = s.step
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
