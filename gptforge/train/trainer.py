"""The training loop: batches in, AdamW steps out, with checkpoints that resume bit for bit.

One `Trainer` owns a run directory. Everything a step depends on (weights, AdamW moments, step and token
counters, the data loader's position, every RNG) is in each checkpoint, and everything else (learning
rate, batch size during the ramp) is a pure function of those counters, so a run killed at any point and
resumed produces the same weights as one that never stopped (on CPU with deterministic settings).
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from .. import atomic
from ..config import RunConfig
from ..errors import UserError
from ..model import GPT
from ..units import human_count
from . import checkpoint as ckpt
from . import distributed as D
from ..info import flops_per_token
from ..layout import METRICS_FILE, PLOT_FILE, RUN_CONFIG_FILE as CONFIG_FILE, SAMPLES_FILE, TOKENIZER_DIR, WEIGHTS_FILE
from ..resolve import read_run_config
from .metrics import MetricsLogger, device_peak_flops, truncate_metrics
from .optim import build_optimizer
from .plot import plot_losses
from .precision import autocast, resolve_device, resolve_precision
from .samples import append_samples, sample_texts, truncate_samples
from .schedule import accumulation_steps, lr_at, tokens_per_step_at

# An evaluation hook: called at each eval step with the (eval-mode) model and the step; the numbers it
# returns are added to that step's row in metrics.jsonl.
EvalCallback = Callable[[GPT, int], dict[str, float]]


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


# ---- pieces of one optimizer step (shared with benchmarks/train_throughput.py) -------------------------


def forward_backward(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     n_batches: int, device: torch.device, precision: str) -> torch.Tensor:
    """Accumulate gradients over `n_batches` micro-batches; returns the mean loss (a detached tensor).

    Each micro-batch loss is divided by `n_batches`, so k micro-batches of size b give the gradient of one
    batch of size k·b.

    Under DDP / FSDP2 gradients are communicated only on the last micro-batch (`distributed.grad_sync`).
    """
    total = torch.zeros((), device=device)
    for i, (x, y) in enumerate(batches):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        with D.grad_sync(model, sync=i == n_batches - 1):
            with autocast(device, precision):
                _, loss = model(x, y, return_logits=False)  # fused loss: no full logits
            (loss / n_batches).backward()
        total += loss.detach().float()
    return total / n_batches


def clip_and_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                  grad_clip: float) -> tuple[bool, float, float]:
    """Clip the global grad norm, then step unless loss or gradient is non-finite.

    Returns (stepped, loss, grad_norm) with one host sync for both numbers.
    """
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    norm = D.clip_grad_norm(model.parameters(), max_norm)  # global norm, FSDP2's sharded grads included
    numbers = torch.stack([loss.float(), norm.float().to(loss.device)]).tolist()
    ok = all(math.isfinite(v) for v in numbers)
    if ok:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return ok, numbers[0], numbers[1]


# ---- RNG state <-> JSON ---------------------------------------------------------------------------------


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def capture_rng() -> dict[str, Any]:
    """Every RNG a step can draw from: Python, NumPy, torch CPU and each CUDA device."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


# ---- data ------------------------------------------------------------------------------------------------


def _is_oom(error: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    if isinstance(error, oom_type):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Trainer:
    """Owns one run: model, optimizer, loaders, run directory; `fit()` trains until a stop rule fires.

    `resume`: None (the run directory must have no checkpoints), "auto" (newest valid checkpoint, or a
    fresh start when there is none) or a checkpoint directory. `fresh=True` deletes an existing run's
    checkpoints and logs first.
    """

    def __init__(self, config: RunConfig, resume: str | None = None, fresh: bool = False,
                 eval_callbacks: Iterable[EvalCallback] = (), log: Callable[[str], None] | None = None,
                 init_model: Callable[[GPT], None] | None = None, sampler: Callable[..., list[str]] | None = None
                 ) -> None:
        self.config = config
        self.tc = config.train
        self.log = log or (lambda msg: print(msg, flush=True))
        self.eval_callbacks = list(eval_callbacks)
        self.run_dir = Path(self.tc.out_dir)
        # Under torchrun: join the process group; a single process is rank 0 of 1 with no group.
        self._owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        self.dist = D.init_distributed(self.tc.device)
        self.rank, self.world_size, self.is_main = self.dist.rank, self.dist.world_size, self.dist.is_main
        self.parallel = D.resolve_parallel(self.tc.parallel, self.world_size)
        if not self.is_main:
            self.log = lambda msg: None  # rank 0 speaks for the job

        self.device = self.dist.device if self.dist.distributed else resolve_device(self.tc.device)
        self.precision = resolve_precision(self.tc.precision, self.device)
        if self.tc.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = not self.tc.deterministic
            torch.backends.cudnn.allow_tf32 = not self.tc.deterministic

        self.seq_len = config.seq_len
        if self.seq_len > config.model.block_size:
            raise UserError(f"train.seq_len={self.seq_len} exceeds model.block_size={config.model.block_size}; "
                            "lower train.seq_len or raise model.block_size")
        self.micro_tokens = self.tc.micro_batch_size * self.seq_len * self.world_size
        self.full_tokens = (accumulation_steps(self.tc.tokens_per_step, self.tc.micro_batch_size * self.world_size,
                                               self.seq_len) * self.micro_tokens)
        self.total_steps = self._schedule_horizon()

        # rank 0 alone touches the run directory; every rank learns where to resume from (or its error)
        self.resume_path = D.on_main(lambda: self._prepare_run_dir(resume, fresh))
        random.seed(self.tc.seed)
        np.random.seed(self.tc.seed)
        torch.manual_seed(self.tc.seed)  # same initial weights on every rank
        # what the forward pass runs: DDP wrapper, or the model itself sharded by FSDP2 (compiled below)
        # init_model (SFT: the base model's weights) applies to a new run only; a resumed one loads its checkpoint
        init = init_model if self.resume_path is None else None

        def build() -> GPT:
            model = GPT(config.model)
            if init is not None:
                init(model)
            return model

        if self.parallel == "fsdp":  # built directly as shards: never whole on one GPU
            self.raw_model = D.build_fsdp_model(build, self.dist, self.precision, self.tc.activation_checkpointing)
            self.model: torch.nn.Module = self.raw_model
        else:
            self.raw_model = build().to(self.device)
            self.model = D.wrap_model(self.raw_model, self.dist, self.parallel, self.precision,
                                      self.tc.activation_checkpointing)
        self.optimizer = build_optimizer(self.raw_model, self.tc, self.device)  # after FSDP2 has sharded
        if self.world_size > 1:  # own dropout stream per rank; the weights above are already identical
            torch.manual_seed(self.tc.seed + 1_000_003 * self.rank)
        self.train_loader = self._make_loader("train")
        self.sampler = sampler
        self.step = 0
        self.tokens = 0
        self.elapsed = 0.0
        self.skipped_steps = 0
        self.bad_in_row = 0
        self.resumed_from: int | None = None
        # running sums since the last logged step; checkpointed so a resumed run logs the same averages
        self.window = self._new_window()
        if self.resume_path is not None:
            self._load(self.resume_path)
        if self.tc.compile:
            self.model = torch.compile(self.model)
        # MFU counts the matmul FLOPs a step needs: weights, and attention only over the keys causal (and
        # banded) attention uses — about half of what PaLM's 12·L·d·T convention counts, so it is conservative.
        self.flops_per_token = flops_per_token(config.model, self.seq_len)["train"]
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.peak_flops = device_peak_flops(name, self.precision)
        self.tokenizer = self._load_tokenizer()
        if self.tc.eval_tasks:
            self.eval_callbacks.append(self._benchmark_callback())
        self._stop_signal: str | None = None
        self.last_checkpoint: Path | None = self.resume_path

    @staticmethod
    def _new_window() -> dict[str, float]:
        return {"tokens": 0, "time": 0.0, "loss": 0.0, "steps": 0, "all_steps": 0}

    # ---- set-up -------------------------------------------------------------------------------------

    def _schedule_horizon(self) -> int:
        """Steps over which the LR schedule runs: max_steps, else the steps max_tokens needs, else 0
        (time-limited only: the LR holds at peak after warmup)."""
        if self.tc.max_steps:
            return self.tc.max_steps
        if self.tc.max_tokens:
            return math.ceil(self.tc.max_tokens / self.full_tokens)
        return 0

    def _prepare_run_dir(self, resume: str | None, fresh: bool) -> Path | None:
        """Create or check the run directory; returns the checkpoint to resume from (None: a new run)."""
        run_dir = self.run_dir
        existing = ckpt.list_checkpoints(run_dir)
        self.resume_path: Path | None = None
        if fresh:
            if existing or (run_dir / METRICS_FILE).exists():
                self.log(f"starting fresh in {run_dir}: deleting its previous checkpoints and logs")
            shutil.rmtree(run_dir / ckpt.CHECKPOINTS_DIR, ignore_errors=True)
            for name in (METRICS_FILE, SAMPLES_FILE, PLOT_FILE):
                (run_dir / name).unlink(missing_ok=True)
        elif resume is None and existing:
            raise UserError(f"{run_dir} already has checkpoints (newest step {existing[-1][0]}); pass --resume "
                            "to continue that run, --fresh to delete it and start over, or another --out")
        elif resume == "auto":
            self.resume_path = ckpt.latest_valid_checkpoint(run_dir, report=self.log)
            if self.resume_path is None:
                self.log(f"no valid checkpoint in {run_dir}: starting a new run")
        elif resume is not None:
            path = Path(resume)
            if not (path / ckpt.STATE_FILE).is_file():
                raise UserError(f"--resume {resume}: not a checkpoint directory (no {ckpt.STATE_FILE}); "
                                "pass checkpoints/step_N of a run or --resume auto")
            self.resume_path = path
        if self.resume_path is not None and (run_dir / CONFIG_FILE).is_file():
            saved = read_run_config(run_dir / CONFIG_FILE).model.to_dict()
            differing = ckpt.model_config_differences(saved, self.config.model.to_dict())
            if differing:
                raise UserError(f"cannot resume {run_dir} with a different model shape ({differing}); "
                                "drop the model overrides, or start a new run with another --out")
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_partial_saves(run_dir)
        atomic.write_text(run_dir / CONFIG_FILE, json.dumps(self.config.to_dict(), indent=2) + "\n")
        # A new run takes the data's tokenizer (replacing one left by an earlier run in this directory);
        # a resumed run keeps the one its checkpoints were trained with.
        tok_src = Path(self.config.data.path) / TOKENIZER_DIR
        if tok_src.is_dir() and (self.resume_path is None or not (run_dir / TOKENIZER_DIR).is_dir()):
            with atomic.atomic_directory(run_dir / TOKENIZER_DIR, overwrite=True) as tmp:
                shutil.copytree(tok_src, tmp, dirs_exist_ok=True)
        return self.resume_path

    def _make_loader(self, split: str):
        from ..data.chat_loader import ChatLoader, is_chat_data
        from ..data.loader import SequenceLoader
        cls = ChatLoader if is_chat_data(self.config.data.path) else SequenceLoader
        return cls(self.config.data.path, split, self.seq_len, self.tc.micro_batch_size,
                              seed=self.config.data.seed, rank=self.rank, world_size=self.world_size)

    def _load_tokenizer(self):
        tok_dir = self.run_dir / TOKENIZER_DIR
        if not tok_dir.is_dir():
            return None
        try:
            from ..tokenizer import load_tokenizer
            return load_tokenizer(tok_dir)
        except (ImportError, UserError) as e:
            self.log(f"warning: no samples during training: cannot load {tok_dir} ({e})")
            return None

    # ---- checkpoints ----------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "elapsed": self.elapsed,
            "skipped_steps": self.skipped_steps,
            "bad_in_row": self.bad_in_row,
            "lr": lr_at(max(0, self.step - 1), self.tc, self.total_steps),
            "schedule": {"name": self.tc.schedule, "total_steps": self.total_steps},
            "precision": self.precision,
            "world_size": self.world_size,
            "parallel": self.parallel,
            "global_batch_tokens": self.full_tokens,
            "log_window": dict(self.window),
            "loader": self.train_loader.state_dict(),
            "rng": capture_rng(),
        }

    def _collect_state(self) -> dict[str, Any]:
        """state() of rank 0 plus every rank's RNG states (a collective under torchrun)."""
        state = self.state()
        if self.world_size > 1:
            state["rng_per_rank"] = D.all_gather_object(state["rng"])
        return state

    def save(self) -> Path:
        """Checkpoint the current step (atomic; a failure leaves the previous checkpoint as newest)."""
        state = self._collect_state()

        def failed(e: OSError) -> UserError:
            previous = f"step {self.last_checkpoint.name}" if self.last_checkpoint else "none"
            return UserError(f"could not write checkpoint step_{self.step} in {self.run_dir / ckpt.CHECKPOINTS_DIR} "
                             f"({e.strerror or e}); the previous checkpoint ({previous}) is intact: free disk "
                             "space, then continue with --resume auto")

        def write_full() -> Path:
            try:
                return ckpt.save_checkpoint(self.run_dir, self.step, D.unwrap(self.raw_model), self.optimizer, state,
                                            keep=self.tc.keep_checkpoints)
            except OSError as e:
                raise failed(e) from None

        if self.parallel == "fsdp":  # every rank writes its own shards (dist_checkpoint.py)
            from .dist_checkpoint import save_sharded
            try:
                path = save_sharded(ckpt.checkpoint_dir(self.run_dir, self.step), self.raw_model, self.optimizer,
                                    state, self.config.model)
            except OSError as e:
                raise failed(e) from None
            D.on_main(lambda: ckpt.prune_checkpoints(self.run_dir, self.tc.keep_checkpoints))
        else:  # one process, or DDP's identical full copies: rank 0 writes them
            path = D.on_main(write_full)
        self.last_checkpoint = path
        return path

    def _load(self, path: Path) -> None:
        from .dist_checkpoint import is_sharded_checkpoint, load_full_into_sharded, load_sharded
        if is_sharded_checkpoint(path):  # DCP loads (and reshards) into any layout, FSDP2 or full copies
            state = load_sharded(path, self.raw_model, self.optimizer)
        elif self.parallel == "fsdp":  # a single-process / DDP checkpoint, sharded while loading
            state = load_full_into_sharded(path, self.raw_model, self.optimizer)
        else:
            state = ckpt.load_checkpoint(path, self.raw_model, self.optimizer)
        self._check_resume_layout(state, path)
        self.step = state["step"]
        self.tokens = state["tokens"]
        self.elapsed = state.get("elapsed", 0.0)
        self.skipped_steps = state.get("skipped_steps", 0)
        self.bad_in_row = state.get("bad_in_row", 0)
        self.window = {**self._new_window(), **state.get("log_window", {})}
        self.train_loader.load_state_dict(state["loader"])  # a global cursor: exact for any world size
        per_rank = state.get("rng_per_rank")
        if per_rank and len(per_rank) == self.world_size:
            restore_rng(per_rank[self.rank])
        else:
            restore_rng(state["rng"])
            if self.world_size > 1:
                torch.manual_seed(self.tc.seed + 1_000_003 * self.rank + 7919 * self.step)
        if self.is_main:
            truncate_metrics(self.run_dir / METRICS_FILE, self.step)
            truncate_samples(self.run_dir, self.step)
        self.resumed_from = self.step
        self.log(f"resuming {self.run_dir} from {path.name} ({human_count(self.tokens)} tokens seen)")

    def _check_resume_layout(self, state: dict[str, Any], path: Path) -> None:
        """Refuse a resume that would silently change the optimization: the global batch must stay the same.

        A different number of ranks is fine when the global batch (train.tokens_per_step) is unchanged: the
        loader's cursor is global, so the data is re-partitioned exactly; only dropout's random streams
        and the order of floating-point sums differ from an uninterrupted run.
        """
        saved_world = int(state.get("world_size", 1))
        saved_batch = state.get("global_batch_tokens")
        if saved_batch is not None and int(saved_batch) != self.full_tokens:
            raise UserError(
                f"checkpoint {path} was trained with {saved_batch} tokens per step on {saved_world} rank(s); with "
                f"{self.world_size} rank(s) these settings give {self.full_tokens}: set train.tokens_per_step="
                f"{saved_batch} (a multiple of micro_batch_size x seq_len x ranks = {self.micro_tokens}) or resume "
                f"with {saved_world} rank(s)")
        if saved_world != self.world_size:
            self.log(f"resuming a {saved_world}-rank run on {self.world_size} rank(s): same global batch, data "
                     "re-partitioned from the saved position")

    # ---- evaluation and samples ----------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss and perplexity over the first `eval_batches` batches of the val split, plus
        whatever the eval callbacks return."""
        results: dict[str, float] = {}
        model = self.raw_model
        model.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                try:
                    loader = self._make_loader("val")
                except UserError as e:
                    if not getattr(self, "_warned_no_val", False):
                        self.log(f"warning: no validation loss: {e}")
                        self._warned_no_val = True
                    loader = None
                if loader is not None:
                    losses = []
                    # eval_batches is the total over ranks: rank r's strided share of the first
                    # ceil(eval_batches / ranks) batches covers the sequences one process would score, so the
                    # number does not depend on the world size; and every rank runs the same number of
                    # forwards (FSDP2 gathers weights collectively)
                    n_batches = min(-(-self.tc.eval_batches // self.world_size),
                                    -(-loader.sequences_per_rank // self.tc.micro_batch_size))
                    for i, (x, y) in enumerate(loader.iter_sequential(self.tc.micro_batch_size)):
                        if i >= n_batches:
                            break
                        with autocast(self.device, self.precision):
                            _, loss = model(x.to(self.device), y.to(self.device))
                        losses.append(loss.float().item())
                    if losses:
                        val = D.all_reduce_mean(torch.tensor(sum(losses) / len(losses), device=self.device)).item()
                        results["val_loss"] = val
                        results["val_ppl"] = math.exp(min(val, 50.0))
                for callback in self.eval_callbacks:
                    results.update(callback(model, self.step))
        finally:
            model.train()
        return results

    def _benchmark_callback(self) -> EvalCallback:
        """Scores `train.eval_tasks` (gptforge.evals) at every eval step; their data is read and checked now,
        so a wrong path fails before training rather than at the first evaluation."""
        from ..evals import runner

        if self.tokenizer is None:
            raise UserError("train.eval_tasks needs the data's tokenizer, and this run has none")
        tasks = runner.check_tasks(list(self.tc.eval_tasks))
        data = runner.parse_data(list(self.tc.eval_data), tasks, option="train.eval_data")
        for task in tasks:
            runner.load_task(task, data.get(task), self.tc.eval_limit)

        def callback(model: GPT, step: int) -> dict[str, float]:
            with autocast(self.device, self.precision):
                return runner.run_eval_tasks(model, self.tokenizer, tasks, data, self.tc.eval_limit,
                                             self.tc.micro_batch_size)
        return callback

    def write_samples(self) -> None:
        if self.tokenizer is None or not (self.tc.sample_prompts or self.sampler) or self.tc.sample_tokens == 0:
            return
        # Under FSDP2 every rank generates in lockstep (same seed, same logits) and rank 0 writes; autocast
        # matches the KV cache (allocated in the fp32 dtype of the sharded weights) to FSDP2's bf16 compute.
        fsdp = self.parallel == "fsdp"
        with autocast(self.device, self.precision) if fsdp else contextlib.nullcontext():
            if self.sampler is not None:
                texts = self.sampler(self.raw_model, self.tokenizer, self.tc.sample_tokens, self.tc.sample_temperature,
                                     self.tc.sample_top_k, seed=self.tc.seed + self.step)
            else:
                texts = sample_texts(self.raw_model, self.tokenizer, list(self.tc.sample_prompts),
                                     self.tc.sample_tokens, self.tc.sample_temperature, self.tc.sample_top_k,
                                     seed=self.tc.seed + self.step)
        if self.is_main:
            append_samples(self.run_dir, self.step, self.tokens, texts)
        self.last_samples = texts

    # ---- the loop -------------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_signal is not None:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._stop_signal = signal.Signals(signum).name
        self.log(f"\n{self._stop_signal} received: finishing this step and saving a checkpoint "
                 "(press Ctrl-C again to abort without saving)")

    def _stop_reason(self) -> str | None:
        """Why to stop now, or None; under torchrun all ranks agree (a signal or rank 0's clock decides)."""
        reason = self._local_stop_reason()
        if self.world_size == 1:
            return reason
        signalled, timed_out = D.any_rank([self._stop_signal is not None,
                                           self.is_main and reason == "max_time"], self.device)
        if signalled:
            return "interrupted"
        if reason in ("max_steps", "max_tokens"):  # counters are identical on every rank
            return reason
        return "max_time" if timed_out else None

    def _local_stop_reason(self) -> str | None:
        if self._stop_signal:
            return "interrupted"
        if self.tc.max_steps and self.step >= self.tc.max_steps:
            return "max_steps"
        if self.tc.max_tokens and self.tokens >= self.tc.max_tokens:
            return "max_tokens"
        if self.tc.max_time and self.elapsed >= self.tc.max_time:
            return "max_time"
        return None

    def _eta(self, step_time: float) -> str:
        remaining = []
        if self.tc.max_steps:
            remaining.append((self.tc.max_steps - self.step) * step_time)
        if self.tc.max_tokens:
            remaining.append((self.tc.max_tokens - self.tokens) / max(1, self.full_tokens) * step_time)
        if self.tc.max_time:
            remaining.append(self.tc.max_time - self.elapsed)
        return _fmt_time(min(remaining)) if remaining else "?"

    def fit(self) -> TrainResult:
        """Train until max_steps / max_tokens / max_time or a signal; checkpoint and return the outcome."""
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._on_signal)
        logger = MetricsLogger(self.run_dir, self.tc.tensorboard, self.tc.wandb, self.tc.wandb_project,
                               self.config.to_dict()) if self.is_main else None
        try:
            return self._fit(logger)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            if logger:
                logger.close()

    def _fit(self, logger: MetricsLogger | None) -> TrainResult:
        tc = self.tc
        self.log(f"training {human_count(self.raw_model.num_parameters())} parameters on {self.device} "
                 f"({self.precision}{', compiled' if tc.compile else ''}); {human_count(self.full_tokens)} tokens "
                 f"per step = {self.full_tokens // self.micro_tokens} x "
                 + (f"{self.world_size} ranks ({self.parallel}) x " if self.world_size > 1 else "")
                 + f"{tc.micro_batch_size} x {self.seq_len}; "
                 f"run directory {self.run_dir}")
        self.raw_model.train()
        train_loss = val_loss = None
        if self.step == 0:
            val_loss = self._eval_and_log(logger)
        reason = self._stop_reason()
        window = self.window
        while reason is None:
            t0 = time.perf_counter()
            step_tokens = tokens_per_step_at(self.tokens, tc, self.full_tokens, self.micro_tokens)
            n_micro = step_tokens // self.micro_tokens
            lr = lr_at(self.step, tc, self.total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            try:
                batches = (self.train_loader.next_batch() for _ in range(n_micro))
                loss = forward_backward(self.model, batches, n_micro, self.device, self.precision)
                loss = D.all_reduce_mean(loss)  # the global batch's loss; same skip decision on every rank
                ok, loss_value, grad_norm = clip_and_step(self.raw_model, self.optimizer, loss, tc.grad_clip)
            except Exception as e:
                if _is_oom(e):
                    raise UserError(f"out of memory at train.micro_batch_size={tc.micro_batch_size}, "
                                    f"seq_len={self.seq_len}; lower train.micro_batch_size (train.tokens_per_step "
                                    "keeps the batch size through gradient accumulation)") from None
                raise
            self.step += 1
            self.tokens += step_tokens
            dt = time.perf_counter() - t0
            self.elapsed += dt
            if not ok:
                self.skipped_steps += 1
                self.bad_in_row += 1
                self.log(f"step {self.step}: non-finite loss or gradient (loss {loss_value}, grad norm {grad_norm}); "
                         f"update skipped ({self.bad_in_row} in a row)")
                if self.bad_in_row >= tc.max_bad_steps:
                    last = self.last_checkpoint or "none"
                    raise UserError(f"training diverged: {self.bad_in_row} steps in a row with non-finite loss or "
                                    f"gradients (step {self.step}); the last good checkpoint ({last}) is untouched; "
                                    "lower train.lr or raise train.warmup_steps and resume or restart")
            else:
                self.bad_in_row = 0
                train_loss = loss_value
                window["loss"] += loss_value
                window["steps"] += 1
            window["tokens"] += step_tokens
            window["time"] += dt
            window["all_steps"] += 1
            reason = self._stop_reason()
            if self.is_main and (self.step % tc.log_every == 0 or self.step == 1 or reason):
                tok_s = window["tokens"] / max(window["time"], 1e-9)
                mfu = (tok_s * self.flops_per_token / self.peak_flops) if self.peak_flops else None
                avg_loss = window["loss"] / window["steps"] if window["steps"] else float("nan")
                row = {"step": self.step, "tokens": self.tokens, "loss": avg_loss, "lr": lr,
                       "grad_norm": grad_norm, "tokens_per_s": tok_s, "elapsed": self.elapsed,
                       "skipped_steps": self.skipped_steps, "batch_tokens": step_tokens}
                if mfu is not None:
                    row["mfu"] = mfu
                if hasattr(self.train_loader, "padding_fraction"):  # packed data: share of each batch wasted
                    row["padding"] = self.train_loader.padding_fraction
                logger.log(row)
                step_time = window["time"] / max(1, window["all_steps"])
                total = f"/{tc.max_steps}" if tc.max_steps else ""
                self.log(f"step {self.step}{total} | loss {avg_loss:.4f} | lr {lr:.2e} | "
                         f"{human_count(tok_s)} tok/s" + (f" | MFU {100 * mfu:.1f}%" if mfu is not None else "")
                         + f" | {human_count(self.tokens)} tok | ETA {self._eta(step_time)}")
                self.window = window = self._new_window()
            finishing = reason is not None and reason != "interrupted"
            if self.step % tc.eval_every == 0 or finishing:
                val_loss = self._eval_and_log(logger)
            if (self.is_main or self.parallel == "fsdp") and (self.step % tc.sample_every == 0 or finishing):
                self.write_samples()
            # no periodic checkpoint in the middle of a run of non-finite steps: the last good one stays newest
            if (self.step % tc.checkpoint_every == 0 and self.bad_in_row == 0) or reason:
                self.save()
        if self.parallel == "fsdp" and self.last_checkpoint is not None:
            self._consolidate_last()
        if reason == "interrupted":
            launcher = f"torchrun --nproc_per_node {self.world_size} -m " if self.world_size > 1 else ""
            self.log(f"stopped at step {self.step}; checkpoint {self.last_checkpoint}; "
                     f"continue with: {launcher}gptforge train --out {self.run_dir} --resume auto")
        return TrainResult(self.run_dir, self.step, self.tokens, reason, train_loss, val_loss,
                           self.last_checkpoint, self.resumed_from)

    def _consolidate_last(self) -> None:
        """Give the final sharded checkpoint a model.safetensors, so sample / eval / export read the run."""
        from .dist_checkpoint import consolidate
        path = self.last_checkpoint
        D.on_main(lambda: None if (path / WEIGHTS_FILE).is_file() else consolidate(path))
        self.log(f"consolidated the sharded checkpoint into {path / WEIGHTS_FILE}")

    def _eval_and_log(self, logger: MetricsLogger | None) -> float | None:
        """Run by every rank (the validation set is split over ranks); rank 0 logs and plots."""
        results = self.evaluate()
        if not results or not self.is_main:
            return results.get("val_loss") if results else None
        if logger:
            logger.log({"step": self.step, "tokens": self.tokens, **results})
        if "val_loss" in results:
            self.log(f"step {self.step} | val loss {results['val_loss']:.4f} | val ppl {results['val_ppl']:.1f}")
        plot_losses(self.run_dir)
        return results.get("val_loss")


def train(config: RunConfig, resume: str | None = None, fresh: bool = False,
          eval_callbacks: Iterable[EvalCallback] = (), log: Callable[[str], None] | None = None) -> TrainResult:
    """Train `config` into `config.train.out_dir` (see `Trainer`); the Python API of `gptforge train`."""
    trainer = Trainer(config, resume=resume, fresh=fresh, eval_callbacks=eval_callbacks, log=log)
    try:
        return trainer.fit()
    finally:
        if trainer._owns_group:
            D.teardown()
