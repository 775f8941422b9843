"""Human-readable output: metrics tables and sample answers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console()


def print_metrics(metrics: dict[str, Any], title: str = "metrics") -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in (
        "qa_exact_match",
        "caption_object_recall",
        "grounding_acc@0.5",
        "grounding_miou",
        "describe_exact_match",
        "exact_match",
    ):
        if key in metrics:
            table.add_row(key, f"{metrics[key]:.3f}")
    for qa_type, value in metrics.get("qa_by_type", {}).items():
        table.add_row(escape(f"  qa[{qa_type}]"), f"{value:.3f}")
    if "counts" in metrics:
        table.add_row("records", ", ".join(f"{k} {v}" for k, v in metrics["counts"].items()))
    console.print(table)


def print_samples(rows: Sequence[dict[str, Any]], base_dir: str, k: int = 6) -> None:
    table = Table(title="sample answers (test split)")
    for col in ("image", "question", "answer", "prediction"):
        table.add_column(col, overflow="fold")
    seen_tasks: dict[str, int] = {}
    for row in rows:
        if "prediction" not in row:
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
