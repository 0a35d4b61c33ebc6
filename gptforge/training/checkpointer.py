"""Saving and loading a run's checkpoints, whatever the process layout (one process, DDP or FSDP2).

- one process / DDP: rank 0 writes the single-file layout (checkpoint.py); every rank's full copy is equal.
- FSDP2: every rank writes its shards (dist_checkpoint.py); the last checkpoint of a run is consolidated into
  a model.safetensors so sample / eval / export read the run directly.
- loading takes any layout into any layout (DCP reshards; a single-file checkpoint is sharded while loading).

A failed write (a full disk) is one line naming the checkpoint directory; the previous checkpoint stays the
newest valid one, since every save is built under a temporary name and renamed into place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import ModelConfig
from ..errors import UserError
from ..layout import WEIGHTS_FILE, checkpoint_dir, is_sharded_checkpoint
from . import checkpoint as ckpt
from . import distributed as D
from .dist_checkpoint import consolidate, load_full_into_sharded, load_sharded, save_sharded
from .optim import Optimizers


class Checkpointer:
    """Writes checkpoints of `model` + `optimizer` into `run_dir` (a collective under torchrun)."""

    def __init__(self, run_dir: Path, parallel: str, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer | Optimizers,
                 model_config: ModelConfig, keep: int, log: Callable[[str], None]) -> None:
        self.run_dir = run_dir
        self.parallel = parallel
        self.model = model  # the plain GPT, or the FSDP2-sharded one (never a DDP/compile wrapper)
        self.optimizer = optimizer
        self.model_config = model_config
        self.keep = keep
        self.log = log
        self.last: Path | None = None

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Checkpoint `step` with `state` as its state.json; returns its directory."""
        def failed(e: OSError) -> UserError:
            previous = self.last.name if self.last else "none"
            reason = os.strerror(e.errno) if e.errno else e.strerror or e  # what to do comes after: said once
            return UserError(f"could not write checkpoint {checkpoint_dir(self.run_dir, step)} ({reason}); "
                             f"the previous checkpoint ({previous}) is intact: free disk space, then continue with "
                             "--resume auto")

        def write_full() -> Path:
            try:
                return ckpt.save_checkpoint(self.run_dir, step, D.unwrap(self.model), self.optimizer, state,
                                            keep=self.keep)
            except OSError as e:
                raise failed(e) from None

        if self.parallel == "fsdp":  # every rank writes its own shards
            try:
                path = save_sharded(checkpoint_dir(self.run_dir, step), self.model, self.optimizer, state,
                                    self.model_config)
            except OSError as e:
                raise failed(e) from None
            D.on_main(lambda: ckpt.prune_checkpoints(self.run_dir, self.keep))
        else:  # one process, or DDP's identical full copies: rank 0 writes them
            path = D.on_main(write_full)
        self.last = path
        return path

    def load(self, path: Path) -> dict[str, Any]:
        """Weights and optimizer state from checkpoint `path`; returns its state.json."""
        if is_sharded_checkpoint(path):  # DCP loads (and reshards) into any layout, FSDP2 or full copies
            state = load_sharded(path, self.model, self.optimizer)
        elif self.parallel == "fsdp":  # a single-process / DDP checkpoint, sharded while loading
            state = load_full_into_sharded(path, self.model, self.optimizer)
        else:
            state = ckpt.load_checkpoint(path, self.model, self.optimizer)
        self.last = path
        return state

    def consolidate_last(self) -> None:
        """Give the final sharded checkpoint a model.safetensors, so sample / eval / export read the run."""
        path = self.last
        if self.parallel != "fsdp" or path is None:
            return
        D.on_main(lambda: None if (path / WEIGHTS_FILE).is_file() else consolidate(path))
        self.log(f"consolidated the sharded checkpoint into {path / WEIGHTS_FILE}")

