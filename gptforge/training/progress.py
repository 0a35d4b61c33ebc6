"""The progress log: what a run prints and appends to metrics.jsonl as it trains.

Numbers are averaged over the steps since the last logged one (the "window"); the window is part of every
checkpoint so a resumed run logs the same averages as one that never stopped. Console lines go through
`console_log`, which falls silent when stdout goes away (`gptforge train ... | head`) instead of ending the
run at a step that has no checkpoint.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

from ..config import TrainConfig
from ..units import human_count
from .metrics import MetricsLogger
from .step import StepPlan


def console_log() -> Callable[[str], None]:
    """print(msg) to stdout; once stdout is closed (a reader such as `head` left), training goes on silently."""
    state = {"open": True}

    def log(message: str) -> None:
        if not state["open"]:
            return
        try:
            print(message, flush=True)
        except (BrokenPipeError, ValueError, OSError):
            state["open"] = False
            try:  # point fd 1 at /dev/null so the interpreter's final flush cannot fail either
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
            except (OSError, ValueError):
                pass
    return log


def fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class ProgressLog:
    """Accumulates steps into a window and reports it every `log_every` steps (rank 0 writes)."""

    def __init__(self, tc: TrainConfig, plan: StepPlan, metrics: MetricsLogger | None, log: Callable[[str], None],
                 flops_per_token: float, peak_flops: float | None) -> None:
        self.tc, self.plan = tc, plan
        self.metrics = metrics
        self.log = log
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.window = self._empty()

    @staticmethod
    def _empty() -> dict[str, float]:
        return {"tokens": 0, "time": 0.0, "loss": 0.0, "steps": 0, "all_steps": 0}

    def state_dict(self) -> dict[str, float]:
        return dict(self.window)

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.window = {**self._empty(), **state}

    def record(self, step_tokens: int, seconds: float, loss: float | None) -> None:
        """One optimizer step: its tokens, time, and loss (None for a skipped, non-finite step)."""
        w = self.window
        if loss is not None:
            w["loss"] += loss
            w["steps"] += 1
        w["tokens"] += step_tokens
        w["time"] += seconds
        w["all_steps"] += 1

    def due(self, step: int, stopping: bool) -> bool:
        return step % self.tc.log_every == 0 or step == 1 or stopping

    def report(self, step: int, tokens: int, elapsed: float, lr: float, grad_norm: float, skipped: int,
               step_tokens: int, extra: dict[str, float] | None = None) -> None:
        w = self.window
        tok_s = w["tokens"] / max(w["time"], 1e-9)
        mfu = tok_s * self.flops_per_token / self.peak_flops if self.peak_flops else None
        loss = w["loss"] / w["steps"] if w["steps"] else float("nan")
        row: dict[str, Any] = {"step": step, "tokens": tokens, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                               "tokens_per_s": tok_s, "elapsed": elapsed, "skipped_steps": skipped,
                               "batch_tokens": step_tokens}
        if mfu is not None:
            row["mfu"] = mfu
        row.update(extra or {})
        if self.metrics:
            self.metrics.log(row)
        total = f"/{self.tc.max_steps}" if self.tc.max_steps else ""
        eta = self.eta(step, tokens, elapsed, w["time"] / max(1, w["all_steps"]))
        self.log(f"step {step}{total} | loss {loss:.4f} | lr {lr:.2e} | {human_count(tok_s)} tok/s"
                 + (f" | MFU {100 * mfu:.1f}%" if mfu is not None else "")
                 + f" | {human_count(tokens)} tok | ETA {eta}")
        self.window = self._empty()

    def eta(self, step: int, tokens: int, elapsed: float, step_time: float) -> str:
        tc = self.tc
        remaining = []
        if tc.max_steps:
            remaining.append((tc.max_steps - step) * step_time)
        if tc.max_tokens:
            remaining.append((tc.max_tokens - tokens) / max(1, self.plan.full_tokens) * step_time)
        if tc.max_time:
            remaining.append(tc.max_time - elapsed)
        return fmt_time(min(remaining)) if remaining else "?"

    def report_eval(self, step: int, tokens: int, results: dict[str, float]) -> None:
        if self.metrics:
            self.metrics.log({"step": step, "tokens": tokens, **results})
        if "val_loss" in results:
            self.log(f"step {step} | val loss {results['val_loss']:.4f} | val ppl {results['val_ppl']:.1f}")
