"""Training: the loop (`train`, `Trainer`) composed of small parts (run directory, checkpointer, validator,
progress log, stop votes, batch sources), AdamW set-up, LR schedules, atomic checkpoints with exact resume,
metrics and plots, and the offline demo.

The package is a noun (`training`) and the function a verb (`train`), so importing a submodule never
shadows the function. Light on import: the trainer (torch, matplotlib) loads only when one of its names is used.
"""

from __future__ import annotations

from typing import Any

from ..layout import latest_valid_checkpoint

__all__ = ["Trainer", "TrainResult", "latest_valid_checkpoint", "run_demo", "train"]


def __getattr__(name: str) -> Any:
    if name in ("Trainer", "TrainResult", "train"):
        from . import trainer
        return getattr(trainer, name)
    if name == "run_demo":
        from .demo import run_demo
        return run_demo
    raise AttributeError(name)
