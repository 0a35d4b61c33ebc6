"""The run directory's policy: who may write it, whether a run continues or starts over, what is kept.

One process owns a run directory (an fcntl lock the kernel releases when the process dies; under torchrun
rank 0 takes it for the job). Opening first finishes what a killed process left half-done (`_recover`), then
decides where training starts:

- a new run: the directory must hold no checkpoints (else --resume or --fresh is required);
- `resume="auto"`: the newest checkpoint whose checksums hold; none -> a new run, the previous run's logs,
  config and tokenizer kept aside as --fresh keeps them;
- `resume=PATH`: that checkpoint, refused while this run has newer valid checkpoints (see below);
- `fresh=True`: the previous run is moved aside into `RUN/.previous-run/` and deleted only once the new run
  has written its first checkpoint, so a new run that fails early loses nothing (the log says how to
  move it back).

`--resume auto` and pruning rank checkpoints by step, so a checkpoint newer than the one training continues
from would outrank everything the continued run writes: a later `--resume auto` would load it (the new work
silently lost), and with keep_checkpoints=1 each new checkpoint would be pruned as soon as written. So a
newer checkpoint that fails verification is renamed out of the checkpoint namespace (`step_N.corrupt`, kept
for the user to inspect or delete), and an explicit resume from an older step while newer valid ones exist
is refused before anything is touched.

Whenever training continues from step N, metrics.jsonl and samples.txt keep only rows up to N (a run killed
after its last checkpoint logged steps that will be trained again); a run starting over empties them.
The caller validates data, config and tokenizer before `open`: nothing here runs before the run is known
to be startable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from .. import atomic
from ..config import RunConfig
from ..errors import UserError
from ..layout import (CHECKPOINTS_DIR, METRICS_FILE, PLOT_FILE, RUN_CONFIG_FILE, SAMPLES_FILE, STATE_FILE,
                      TOKENIZER_DIR, list_checkpoints, verify_checkpoint)
from ..outputs import RUN, Inputs, OutputKind, check_output
from ..resolve import read_run_config
from ..runlock import DirectoryLock
from .checkpoint import check_resume_state, model_config_differences, remove_partial_saves
from .metrics import truncate_metrics
from .samples import truncate_samples

PREVIOUS_RUN_DIR = ".previous-run"  # where --fresh keeps the old run until the new one has a checkpoint
CORRUPT_SUFFIX = ".corrupt"  # an unusable checkpoint newer than the resumed one: step_N.corrupt
_LOG_FILES = (METRICS_FILE, SAMPLES_FILE, PLOT_FILE)
_RUN_FILES = (CHECKPOINTS_DIR, *_LOG_FILES, RUN_CONFIG_FILE, TOKENIZER_DIR)
# Temporaries in the run directory's root (gptforge.atomic's names: TMP_PREFIX + name + "." + 8 random
# characters, ".old." before them for the old copy of a directory being replaced), told apart by `_recover`
_MOVING_ASIDE = atomic.TMP_PREFIX + PREVIOUS_RUN_DIR + "."  # being filled, then renamed to .previous-run
_DISCARDING = atomic.TMP_PREFIX + "discard."  # a moved-aside run on its way out
_OURS = re.compile(rf"^{re.escape(atomic.TMP_PREFIX)}"
                   rf"({'|'.join(re.escape(n) for n in (*_RUN_FILES, PREVIOUS_RUN_DIR, 'discard'))})"
                   r"\.(old\.)?[a-z0-9_]{8}$")


class RunDirectory:
    """One run directory, locked while open. `open()` returns the checkpoint to resume from (or None)."""

    def __init__(self, path: str | Path, log: Callable[[str], None]) -> None:
        self.path = Path(path)
        self.log = log
        self.lock = DirectoryLock(self.path, what="run directory", option="--out")
        self.previous: Path | None = None  # the run --fresh moved aside, until the first checkpoint

    def open(self, config: RunConfig, resume: str | None, fresh: bool, kind: OutputKind = RUN,
             inputs: Inputs | None = None) -> Path | None:
        """Lock the directory, finish what a killed process left, and decide where training starts. First of
        all gptforge.outputs decides whether this path may hold this run: never over the run's own data,
        --init or `inputs`, never a folder holding another command's output (prepared data, an export)."""
        reads = {"--data": config.data.path, "--init": config.train.init_from or None, **(inputs or {})}
        check_output(self.path, kind, replace=fresh or resume is not None, inputs=reads)
        self.lock.acquire()
        try:
            self._recover()
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
            self._move_aside(_RUN_FILES, f"starting fresh in {self.path}")
            return None
        if resume is None:
            if existing:
                raise UserError(f"{self.path} already has checkpoints (newest step {existing[-1][0]}); pass "
                                "--resume to continue that run, --fresh to start over, or another --out")
            self._start_logs_over()
            return None
        problems: dict[Path, str | None] = {}
        if resume == "auto":
            path = None
            for _, candidate in reversed(existing):  # newest first; the ones skipped are broken
                problems[candidate] = verify_checkpoint(candidate)
                if problems[candidate] is None:
                    path = candidate
                    break
            if path is None:
                self._set_aside_unusable([(p, why) for p, why in problems.items() if why])
                self._move_aside([name for name in _RUN_FILES if name != CHECKPOINTS_DIR],
                                 f"no valid checkpoint in {self.path}: starting a new run")
                return None
        else:
            path = Path(resume)
            if not (path / STATE_FILE).is_file():
                raise UserError(f"--resume {resume}: not a checkpoint directory (no {STATE_FILE}); pass "
                                "checkpoints/step_N of a run or --resume auto")
        step = check_resume_state(path)["step"]  # before anything is written: a bad state.json is one line
        self._check_same_model(config)
        newer = [p for s, p in existing if s > step and p.resolve() != path.resolve()]
        for other in newer:
            if other not in problems:
                problems[other] = verify_checkpoint(other)
        valid = [p.name for p in newer if problems[p] is None]
        if valid:
            root = self.path / CHECKPOINTS_DIR
            raise UserError(f"--resume {resume}: {root} has newer valid checkpoints ({', '.join(valid)}) that "
                            f"--resume auto and pruning would rank above everything a run continued from step "
                            f"{step} writes; to branch from step {step}, move them out of {root} first, or resume "
                            "into another --out (or start over with --fresh)")
        self._set_aside_unusable([(p, problems[p]) for p in newer])
        return path

    def _set_aside_unusable(self, broken: Sequence[tuple[Path, str | None]]) -> None:
        """Rename checkpoints that fail verification to step_N.corrupt: out of the namespace that
        `--resume auto` and pruning rank by step, but kept (a damaged file may still be worth recovering)."""
        for path, problem in broken:
            target = path.with_name(path.name + CORRUPT_SUFFIX)
            n = 1
            while target.exists():
                target = path.with_name(f"{path.name}{CORRUPT_SUFFIX}.{n}")
                n += 1
            path.rename(target)
            self.log(f"checkpoint {path} is unusable ({problem}): renamed to {target.name}, out of the way of "
                     "--resume auto and of pruning (delete it once you no longer need it)")

    def _check_same_model(self, config: RunConfig) -> None:
        saved = self.path / RUN_CONFIG_FILE
        if saved.is_file():
            differing = model_config_differences(read_run_config(saved).model.to_dict(), config.model.to_dict())
            if differing:
                raise UserError(f"cannot resume {self.path} with a different model shape ({differing}); drop the "
                                "model overrides, or start a new run with another --out")

    def _move_aside(self, names: Sequence[str], why: str) -> None:
        """Starting over: keep the previous run's `names` in RUN/.previous-run until the new run has a checkpoint.

        They are moved into a temporary directory that is then renamed to .previous-run in one step, so a kill
        part-way never leaves them split between the run directory and .previous-run (where the next start-over,
        taking .previous-run for the run worth keeping, would delete the rest): the next `open` puts the
        temporary directory's contents back (`_recover`)."""
        previous = self.path / PREVIOUS_RUN_DIR
        if previous.exists() and not list_checkpoints(self.path):
            # an earlier start-over stopped before its first checkpoint: the run worth keeping is still aside,
            # and the logs here are that attempt's
            self._start_logs_over()
        else:
            present = [name for name in names if (self.path / name).exists()]
            if not present:
                self.log(why)
                return
            moving = Path(tempfile.mkdtemp(prefix=_MOVING_ASIDE, dir=self.path))
            for name in present:
                (self.path / name).rename(moving / name)
            if previous.exists():  # older still: the run here has had checkpoints of its own since
                self._discard(previous)
            moving.rename(previous)
            atomic.fsync_dir(self.path)
        self.previous = previous
        self.log(f"{why}: the previous run is kept in {previous} until the new run writes its first checkpoint "
                 f"(to get it back before then, move its contents into {self.path})")

    def _discard(self, directory: Path) -> None:
        """Delete `directory` after renaming it to a temporary name, so a kill part-way through the deletion
        never leaves a half-deleted directory under its real name."""
        doomed = Path(tempfile.mkdtemp(prefix=_DISCARDING, dir=self.path))
        os.replace(directory, doomed / "x")
        shutil.rmtree(doomed, ignore_errors=True)

    def discard_previous(self) -> None:
        """Called once the new run's first checkpoint exists: the moved-aside run can go."""
        if self.previous is not None:
            if self.previous.exists():
                self._discard(self.previous)
            self.previous = None

    def _recover(self) -> None:
        """Finish what a killed process left half-done in the run directory's root (called under the lock, so
        no other writer is at work): an interrupted move aside is undone, its files put back; the old copy of
        a directory whose replacement was cut between its two renames (gptforge.atomic) goes back to its name;
        every other `.tmp-*` is an unfinished write or deletion and is removed."""
        for child in sorted(self.path.iterdir()):
            ours = _OURS.match(child.name)
            if not ours or child.is_symlink():
                continue
            name, old_copy = ours.group(1), ours.group(2)
            if name == PREVIOUS_RUN_DIR and not old_copy and child.is_dir():
                self._put_back(child)
                continue
            if old_copy and (child / "x").exists() and not (self.path / name).exists():
                os.replace(child / "x", self.path / name)
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)

    def _put_back(self, moving: Path) -> None:
        for entry in sorted(moving.iterdir()):
            if (self.path / entry.name).exists():
                raise UserError(f"{moving} holds {entry.name} from a start-over that was interrupted, and "
                                f"{self.path / entry.name} exists too; keep the one you want in {self.path}, "
                                f"remove {moving}, and start again")
            entry.rename(self.path / entry.name)
        moving.rmdir()
        self.log(f"put back the previous run's files that an interrupted start-over had begun to move out of "
                 f"{self.path}")

    def _start_logs_over(self) -> None:
        for name in _LOG_FILES:
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
