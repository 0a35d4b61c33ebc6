"""LR schedules and the batch-size ramp at known steps (hand-computed values)."""

from __future__ import annotations

import math

import pytest

from gptforge.config import TrainConfig
from gptforge.training.schedule import accumulation_steps, lr_at, tokens_per_step_at


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"lr": 1.0, "warmup_steps": 10, "min_lr_ratio": 0.1, **kw})


def test_cosine_warmup_peak_middle_floor():
    c = cfg(schedule="cosine")
    assert lr_at(0, c, 110) == pytest.approx(0.1)  # (0+1)/10
    assert lr_at(4, c, 110) == pytest.approx(0.5)
    assert lr_at(9, c, 110) == pytest.approx(1.0)
    assert lr_at(10, c, 110) == pytest.approx(1.0)  # decay starts at the peak
    assert lr_at(60, c, 110) == pytest.approx(0.55)  # half-way: floor + (peak - floor)/2
    assert lr_at(35, c, 110) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, c, 110) == pytest.approx(0.1)
    assert lr_at(500, c, 110) == pytest.approx(0.1)


def test_wsd_holds_then_decays_linearly():
    c = cfg(schedule="wsd", decay_fraction=0.2)
    assert lr_at(50, c, 100) == 1.0
    assert lr_at(79, c, 100) == 1.0
    assert lr_at(80, c, 100) == pytest.approx(1.0)
    assert lr_at(90, c, 100) == pytest.approx(0.55)
    assert lr_at(100, c, 100) == pytest.approx(0.1)


def test_constant_after_warmup():
    c = cfg(schedule="constant")
    assert lr_at(4, c, 100) == pytest.approx(0.5)
    assert lr_at(10_000, c, 100) == 1.0


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_unknown_length_holds_the_peak_after_warmup(schedule):
    c = cfg(schedule=schedule)  # a run stopped only by max_time has no step count to decay over
    assert lr_at(4, c, 0) == pytest.approx(0.5)
    assert lr_at(10, c, 0) == 1.0
    assert lr_at(10_000, c, 0) == 1.0


def test_batch_ramp_from_32k_tokens():
    c = cfg(batch_ramp_tokens=1_000_000, batch_ramp_start=32768)
    full, micro = 524288, 8192
    assert tokens_per_step_at(0, c, full, micro) == 32768
    mid = tokens_per_step_at(500_000, c, full, micro)
    assert mid == round((32768 + (full - 32768) / 2) / micro) * micro
    assert tokens_per_step_at(1_000_000, c, full, micro) == full
    assert tokens_per_step_at(5_000_000, c, full, micro) == full
    assert tokens_per_step_at(0, cfg(), full, micro) == full  # no ramp


def test_accumulation_from_tokens_per_step():
    assert accumulation_steps(0, 8, 64) == 1
    assert accumulation_steps(4096, 8, 64) == 8
    assert accumulation_steps(512, 8, 64) == 1
