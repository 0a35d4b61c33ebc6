"""Muon: our float32 Newton-Schulz subclass against torch.optim.Muon itself, and which class a device gets."""

from __future__ import annotations

import pytest
import torch

from gptforge.training import muon as M

SHAPES = [(96, 32), (32, 32), (32, 128)]  # tall (c_attn, c_fc), square (attn c_proj), wide (mlp c_proj)


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _run(opt_factory, steps: int = 3) -> list[torch.Tensor]:
    params = _params()
    opt = opt_factory(params)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach() for p in params]


SETTINGS = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=True, ns_steps=5)


def test_in_bf16_the_subclass_is_torchs_muon_bit_for_bit():
    ours = _run(lambda ps: M.Muon(ps, ns_dtype=torch.bfloat16, **SETTINGS))
    torch_ = _run(lambda ps: torch.optim.Muon(ps, **SETTINGS))
    assert all(torch.equal(a, b) for a, b in zip(ours, torch_))


def test_in_fp32_the_subclass_agrees_with_torchs_muon_to_bf16_rounding():
    ours = _run(lambda ps: M.Muon(ps, ns_dtype=torch.float32, **SETTINGS))
    torch_ = _run(lambda ps: torch.optim.Muon(ps, **SETTINGS))
    start = _params()
    for a, b, s in zip(ours, torch_, start):
        moved = (b - s).abs().mean()
        # the updates agree to what five bf16 iterations leave of bf16's ~3 significant digits
        assert (a - b).abs().mean() < 0.02 * moved and (a - b).abs().max() < 0.1 * moved
        assert not torch.equal(a, b)  # and it really is another computation


def test_newton_schulz_orthogonalizes_and_scales_the_update_as_torch_does():
    g = torch.Generator().manual_seed(2)
    for rows, cols in SHAPES:
        x = M.newton_schulz(torch.randn(rows, cols, generator=g), (3.4445, -4.7750, 2.0315), 5, 1e-7,
                            torch.float32)
        s = torch.linalg.svdvals(x)
        assert x.shape == (rows, cols) and s.min() > 0.3 and s.max() < 1.3  # ~US'V^T: singular values near 1
    assert M.adjusted_lr(0.02, "original", torch.Size((96, 32))) == pytest.approx(0.02 * 3 ** 0.5)
    assert M.adjusted_lr(0.02, "original", torch.Size((32, 128))) == 0.02
    assert M.adjusted_lr(0.02, "match_rms_adamw", torch.Size((32, 128))) == pytest.approx(0.02 * 0.2 * 128 ** 0.5)


def test_torchs_own_class_where_bf16_is_native(monkeypatch):
    params = _params()
    monkeypatch.setattr(M, "resolve_precision", lambda spec, device: "bf16")
    assert type(M.muon_optimizer(params, torch.device("cpu"), lr=0.02)) is torch.optim.Muon
    monkeypatch.setattr(M, "resolve_precision", lambda spec, device: "fp32")
    opt = M.muon_optimizer(params, torch.device("cpu"), lr=0.02)
    assert type(opt) is M.Muon and opt.ns_dtype == torch.float32


def test_a_run_that_asks_for_fp32_orthogonalizes_in_fp32(monkeypatch):
    """train.precision=fp32 on a CPU with native bf16: the Newton-Schulz runs in fp32 (torch's would run in bf16,
    where another summation order of the same gradient moves the weights by whole bf16 steps of an update)."""
    from gptforge.training import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    params = _params()
    assert type(M.muon_optimizer(params, torch.device("cpu"), "auto", lr=0.02)) is torch.optim.Muon
    opt = M.muon_optimizer(params, torch.device("cpu"), "fp32", lr=0.02)
    assert type(opt) is M.Muon and opt.ns_dtype == torch.float32
    from gptforge.config import ModelConfig, TrainConfig
    from gptforge.model import GPT
    from gptforge.training.optim import build_optimizer, optimizers_of

    model = GPT(ModelConfig(vocab_size=61, block_size=16, n_layer=1, n_head=2, n_embd=32))
    for spec, expected in (("fp32", M.Muon), ("auto", torch.optim.Muon)):
        built = optimizers_of(build_optimizer(model, TrainConfig(optimizer="muon", precision=spec), "cpu"))
        assert [type(o) for o in built if isinstance(o, torch.optim.Muon)] == [expected]
