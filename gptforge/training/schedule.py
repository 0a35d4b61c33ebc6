"""Learning-rate schedules and GPT-3's batch-size ramp, as pure functions of the step / tokens seen.

Pure functions so that a resumed run recomputes exactly the value an uninterrupted run would have used,
with nothing to save but the step counter and the token count.
"""

from __future__ import annotations

import math

from ..config import TrainConfig


def lr_at(step: int, config: TrainConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of a run of `total_steps` steps.

    cosine: linear warmup to `lr`, then half a cosine down to `min_lr_ratio * lr` at `total_steps`
    (GPT-3 Appendix B decays to 10% of peak). wsd: warmup, hold `lr`, then decay linearly to the floor over
    the last `decay_fraction` of the steps (warmup-stable-decay). constant: warmup, then hold.
    `total_steps` 0 means the length is unknown (a run stopped only by max_time): hold the peak after warmup.
    """
    peak = config.lr
    floor = config.min_lr_ratio * peak
    warmup = config.warmup_steps
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if config.schedule == "constant" or total_steps <= 0:
        return peak
    if step >= total_steps:
        return floor
    if config.schedule == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
    # wsd
    decay_steps = max(1, round(config.decay_fraction * total_steps))
    decay_start = max(warmup, total_steps - decay_steps)
    if step < decay_start:
        return peak
    progress = (step - decay_start) / max(1, total_steps - decay_start)
    return peak + (floor - peak) * progress


def tokens_per_step_at(tokens_seen: int, config: TrainConfig, full_tokens: int, micro_tokens: int) -> int:
    """Tokens in the next optimizer step, a whole number of micro-batches.

    Without a ramp this is `full_tokens`. With `batch_ramp_tokens`, GPT-3's ramp: grow linearly from
    `batch_ramp_start` tokens (32k in the paper) to the full batch over the first `batch_ramp_tokens` tokens.
    """
    if config.batch_ramp_tokens <= 0 or tokens_seen >= config.batch_ramp_tokens:
        target = full_tokens
    else:
        start = min(config.batch_ramp_start, full_tokens)
        target = start + (full_tokens - start) * tokens_seen / config.batch_ramp_tokens
    return max(1, round(target / micro_tokens)) * micro_tokens


def accumulation_steps(tokens_per_step: int, micro_batch_size: int, seq_len: int) -> int:
    """Micro-batches per optimizer step for a tokens-per-step target (at least one)."""
    micro_tokens = micro_batch_size * seq_len
    return max(1, round(tokens_per_step / micro_tokens)) if tokens_per_step else 1
