"""Step arithmetic: batch geometry, the schedule horizon, a warmup longer than the run, and the clipped
optimizer step against torch's clip_grad_norm_."""

from __future__ import annotations

import pytest
import torch

from gptforge.config import ModelConfig, TrainConfig
from gptforge.model import GPT
from gptforge.training.schedule import lr_at
from gptforge.training.step import StepPlan, clip_and_step, fit_warmup, step_with_scaled_gradients


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


def _model_with_gradients(scale: float) -> tuple[GPT, torch.Tensor]:
    """A tiny GPT whose gradients are `scale` times the loss's (so their norm can be set above or below a clip)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=32))
    x = torch.randint(0, 61, (4, 16), generator=torch.Generator().manual_seed(1))
    _, loss = model(x, x)
    (loss * scale).backward()
    return model, loss.detach()


def _reference_step(scale: float, grad_clip: float, fused: bool) -> tuple[dict, float]:
    """What clip_and_step must equal: torch.nn.utils.clip_grad_norm_, then the optimizer's step."""
    model, _ = _model_with_gradients(scale)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-3, fused=fused)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip).item()
    opt.step()
    return model.state_dict(), norm


@pytest.mark.parametrize("fused", [True, False], ids=["fused-adamw", "foreach-adamw"])
@pytest.mark.parametrize("scale", [1.0, 1e-3], ids=["clipped", "within-the-clip"])
def test_clip_and_step_equals_torch_clip_grad_norm_then_step(fused, scale):
    model, loss = _model_with_gradients(scale)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-3, fused=fused)
    ok, loss_value, norm = clip_and_step(model, opt, loss, grad_clip=0.5)
    want, want_norm = _reference_step(scale, 0.5, fused)
    assert ok and loss_value == loss.item()
    assert norm == pytest.approx(want_norm, rel=1e-6)
    assert (norm > 0.5) == (scale == 1.0)  # one case clips, the other does not
    for name, value in model.state_dict().items():
        # the fused kernel divides by 1/factor where clip_grad_norm_ multiplies by factor: a rounding apart
        torch.testing.assert_close(value, want[name], rtol=1e-6, atol=1e-7)
    assert not hasattr(opt, "grad_scale")  # the fused optimizer's scale does not outlive the step
    assert all(p.grad is None for p in model.parameters())


def test_clipping_changes_the_update():
    """The comparison above can fail: an unclipped step moves the weights differently."""
    clipped, _ = _reference_step(1.0, 0.5, True)
    unclipped, _ = _reference_step(1.0, 1e9, True)
    assert any(not torch.allclose(clipped[k], unclipped[k], rtol=1e-4, atol=1e-6) for k in clipped)


def test_scaled_step_without_amp_scaling_multiplies_the_gradients():
    model, _ = _model_with_gradients(1.0)
    grads = [p.grad.clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    step_with_scaled_gradients(opt, list(model.parameters()), 0.25)
    for p, b, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), b - 0.25 * g)


def test_muon_and_adamw_clip_as_torch_clip_grad_norm_then_step():
    """Under train.optimizer=muon fused AdamW takes the clip factor as grad_scale, Muon its gradients multiplied:
    together they equal clip_grad_norm_ over all parameters, then both steps. Two steps, since Muon's first
    update does not depend on the gradient's scale (the orthogonalization normalizes it); its second mixes the
    clipped gradient with the momentum of the first."""
    from gptforge.training.optim import build_optimizer, optimizers_of
    tc = TrainConfig(optimizer="muon", lr=1e-2, eps=1e-3)
    x = torch.randint(0, 61, (4, 16), generator=torch.Generator().manual_seed(1))

    def two_steps(second_step) -> tuple[dict, float]:
        torch.manual_seed(0)
        model = GPT(ModelConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=32))
        opt = build_optimizer(model, tc, "cpu")
        for scale in (1e-3, 1.0):  # within the clip, then clipped
            _, loss = model(x, x)
            (loss * scale).backward()
            norm = second_step(model, opt, loss) if scale == 1.0 else clip_and_step(model, opt, loss, 0.5)[2]
        return model.state_dict(), norm

    def torch_clip(max_norm):
        def step(model, opt, loss):
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
            for o in optimizers_of(opt):
                o.step()
            return norm
        return step

    got, norm = two_steps(lambda model, opt, loss: clip_and_step(model, opt, loss, grad_clip=0.5)[2])
    want, want_norm = two_steps(torch_clip(0.5))
    unclipped, _ = two_steps(torch_clip(1e9))
    assert norm == pytest.approx(want_norm, rel=1e-6) and norm > 0.5
    for name, value in got.items():
        torch.testing.assert_close(value, want[name], rtol=1e-6, atol=1e-7)
    block = "transformer.h.0.attn.c_proj.weight"  # Muon's: the check can fail there too
    assert not torch.allclose(got[block], unclipped[block], rtol=1e-5, atol=1e-7)
