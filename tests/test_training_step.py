"""Step arithmetic: batch geometry, the schedule horizon, and a warmup longer than the run."""

from __future__ import annotations

from gptforge.config import TrainConfig
from gptforge.training.schedule import lr_at
from gptforge.training.step import StepPlan, fit_warmup


def test_plan_geometry_and_horizon():
    tc = TrainConfig(micro_batch_size=4, tokens_per_step=1024, max_steps=0, max_tokens=10_000)
    plan = StepPlan.of(tc, seq_len=32, world_size=2)
    assert (plan.micro_tokens, plan.full_tokens) == (256, 1024)
    assert plan.total_steps == 10  # ceil(10000 / 1024)
    assert plan.describe("ddp") == "4 x 2 ranks (ddp) x 4 x 32"
    assert plan.lr(3) == lr_at(3, tc, 10)


def test_warmup_longer_than_the_run_is_scaled_and_said():
    tc = TrainConfig(max_steps=40, warmup_steps=100)
    fitted, note = fit_warmup(tc, 40)
    assert fitted.warmup_steps == 4 and "warmup_steps=100" in note and "4 steps" in note
    assert fit_warmup(TrainConfig(max_steps=400, warmup_steps=100), 400) == (TrainConfig(max_steps=400), None)
    assert fit_warmup(TrainConfig(max_steps=0, max_time=60, warmup_steps=100), 0)[1] is None  # no horizon
