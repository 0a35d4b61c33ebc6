"""One optimizer step, and the arithmetic around it: tokens per step, accumulation, learning rate.

Kept apart from the loop so the hot path is a few plain functions a profiler (or the "speed" work) can
read and change alone: `forward_backward` accumulates gradients over micro-batches, `clip_and_step` clips
and steps unless something is non-finite. `StepPlan` turns the config into numbers once; the learning rate
and the batch size of any step are pure functions of the step and token counters (train/schedule.py), so a
resumed run recomputes exactly what an uninterrupted one used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

from ..config import TrainConfig
from ..errors import UserError
from . import distributed as D
from .optim import Optimizers, optimizers_of
from .precision import autocast
from .schedule import accumulation_steps, lr_at, tokens_per_step_at


@dataclass(frozen=True)
class StepPlan:
    """Batch geometry and schedule horizon of a run (the same on every rank)."""

    config: TrainConfig
    seq_len: int
    world_size: int
    micro_tokens: int  # one micro-batch on every rank together
    full_tokens: int  # one optimizer step after any batch ramp
    total_steps: int  # the LR schedule's horizon (0: time-limited, hold the peak after warmup)

    @classmethod
    def of(cls, tc: TrainConfig, seq_len: int, world_size: int) -> "StepPlan":
        micro = tc.micro_batch_size * seq_len * world_size
        full = accumulation_steps(tc.tokens_per_step, tc.micro_batch_size * world_size, seq_len) * micro
        if tc.max_steps:
            total = tc.max_steps
        elif tc.max_tokens:
            total = math.ceil(tc.max_tokens / full)
        else:
            total = 0
        return cls(tc, seq_len, world_size, micro, full, total)

    def step_tokens(self, tokens_seen: int) -> int:
        """Tokens in the next step (smaller during a batch-size ramp), a whole number of micro-batches."""
        return tokens_per_step_at(tokens_seen, self.config, self.full_tokens, self.micro_tokens)

    def lr(self, step: int) -> float:
        return lr_at(step, self.config, self.total_steps)

    def describe(self, parallel: str) -> str:
        """"4 x 2 ranks (ddp) x 8 x 1024": accumulation x ranks x micro-batch x sequence length."""
        ranks = f"{self.world_size} ranks ({parallel}) x " if self.world_size > 1 else ""
        return f"{self.full_tokens // self.micro_tokens} x {ranks}{self.config.micro_batch_size} x {self.seq_len}"


def fit_warmup(tc: TrainConfig, total_steps: int) -> tuple[TrainConfig, str | None]:
    """Scale a warmup that would eat the whole run (warmup_steps >= the schedule's steps) to a tenth of it.

    Returns the config to train with and a line saying what changed (None when nothing did)."""
    if not total_steps or tc.warmup_steps < total_steps:
        return tc, None
    import dataclasses
    scaled = max(1, total_steps // 10)
    return (dataclasses.replace(tc, warmup_steps=scaled),
            f"warning: train.warmup_steps={tc.warmup_steps} is not shorter than the run ({total_steps} steps): "
            f"warming up over {scaled} steps instead (set train.warmup_steps to choose)")


def forward_backward(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     n_batches: int, device: torch.device, precision: str) -> torch.Tensor:
    """Accumulate gradients over `n_batches` micro-batches; returns the mean loss (a detached tensor).

    Each micro-batch loss is divided by `n_batches`, so k micro-batches of size b give the gradient of one
    batch of size k·b (with masked targets, -100, each micro-batch's loss is its own mean over scored tokens).

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


def clip_and_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer | Optimizers, loss: torch.Tensor,
                  grad_clip: float) -> tuple[bool, float, float]:
    """Clip the global grad norm to `grad_clip` (0: no clipping), then step unless loss or gradient is
    non-finite.

    Returns (stepped, loss, grad_norm) with one host sync for both numbers. The norm is read before any
    gradient is changed, so clipping costs one read of the gradients rather than also a multiply over all
    of them: nothing is multiplied when the norm is within `grad_clip`, and a fused optimizer applies the
    clip factor as it reads each gradient (`step_with_scaled_gradients`). For GPT-2 on a 2-core CPU that
    multiply was ~25 ms of a ~700 ms bf16 step.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    norm = D.grad_norm(params)  # global norm, FSDP2's sharded grads included
    loss_value, norm_value = torch.stack([loss.float(), norm.float().to(loss.device)]).tolist()
    ok = math.isfinite(loss_value) and math.isfinite(norm_value)
    if ok:
        # torch.nn.utils.clip_grad_norm_'s factor: max_norm / (norm + 1e-6), never above 1
        factor = min(1.0, grad_clip / (norm_value + 1e-6)) if grad_clip > 0 else 1.0
        step_with_scaled_gradients(optimizer, params, factor)
    optimizer.zero_grad(set_to_none=True)
    return ok, loss_value, norm_value


def step_with_scaled_gradients(optimizer: torch.optim.Optimizer | Optimizers, params: list[torch.Tensor],
                               factor: float) -> None:
    """optimizer.step() as if every gradient of `params` had first been multiplied by `factor`.

    Fused Adam/AdamW (`_step_supports_amp_scaling`) divide each gradient by the optimizer's `grad_scale`
    tensor inside their one kernel: the protocol torch's GradScaler uses to unscale fp16 gradients, here
    carrying 1 / factor. That holds for FSDP2's DTensor parameters too (a one-element tensor beside them is
    taken as replicated). Other optimizers (Muon beside AdamW under train.optimizer=muon) get their
    gradients multiplied first.
    """
    if factor == 1.0:
        optimizer.step()
        return
    wanted = {id(p) for p in params}
    for opt in optimizers_of(optimizer):
        if getattr(opt, "_step_supports_amp_scaling", False):
            opt.grad_scale = torch.tensor(1.0 / factor, dtype=torch.float32, device=params[0].device)
            try:
                opt.step()
            finally:
                del opt.grad_scale
            continue
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) in wanted and p.grad is not None:
                    p.grad.mul_(factor)
        opt.step()


def is_oom(error: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    if isinstance(error, oom_type):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def oom_error(tc: TrainConfig, seq_len: int) -> UserError:
    return UserError(f"out of memory at train.micro_batch_size={tc.micro_batch_size}, seq_len={seq_len}; lower "
                     "train.micro_batch_size (train.tokens_per_step keeps the batch size through gradient "
                     "accumulation)")
