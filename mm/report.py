"""Human-readable output: metrics tables and sample answers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console()


INFO_KEYS = ("counts", "scored", "skipped", "train_minutes", "total_minutes", "blind", "model_dir")


def print_metrics(metrics: dict[str, Any], title: str = "metrics") -> None:
    """Every metric (breakdowns indented under their name), then how many records were scored / skipped."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if key in INFO_KEYS:
            continue
        if isinstance(value, dict):
            for part, v in value.items():
                table.add_row(escape(f"  {key}[{part}]"), f"{v:.3f}")
        elif isinstance(value, float) and key.startswith("kv_bytes"):
            table.add_row(escape(key), f"{value / 1024:.1f} KiB")
        elif isinstance(value, float):
            table.add_row(escape(key), f"{value:.3f}")
    if "counts" in metrics:
        table.add_row("records", ", ".join(f"{k} {v}" for k, v in metrics["counts"].items()))
    if "skipped" in metrics:
        table.add_row("scored / skipped", f"{metrics.get('scored', 0)} / {metrics['skipped']}")
    console.print(table)


def print_samples(rows: Sequence[dict[str, Any]], base_dir: str, k: int = 6) -> None:
    table = Table(title="sample answers (test split)")
    for col in ("image", "question", "answer", "prediction"):
        table.add_column(col, overflow="fold")
    seen_tasks: dict[str, int] = {}
    for row in rows:
        if "prediction" not in row or "skipped" in row:
            continue
        key = row.get("qa_type", row.get("task", ""))
        if seen_tasks.get(key, 0) >= 1 or len(table.rows) >= k:
            continue
        seen_tasks[key] = seen_tasks.get(key, 0) + 1
        question = row["question"].replace("<image>\n", "")
        table.add_row(
            *(escape(x) for x in (f"{base_dir}/{row['image']}", question, row["answer"], row["prediction"]))
        )
    console.print(table)
