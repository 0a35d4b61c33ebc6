"""Present evaluation results: an aligned table for the terminal and a JSON document for tools."""

from __future__ import annotations

import json
import os
from typing import Any

from .. import atomic
from .result import TaskResult

REPORT_VERSION = 1


def format_table(results: list[TaskResult]) -> str:
    """One row per task metric: task, metric, value, items scored, items skipped."""
    rows = [("task", "metric", "value", "n", "skipped")]
    for result in results:
        for name, value in result.metrics.items():
            rows.append((result.task, name, f"{value:.4f}", str(result.n), str(result.skipped.count)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.rjust(w) if i >= 2 else cell.ljust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def to_json(results: list[TaskResult], meta: dict[str, Any] | None = None, samples: bool = False) -> dict[str, Any]:
    """The report document: flat metrics for quick reading, and per task its details and provenance."""
    doc: dict[str, Any] = {"version": REPORT_VERSION, **(meta or {}), "metrics": {}, "tasks": {}}
    for result in results:
        doc["metrics"].update(result.flat_metrics())
        entry: dict[str, Any] = {"metrics": result.metrics, "n": result.n, "source": result.source,
                                 "skipped": result.skipped.count, "skipped_examples": result.skipped.examples,
                                 **result.details}
        if samples:
            entry["samples"] = result.samples
        doc["tasks"][result.task] = entry
    return doc


def write_json(path: str | os.PathLike, doc: dict[str, Any]) -> None:
    atomic.write_text(path, json.dumps(doc, indent=2, sort_keys=False) + "\n")
