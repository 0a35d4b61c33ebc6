"""The training loop: batches in, optimizer steps (AdamW, or Muon + AdamW) out, with checkpoints that resume
bit for bit.

`Trainer` composes small parts, each with one job and testable alone:

    RunDirectory   (run_dir.py)      lock, new / resume / fresh policy, config.json, tokenizer, log trimming
    open_batch_source (batches.py)   (x, y) batches from the data directory's kind of data; -100 = not scored
    StepPlan, forward_backward, clip_and_step (step.py)   batch geometry, LR, one optimizer step
    Checkpointer   (checkpointer.py) save / load for one process, DDP or FSDP2
    Validator      (validator.py)    held-out loss (the same function as `gptforge eval --task val`)
    SampleWriter   (samples.py)      text samples into samples.txt
    ProgressLog    (progress.py)     metrics.jsonl rows and console lines, averaged over a window
    StopRules      (stopping.py)     limits and signals, agreed by all ranks
    capture_rng / restore_rng (rng.py)

Everything a step depends on (weights, AdamW moments and Muon's momentum, step and token counters, the batch
source's position, every RNG) is in each checkpoint, and everything else (learning rate, batch size during the
ramp) is a pure function of those counters, so a run killed at any point and resumed produces the same weights
as one that never stopped (on CPU with deterministic settings).

SFT is this loop with another batch source (chosen by the data's manifest) and a RunConfig whose
`train.init_from` names the model to start from.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from ..config import RunConfig
from ..errors import UserError
from ..host_memory import keep_freed_memory
from ..info import flops_per_token, format_group, optimizer_groups
from ..units import human_count
from ..layout import STATE_FILE, TOKENIZER_DIR
from ..model import GPT
from ..outputs import RUN, Inputs, OutputKind
from . import distributed as D
from .batches import RESUME_COMMANDS, data_kind, open_batch_source
from .checkpointer import Checkpointer
from .metrics import MetricsLogger, device_peak_flops, import_backends
from .optim import build_optimizer, set_lr
from .plot import plot_losses
from .precision import resolve_device, resolve_precision
from .progress import ProgressLog, console_log
from .rng import capture_rng, restore_rng, seed_all
from .run_dir import RunDirectory
from .samples import Sampler, SampleWriter
from .startup import check_fits_memory, load_init_weights, load_tokenizer_or_none
from .step import StepPlan, clip_and_step, fit_warmup, forward_backward, is_oom, oom_error
from .stopping import StopRules
from .validator import EvalCallback, Validator, benchmark_callback

__all__ = ["Counters", "Trainer", "TrainResult", "train"]


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    stopped: str  # "max_steps" | "max_tokens" | "max_time" | "interrupted"
    train_loss: float | None
    val_loss: float | None
    checkpoint: Path | None
    resumed_from: int | None


@dataclass
class Counters:
    """Where the run is; saved in every checkpoint's state.json."""

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    skipped_steps: int = 0
    bad_in_row: int = 0


class Trainer:
    """Owns one run: model, optimizer, batch source, run directory; `fit()` trains until a stop rule fires.

    `resume`: None (the run directory must have no checkpoints), "auto" (newest valid checkpoint, or a new run
    when there is none) or a checkpoint directory. `fresh=True` starts over, keeping the previous run aside
    until the first new checkpoint exists. Data (its token ids against the model's vocabulary too), tokenizer,
    memory, evaluation and metrics settings are all checked before the run directory is touched.
    """

    def __init__(self, config: RunConfig, resume: str | None = None, fresh: bool = False,
                 eval_callbacks: Iterable[EvalCallback] = (), log: Callable[[str], None] | None = None,
                 init_model: Callable[[GPT], None] | None = None, sampler: Sampler | None = None,
                 run_kind: OutputKind = RUN, inputs: Inputs | None = None) -> None:
        """`init_model(model)` sets a new run's initial weights in place (SFT: the base model's plus the chat
        markers' new rows); `sampler` writes samples.txt's texts instead of `train.sample_prompts`.
        `run_kind` and `inputs` (what the run reads besides its data and --init, e.g. sft's base model) are
        for gptforge.outputs, which decides whether the run directory may be opened at all."""
        tc = config.train
        if not config.data.path:
            raise UserError("no training data named: pass --data DIR (a `gptforge prepare` output) or --set "
                            "data.path=DIR; `gptforge train` with no arguments runs the demo on its own data")
        self.log = log or console_log()
        # Under torchrun: join the process group; a single process is rank 0 of 1 with no group.
        self._owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        self.dist = D.init_distributed(tc.device)
        self.rank, self.world_size, self.is_main = self.dist.rank, self.dist.world_size, self.dist.is_main
        if not self.is_main:
            self.log = lambda msg: None  # rank 0 speaks for the job
        self.parallel = D.resolve_parallel(tc.parallel, self.world_size)
        self.device = self.dist.device if self.dist.distributed else resolve_device(tc.device)
        self.precision = resolve_precision(tc.precision, self.device)
        _configure_torch(self.device, tc.deterministic)

        # ---- everything checked before the run directory is touched ----
        self.seq_len = config.seq_len
        if self.seq_len > config.model.block_size:
            raise UserError(f"train.seq_len={self.seq_len} exceeds model.block_size={config.model.block_size}; "
                            "lower train.seq_len or raise model.block_size")
        check_fits_memory(config.model, self.world_size, self.parallel, self.device)
        self.plan = StepPlan.of(tc, self.seq_len, self.world_size)
        tc, warmup_note = fit_warmup(tc, self.plan.total_steps)
        if warmup_note:
            self.log(warmup_note)
            config = RunConfig(model=config.model, train=tc, data=config.data)
            self.plan = StepPlan.of(tc, self.seq_len, self.world_size)
        self.config, self.tc = config, tc
        self.batches = open_batch_source(config.data.path, "train", self.seq_len, tc.micro_batch_size,
                                         seed=config.data.seed, rank=self.rank, world_size=self.world_size,
                                         vocab_size=config.model.vocab_size)
        self.resume_command = RESUME_COMMANDS[data_kind(config.data.path)]
        data_tokenizer = load_tokenizer_or_none(Path(config.data.path) / TOKENIZER_DIR, strict=True)
        callbacks = list(eval_callbacks)
        if tc.eval_tasks:
            callbacks.append(benchmark_callback(tc.eval_tasks, tc.eval_data, tc.eval_limit, data_tokenizer,
                                                self.device, self.precision, tc.micro_batch_size))
        # an explicit checkpoint never needs them; "auto" may find none and start new
        init_state = (load_init_weights(tc.init_from, config.model)
                      if tc.init_from and resume in (None, "auto") else None)

        # ---- the run directory (rank 0 alone touches it; every rank learns where to start, or its error) ----
        self.run_dir = RunDirectory(tc.out_dir, self.log)

        def open_run_dir() -> Path | None:
            import_backends(tc.tensorboard, tc.wandb)  # missing packages first; rank 0 alone logs to them
            return self.run_dir.open(config, resume, fresh, run_kind, inputs)

        resume_path = D.on_main(open_run_dir)
        try:
            if resume_path is not None:
                init_state = None  # the checkpoint's weights win
            self._build(config, init_state, init_model if resume_path is None else None)
            self.counters = Counters()
            self.resumed_from: int | None = None
            if resume_path is not None:
                self._restore(resume_path)
            elif init_state is not None:
                self.log(f"starting from the weights of {tc.init_from}")
            if tc.compile:
                self.model = torch.compile(self.model)
            # the run's own tokenizer: the data's for a new run, the one it was trained with when resumed
            self.tokenizer = load_tokenizer_or_none(self.run_dir.path / TOKENIZER_DIR, strict=False, log=self.log)
            self.stop = StopRules(tc, self.world_size, self.is_main, self.device, self.log)
            eot = self.tokenizer.eot_id if self.tokenizer is not None else None
            self.validator = Validator(config.data.path, self.seq_len, tc.micro_batch_size,
                                       tc.eval_batches * tc.micro_batch_size, eot, self.device, self.precision,
                                       self.rank, self.world_size, callbacks, self.log,
                                       should_stop=lambda: self.stop.signal is not None)
            if self.validator.problem:
                self.log(f"warning: no validation loss: {self.validator.problem}")
            self.samples = SampleWriter(self.run_dir.path, self.tokenizer, tc.sample_prompts, tc.sample_tokens,
                                        tc.sample_temperature, tc.sample_top_k, tc.seed, self.device,
                                        self.precision, self.parallel == "fsdp", self.is_main, sampler)
        except BaseException:
            self.run_dir.close()
            raise

    def _build(self, config: RunConfig, init_state: dict[str, torch.Tensor] | None,
               init_model: Callable[[GPT], None] | None) -> None:
        """Model (same initial weights on every rank), its DDP/FSDP2 form, optimizer, checkpointer, progress."""
        tc = config.train
        seed_all(tc.seed)

        def initialised() -> GPT:
            model = GPT(config.model)
            if init_state is not None:
                model.load_state_dict(init_state)
            if init_model is not None:
                init_model(model)
            return model

        if self.parallel == "fsdp":  # built directly as shards: never whole on one GPU
            self.raw_model = D.build_fsdp_model(lambda: GPT(config.model), self.dist, self.precision,
                                                tc.activation_checkpointing,
                                                initial_state=initialised().state_dict()
                                                if (init_state is not None or init_model) and self.is_main else None)
            self.model: torch.nn.Module = self.raw_model
        else:
            self.raw_model = initialised().to(self.device)
            self.model = D.wrap_model(self.raw_model, self.dist, self.parallel, self.precision,
                                      tc.activation_checkpointing)
        self.optimizer = build_optimizer(self.raw_model, tc, self.device)  # after FSDP2 has sharded
        if self.world_size > 1:  # own dropout stream per rank; the weights above are already identical
            torch.manual_seed(tc.seed + 1_000_003 * self.rank)
        self.checkpointer = Checkpointer(self.run_dir.path, self.parallel, self.raw_model, self.optimizer,
                                         config.model, tc.keep_checkpoints, self.log)
        # MFU counts the matmul FLOPs a step needs: weights, and attention only over the keys causal (and
        # banded) attention uses — about half of what PaLM's 12·L·d·T convention counts, so it is conservative.
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.progress = ProgressLog(tc, self.plan, None, self.log, flops_per_token(config.model, self.seq_len)["train"],
                                    device_peak_flops(name, self.precision))

    # ---- checkpoints ----------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """This rank's state.json content."""
        c = self.counters
        return {"step": c.step, "tokens": c.tokens, "elapsed": c.elapsed, "skipped_steps": c.skipped_steps,
                "bad_in_row": c.bad_in_row, "lr": self.plan.lr(max(0, c.step - 1)),
                "schedule": {"name": self.tc.schedule, "total_steps": self.plan.total_steps},
                "precision": self.precision, "world_size": self.world_size, "parallel": self.parallel,
                "global_batch_tokens": self.plan.full_tokens, "log_window": self.progress.state_dict(),
                "loader": self.batches.state_dict(), "rng": capture_rng(self.device)}

    def save(self) -> Path:
        """Checkpoint the current step (a collective; a failure leaves the previous checkpoint as newest)."""
        state = self.state()
        if self.world_size > 1:
            state["rng_per_rank"] = D.all_gather_object(state["rng"])
        path = self.checkpointer.save(self.counters.step, state)
        D.on_main(self.run_dir.discard_previous)  # a --fresh run's old run can go once the new one has a checkpoint
        return path

    @property
    def last_checkpoint(self) -> Path | None:
        return self.checkpointer.last

    def _restore(self, path: Path) -> None:
        state = self.checkpointer.load(path)
        try:
            self._check_resume_layout(state, path)
            self.counters = Counters(int(state["step"]), int(state["tokens"]), float(state.get("elapsed", 0.0)),
                                     int(state.get("skipped_steps", 0)), int(state.get("bad_in_row", 0)))
            self.progress.load_state_dict(dict(state.get("log_window", {})))
            self.batches.load_state_dict(state["loader"])  # a global cursor: exact for any world size
            per_rank = state.get("rng_per_rank")
            try:
                if per_rank and len(per_rank) == self.world_size:
                    restore_rng(per_rank[self.rank], self.device)
                else:
                    restore_rng(state["rng"], self.device)
                    if self.world_size > 1:
                        torch.manual_seed(self.tc.seed + 1_000_003 * self.rank + 7919 * self.counters.step)
            except UserError as e:  # a state it understood but cannot apply on this machine
                raise UserError(f"{path / STATE_FILE}: {e}") from None
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise UserError(f"{path / STATE_FILE} is missing an entry or has a malformed one ({e!r}); resume "
                            "from an earlier checkpoint (--resume RUN/checkpoints/step_N) or start over with "
                            "--fresh") from None
        if self.is_main:
            self.run_dir.trim_logs(self.counters.step)
        self.resumed_from = self.counters.step
        self.log(f"resuming {self.run_dir.path} from {path.name} ({human_count(self.counters.tokens)} tokens seen)")

    def _check_resume_layout(self, state: dict[str, Any], path: Path) -> None:
        """Refuse a resume that would silently change the optimization: the global batch must stay the same.

        A different number of ranks is fine when the global batch (train.tokens_per_step) is unchanged: the
        loader's cursor is global, so the data is re-partitioned exactly; only dropout's random streams
        and the order of floating-point sums differ from an uninterrupted run.
        """
        saved_world = int(state.get("world_size", 1))
        saved_batch = state.get("global_batch_tokens")
        full, micro = self.plan.full_tokens, self.plan.micro_tokens
        if saved_batch is not None and int(saved_batch) != full:
            raise UserError(
                f"checkpoint {path} was trained with {saved_batch} tokens per step on {saved_world} rank(s); with "
                f"{self.world_size} rank(s) these settings give {full}: set train.tokens_per_step={saved_batch} "
                f"(a multiple of micro_batch_size x seq_len x ranks = {micro}) or resume with {saved_world} rank(s)")
        if saved_world != self.world_size:
            self.log(f"resuming a {saved_world}-rank run on {self.world_size} rank(s): same global batch, data "
                     "re-partitioned from the saved position")

    # ---- the loop -------------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Validation loss and every eval callback's numbers for the current weights (all ranks)."""
        return self.validator(self.raw_model, self.counters.step)

    def fit(self) -> TrainResult:
        """Train until max_steps / max_tokens / max_time or a signal; checkpoint and return the outcome."""
        tc = self.tc
        try:
            self.progress.metrics = MetricsLogger(self.run_dir.path, tc.tensorboard, tc.wandb, tc.wandb_project,
                                                  self.config.to_dict()) if self.is_main else None
            with self.stop.handling_signals():
                return self._loop()
        finally:
            if self.progress.metrics:
                self.progress.metrics.close()
            self.run_dir.close()

    def _loop(self) -> TrainResult:
        tc, c = self.tc, self.counters
        self.log(f"training {human_count(self.raw_model.num_parameters())} parameters on {self.device} "
                 f"({self.precision}{', compiled' if tc.compile else ''}); {human_count(self.plan.full_tokens)} "
                 f"tokens per step = {self.plan.describe(self.parallel)}; run directory {self.run_dir.path}")
        for i, group in enumerate(optimizer_groups(self.config.model, tc)):
            self.log(f"{'optimizer' if i == 0 else '':<9} {format_group(group)}")
        self.raw_model.train()
        train_loss = val_loss = None
        if self.resumed_from is None:
            val_loss = self._eval_and_log()
        reason = self.stop.reason(c.step, c.tokens, c.elapsed)
        if reason == "interrupted" and self.last_checkpoint is None:
            self.save()  # stopped before the first step: step 0 is a valid checkpoint to resume from
        while reason is None:
            lr = self.plan.lr(c.step)
            step_tokens = self.plan.step_tokens(c.tokens)
            t0 = time.perf_counter()
            ok, loss, grad_norm = self._step(lr, step_tokens // self.plan.micro_tokens)
            dt = time.perf_counter() - t0
            c.step, c.tokens, c.elapsed = c.step + 1, c.tokens + step_tokens, c.elapsed + dt
            self._count_bad_steps(ok, loss, grad_norm)
            train_loss = loss if ok else train_loss
            self.progress.record(step_tokens, dt, loss if ok else None)
            reason = self.stop.reason(c.step, c.tokens, c.elapsed)
            if self.is_main and self.progress.due(c.step, reason is not None):
                self.progress.report(c.step, c.tokens, c.elapsed, lr, grad_norm, c.skipped_steps, step_tokens,
                                     self._data_numbers())
            finishing = reason is not None and reason != "interrupted"
            if c.step % tc.eval_every == 0 or finishing:
                val_loss = self._eval_and_log() or val_loss
            if c.step % tc.sample_every == 0 or finishing:
                self.samples(self.raw_model, c.step, c.tokens)
            # no periodic checkpoint in the middle of a run of non-finite steps: the last good one stays newest
            if (c.step % tc.checkpoint_every == 0 and c.bad_in_row == 0) or reason:
                self.save()
        self.checkpointer.consolidate_last()
        if reason == "interrupted":
            launcher = f"torchrun --nproc_per_node {self.world_size} -m " if self.world_size > 1 else ""
            self.log(f"stopped at step {c.step}; checkpoint {self.last_checkpoint}; continue with: "
                     f"{launcher}{self.resume_command} --out {self.run_dir.path} --resume auto")
        return TrainResult(self.run_dir.path, c.step, c.tokens, reason, train_loss, val_loss,
                           self.last_checkpoint, self.resumed_from)

    def _step(self, lr: float, n_micro: int) -> tuple[bool, float, float]:
        """One optimizer step over `n_micro` micro-batches at learning rate `lr`."""
        set_lr(self.optimizer, lr)
        try:
            batches = (self.batches.next_batch() for _ in range(n_micro))
            loss = forward_backward(self.model, batches, n_micro, self.device, self.precision)
            loss = D.all_reduce_mean(loss)  # the global batch's loss; same skip decision on every rank
            return clip_and_step(self.raw_model, self.optimizer, loss, self.tc.grad_clip)
        except Exception as e:
            if is_oom(e):
                raise oom_error(self.tc, self.seq_len) from None
            raise

    def _data_numbers(self) -> dict[str, float]:
        """What the batch source reports for the metrics row (packed data: the padding fraction)."""
        padding = getattr(self.batches, "padding_fraction", None)
        return {"padding": padding} if padding is not None else {}

    def _count_bad_steps(self, ok: bool, loss: float, grad_norm: float) -> None:
        """A non-finite step is skipped; `max_bad_steps` of them in a row stop the run."""
        c = self.counters
        if ok:
            c.bad_in_row = 0
            return
        c.skipped_steps += 1
        c.bad_in_row += 1
        self.log(f"step {c.step}: non-finite loss or gradient (loss {loss}, grad norm {grad_norm}); update "
                 f"skipped ({c.bad_in_row} in a row)")
        if c.bad_in_row >= self.tc.max_bad_steps:
            raise UserError(f"training diverged: {c.bad_in_row} steps in a row with non-finite loss or gradients "
                            f"(step {c.step}); the last good checkpoint ({self.last_checkpoint or 'none'}) is "
                            "untouched; lower train.lr or raise train.warmup_steps and resume or restart")

    def _eval_and_log(self) -> float | None:
        """Run by every rank (the validation set is split over ranks); rank 0 logs and plots."""
        results = self.evaluate()
        if results and self.is_main:
            self.progress.report_eval(self.counters.step, self.counters.tokens, results)
            plot_losses(self.run_dir.path)
        return results.get("val_loss")


def _configure_torch(device: torch.device, deterministic: bool) -> None:
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = not deterministic
        torch.backends.cudnn.allow_tf32 = not deterministic
    elif device.type == "cpu":
        keep_freed_memory()  # a CPU step reallocates the same large tensors: reuse them, no fresh pages


def train(config: RunConfig, resume: str | None = None, fresh: bool = False,
          eval_callbacks: Iterable[EvalCallback] = (), log: Callable[[str], None] | None = None) -> TrainResult:
    """Train `config` into `config.train.out_dir` (see `Trainer`); the Python API of `gptforge train`."""
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    try:
        return Trainer(config, resume=resume, fresh=fresh, eval_callbacks=eval_callbacks, log=log).fit()
    finally:
        if owns_group:
            D.teardown()
