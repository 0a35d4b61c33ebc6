"""Validation during training: held-out loss on the first windows of the val split, plus benchmark hooks.

On plain token data the loss is `gptforge.evals.val.score_windows`, the function `gptforge eval --task val`
uses, over non-overlapping windows of `seq_len` tokens from the start of the val split (a leading end-of-text
token conditions the first); see gptforge/evals/val.py for when the two numbers are equal. On masked data
(SFT's conversations) it is the mean loss over the scored targets (y != -100) of the val split's first
batches, from the data's own batch source. `eval_batches` bounds
the pass (it is the total over ranks: rank r scores windows r, r + ranks, ..., the same number on every
rank, because FSDP2 gathers weights collectively), so even the first evaluation of a large model is short;
a pass that takes more than a few seconds reports its progress, and a single-process run stops it at
Ctrl-C rather than finishing it first.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np
import torch

from ..errors import UserError
from ..evals.val import score_windows, with_eot, windows
from . import distributed as D
from .batches import IGNORE_INDEX, BatchSource, data_kind, open_batch_source
from .precision import autocast

if TYPE_CHECKING:
    from ..model import GPT
    from ..tokenizer import Tokenizer

# An evaluation hook: called at each eval step with the (eval-mode) model and the step; the numbers it
# returns are added to that step's row in metrics.jsonl.
EvalCallback = Callable[["GPT", int], dict[str, float]]
PROGRESS_AFTER_S = 5.0  # a validation pass slower than this says how far it is


class ValidationInterrupted(Exception):
    """Raised inside a validation pass when the run is asked to stop (single process only)."""


def read_split_prefix(data_dir: str | Path, split: str, n_tokens: int) -> np.ndarray:
    """The first `n_tokens` tokens of `split` (fewer when the split is shorter), read from its shards."""
    from ..data.prepare import read_manifest
    from ..data.shards import open_shard

    data_dir = Path(data_dir)
    entries = read_manifest(data_dir).get("splits", {}).get(split, {}).get("shards", [])
    parts, have = [], 0
    for entry in entries:
        if have >= n_tokens:
            break
        shard = open_shard(data_dir / entry["file"])
        take = np.asarray(shard[: n_tokens - have], dtype=np.int64)
        parts.append(take)
        have += take.size
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class Validator:
    """Val loss of a model over the first `max_windows` windows of `seq_len` tokens of the val split."""

    def __init__(self, data_dir: str | Path, seq_len: int, batch_size: int, max_windows: int, eot_id: int | None,
                 device: torch.device, precision: str, rank: int = 0, world_size: int = 1,
                 callbacks: Iterable[EvalCallback] = (), log: Callable[[str], None] = print,
                 should_stop: Callable[[], bool] = lambda: False, split: str = "val") -> None:
        self.seq_len, self.batch_size = seq_len, batch_size
        self.device, self.precision = device, precision
        self.rank, self.world_size = rank, world_size
        self.callbacks = list(callbacks)
        self.log = log
        self.should_stop = should_stop
        self.stream: np.ndarray | None = None
        self.spans: list[tuple[int, int, int]] = []
        self.masked: BatchSource | None = None
        self.masked_batches = 0
        if data_kind(data_dir) != "tokens":
            self._open_masked(data_dir, split, max_windows)
            return
        if eot_id is None:
            self.problem = "the data has no tokenizer to say what end-of-text is"
            return
        tokens = read_split_prefix(data_dir, split, max_windows * seq_len)
        self.stream = with_eot(tokens, eot_id)
        full = [w for w in windows(len(tokens), seq_len, seq_len) if w[2] - w[1] == seq_len] if tokens.size else []
        per_rank = min(-(-max_windows // world_size), len(full) // world_size)
        self.spans = [full[rank + world_size * i] for i in range(per_rank)]
        self.problem = None if self.spans else (f"the {split} split of {data_dir} has fewer than {world_size} "
                                                f"window(s) of {seq_len} tokens")

    def _open_masked(self, data_dir: str | Path, split: str, max_rows: int) -> None:
        try:
            self.masked = open_batch_source(data_dir, split, self.seq_len, self.batch_size, rank=self.rank,
                                            world_size=self.world_size)
        except UserError as e:
            self.problem = str(e)
            return
        per_rank = min(-(-max_rows // self.world_size), self.masked.sequences_per_epoch // self.world_size)
        self.masked_batches = -(-per_rank // self.batch_size)
        self.problem = None if per_rank else f"the {split} split of {data_dir} is empty"

    @property
    def n_windows(self) -> int:
        """Windows scored per pass, all ranks together."""
        return len(self.spans) * self.world_size

    @torch.no_grad()
    def __call__(self, model: "GPT", step: int) -> dict[str, float]:
        """val_loss and val_ppl (when the split has data) plus every callback's numbers; {} if interrupted."""
        results: dict[str, float] = {}
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                if self.spans:
                    results.update(self._loss(model))
                elif self.masked is not None and self.masked_batches:
                    results.update(self._masked_loss(model))
                for callback in self.callbacks:
                    results.update(callback(model, step))
        except ValidationInterrupted:
            self.log(f"validation at step {step} stopped by the interrupt; not logged")
            return {}
        finally:
            model.train(was_training)
        return results

    def _loss(self, model: "GPT") -> dict[str, float]:
        start, done, last_report = time.perf_counter(), 0, 0.0
        total = len(self.spans)

        def progress(n: int) -> None:
            nonlocal done, last_report
            done += n
            if self.world_size == 1 and self.should_stop():
                raise ValidationInterrupted
            now = time.perf_counter() - start
            if now > PROGRESS_AFTER_S and now - last_report > PROGRESS_AFTER_S and done < total:
                last_report = now
                self.log(f"validating: {done}/{total} windows, {now:.0f} s")

        with autocast(self.device, self.precision):
            nats, n_tokens, _ = score_windows(model, self.stream, self.spans, self.batch_size, progress)
        sums = D.all_reduce_sum(torch.tensor([nats, float(n_tokens)], dtype=torch.float64, device=self.device))
        loss = float(sums[0] / sums[1])
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


    def _masked_loss(self, model: "GPT") -> dict[str, float]:
        """Mean loss over the scored targets of the first batches (every rank runs the same number)."""
        nats = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, (x, y) in enumerate(self.masked.iter_sequential(self.batch_size)):
            if i >= self.masked_batches:
                break
            if self.world_size == 1 and self.should_stop():
                raise ValidationInterrupted
            x, y = x.to(self.device), y.to(self.device)
            scored = int((y != IGNORE_INDEX).sum())
            with autocast(self.device, self.precision):  # every rank runs every forward (FSDP2 gathers)
                _, loss = model(x, y, return_logits=False)
            if scored:  # the loss is the mean over scored targets: weight it by their number
                nats += loss.double() * scored
                count += scored
        sums = D.all_reduce_sum(torch.stack([nats, count]))
        if sums[1] == 0:
            return {}
        loss = float(sums[0] / sums[1])
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


def benchmark_callback(tasks: list[str], eval_data: list[str], limit: int | None, tokenizer: "Tokenizer | None",
                       device: torch.device, precision: str, batch_size: int) -> EvalCallback:
    """Scores `train.eval_tasks` (gptforge.evals) at every eval step; their data is read and checked now, so a
    wrong path fails before training rather than at the first evaluation."""
    from ..evals import runner

    if tokenizer is None:
        raise UserError("train.eval_tasks needs the data's tokenizer, and this run has none")
    checked = runner.check_tasks(list(tasks))
    data = runner.parse_data(list(eval_data), checked, option="train.eval_data")
    for task in checked:
        runner.load_task(task, data.get(task), limit)

    def callback(model: "GPT", step: int) -> dict[str, float]:
        with autocast(device, precision):
            return runner.run_eval_tasks(model, tokenizer, checked, data, limit, batch_size)
    return callback
