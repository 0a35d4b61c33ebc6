"""The run directory's policy: who may write it, whether a run continues or starts over, what is kept.

One process owns a run directory (an fcntl lock the kernel releases when the process dies; under torchrun
rank 0 takes it for the job). Opening decides where training starts:

- a new run: the directory must hold no checkpoints (else --resume or --fresh is required);
- `resume="auto"`: the newest checkpoint whose checksums hold; none -> a new run, and the old logs go;
- `resume=PATH`: that checkpoint;
- `fresh=True`: the previous run is moved aside into `RUN/.previous-run/` and deleted only once the new run
  has written its first checkpoint, so a new run that fails early loses nothing (the log says how to
  move it back).

Whenever training continues from step N, metrics.jsonl and samples.txt keep only rows up to N (a run killed
after its last checkpoint logged steps that will be trained again); a run starting over empties them.
The caller validates data, config and tokenizer before `open`: nothing here runs before the run is known
to be startable.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from .. import atomic
from ..config import RunConfig
from ..errors import UserError
from ..layout import (CHECKPOINTS_DIR, METRICS_FILE, PLOT_FILE, RUN_CONFIG_FILE, SAMPLES_FILE, STATE_FILE,
                      TOKENIZER_DIR, latest_valid_checkpoint, list_checkpoints)
from ..resolve import read_run_config
from ..runlock import DirectoryLock
from .checkpoint import check_resume_state, model_config_differences, remove_partial_saves
from .metrics import truncate_metrics
from .samples import truncate_samples

PREVIOUS_RUN_DIR = ".previous-run"  # where --fresh keeps the old run until the new one has a checkpoint
_RUN_FILES = (CHECKPOINTS_DIR, METRICS_FILE, SAMPLES_FILE, PLOT_FILE, RUN_CONFIG_FILE, TOKENIZER_DIR)


class RunDirectory:
    """One run directory, locked while open. `open()` returns the checkpoint to resume from (or None)."""

    def __init__(self, path: str | Path, log: Callable[[str], None]) -> None:
        self.path = Path(path)
        self.log = log
        self.lock = DirectoryLock(self.path, what="run directory", option="--out")
        self.previous: Path | None = None  # the run --fresh moved aside, until the first checkpoint

    def open(self, config: RunConfig, resume: str | None, fresh: bool) -> Path | None:
        self.lock.acquire()
        try:
            resume_path = self._decide(config, resume, fresh)
            self._write_config(config, resume_path)
        except BaseException:
            self.lock.release()
            raise
        return resume_path

    def close(self) -> None:
        self.lock.release()

    # ---- policy -----------------------------------------------------------------------------------------

    def _decide(self, config: RunConfig, resume: str | None, fresh: bool) -> Path | None:
        existing = list_checkpoints(self.path)
        if fresh:
            self._move_aside()
            return None
        if resume is None:
            if existing:
                raise UserError(f"{self.path} already has checkpoints (newest step {existing[-1][0]}); pass "
                                "--resume to continue that run, --fresh to start over, or another --out")
            self._start_logs_over()
            return None
        if resume == "auto":
            path = latest_valid_checkpoint(self.path, report=self.log)
            if path is None:
                self.log(f"no valid checkpoint in {self.path}: starting a new run")
                self._start_logs_over()
                return None
        else:
            path = Path(resume)
            if not (path / STATE_FILE).is_file():
                raise UserError(f"--resume {resume}: not a checkpoint directory (no {STATE_FILE}); pass "
                                "checkpoints/step_N of a run or --resume auto")
        check_resume_state(path)  # before anything is written: a state.json that cannot resume is one line
        self._check_same_model(config)
        return path

    def _check_same_model(self, config: RunConfig) -> None:
        saved = self.path / RUN_CONFIG_FILE
        if saved.is_file():
            differing = model_config_differences(read_run_config(saved).model.to_dict(), config.model.to_dict())
            if differing:
                raise UserError(f"cannot resume {self.path} with a different model shape ({differing}); drop the "
                                "model overrides, or start a new run with another --out")

    def _move_aside(self) -> None:
        """--fresh: keep the previous run in RUN/.previous-run until the new run has a checkpoint."""
        present = [name for name in _RUN_FILES if (self.path / name).exists()]
        if not present:
            return
        previous = self.path / PREVIOUS_RUN_DIR
        if previous.exists() and not list_checkpoints(self.path):
            # an earlier --fresh stopped before its first checkpoint: the run worth keeping is still aside
            self._start_logs_over()
            shutil.rmtree(self.path / CHECKPOINTS_DIR, ignore_errors=True)
        else:
            shutil.rmtree(previous, ignore_errors=True)
            previous.mkdir()
            for name in present:
                (self.path / name).rename(previous / name)
        self.previous = previous
        self.log(f"starting fresh in {self.path}: the previous run is kept in {previous} until the new run writes "
                 f"its first checkpoint (to get it back before then, move its contents into {self.path})")

    def discard_previous(self) -> None:
        """Called once the new run's first checkpoint exists: the moved-aside run can go."""
        if self.previous is not None:
            shutil.rmtree(self.previous, ignore_errors=True)
            self.previous = None

    def _start_logs_over(self) -> None:
        for name in (METRICS_FILE, SAMPLES_FILE, PLOT_FILE):
            (self.path / name).unlink(missing_ok=True)

    def trim_logs(self, step: int) -> None:
        """Keep metrics and samples rows up to `step` (the checkpoint training continues from)."""
        truncate_metrics(self.path / METRICS_FILE, step)
        truncate_samples(self.path, step)

    # ---- files ------------------------------------------------------------------------------------------

    def _write_config(self, config: RunConfig, resume_path: Path | None) -> None:
        """config.json (resolved) and, for a new run, the data's tokenizer (a resumed run keeps its own)."""
        remove_partial_saves(self.path)
        atomic.write_text(self.path / RUN_CONFIG_FILE, json.dumps(config.to_dict(), indent=2) + "\n")
        source = Path(config.data.path) / TOKENIZER_DIR
        if source.is_dir() and (resume_path is None or not (self.path / TOKENIZER_DIR).is_dir()):
            with atomic.atomic_directory(self.path / TOKENIZER_DIR, overwrite=True) as tmp:
                shutil.copytree(source, tmp, dirs_exist_ok=True)
