"""When a run stops: its limits (steps, tokens, wall time) and signals, decided together by all ranks.

The first Ctrl-C (SIGINT) or SIGTERM (Slurm, `docker stop`, `kill`) asks the loop to finish its step and save
a checkpoint; a second one aborts at once. Under torchrun a stop changes control flow, so every rank must take
it at the same step: the ranks vote (`distributed.any_rank`); step and token limits are identical everywhere,
and rank 0's clock decides max_time.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Callable, Iterator

import torch

from ..config import TrainConfig
from . import distributed as D


class StopRules:
    def __init__(self, tc: TrainConfig, world_size: int, is_main: bool, device: torch.device,
                 log: Callable[[str], None]) -> None:
        self.tc = tc
        self.world_size, self.is_main, self.device = world_size, is_main, device
        self.log = log
        self.signal: str | None = None  # name of the signal that asked to stop

    @contextlib.contextmanager
    def handling_signals(self) -> Iterator[None]:
        """SIGINT / SIGTERM set `signal` instead of raising, while inside (main thread only)."""
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            yield
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        self.log(f"\n{self.signal} received: finishing this step and saving a checkpoint "
                 "(press Ctrl-C again to abort without saving)")

    def local_reason(self, step: int, tokens: int, elapsed: float) -> str | None:
        """Why this process would stop now, or None."""
        tc = self.tc
        if self.signal:
            return "interrupted"
        if tc.max_steps and step >= tc.max_steps:
            return "max_steps"
        if tc.max_tokens and tokens >= tc.max_tokens:
            return "max_tokens"
        if tc.max_time and elapsed >= tc.max_time:
            return "max_time"
        return None

    def reason(self, step: int, tokens: int, elapsed: float) -> str | None:
        """Why to stop now, or None; under torchrun all ranks agree."""
        reason = self.local_reason(step, tokens, elapsed)
        if self.world_size == 1:
            return reason
        signalled, timed_out = D.any_rank([self.signal is not None, self.is_main and reason == "max_time"],
                                          self.device)
        if signalled:
            return "interrupted"
        if reason in ("max_steps", "max_tokens"):  # counters are identical on every rank
            return reason
        return "max_time" if timed_out else None
