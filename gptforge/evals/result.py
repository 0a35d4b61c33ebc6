"""What a task hands back: its metrics plus enough provenance to trust them (items, skipped lines, source)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .sources import Skipped


@dataclass
class TaskResult:
    """Metrics of one task (names without the task prefix, e.g. "acc_norm"), how many items were scored,
    what was skipped while reading, where the data came from, and optional per-subject or per-item details."""

    task: str
    metrics: dict[str, float]
    n: int
    source: str
    skipped: Skipped = field(default_factory=Skipped)
    details: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)

    def flat_metrics(self) -> dict[str, float]:
        """Metric names as the trainer logs them: "task/metric"."""
        return {f"{self.task}/{name}": value for name, value in self.metrics.items()}
