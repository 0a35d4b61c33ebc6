"""Training: the loop (`train`, `Trainer`) composed of small parts (run directory, checkpointer, validator,
progress log, stop votes, batch sources), AdamW set-up, LR schedules, atomic checkpoints with exact resume,
metrics and plots, and the offline demo.

Light on import: the trainer (torch, matplotlib) loads only when one of its names is used.
"""

from __future__ import annotations

import sys
import types
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


class _TrainPackage(types.ModuleType):
    """`gptforge.train` is this subpackage and, called, the training function, so `from gptforge import train;
    train(config)` and `gptforge.train.trainer` both work whatever was imported first (a submodule import
    rebinds the parent's attribute to the module, which would otherwise shadow a function of the same name)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from .trainer import train
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _TrainPackage
