"""AdamW set-up (decay groups, GPT-3 defaults) and gradient accumulation equivalence."""

from __future__ import annotations

import torch

from gptforge.config import ModelConfig, TrainConfig
from gptforge.model import GPT
from gptforge.training.optim import build_optimizer, param_groups
from gptforge.training.step import clip_and_step, forward_backward


def test_weight_decay_only_on_matrices_and_embeddings(tiny_config):
    model = GPT(tiny_config)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    names_decay, names_no = set(decay["names"]), set(no_decay["names"])
    assert "transformer.wte.weight" in names_decay and "transformer.wpe.weight" in names_decay
    assert "transformer.h.0.attn.c_attn.weight" in names_decay
    assert "transformer.h.0.attn.c_attn.bias" in names_no
    assert "transformer.h.0.ln_1.weight" in names_no and "transformer.ln_f.bias" in names_no
    assert "lm_head.weight" not in names_decay | names_no  # tied: updated once, through wte
    total = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == total


def test_gpt3_adamw_defaults(tiny_config):
    opt = build_optimizer(GPT(tiny_config), TrainConfig(), "cpu")
    group = opt.param_groups[0]
    assert group["betas"] == (0.9, 0.95) and group["eps"] == 1e-8 and group["weight_decay"] == 0.1


def _update(batches, n_batches):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=32))
    # eps 1e-3, not 1e-8: Adam's first update is lr·g/(|g|+eps), whose slope at g≈0 is lr/eps, so with a tiny
    # eps a gradient entry near zero turns float rounding (~1e-10) into a visible update difference
    opt = build_optimizer(model, TrainConfig(lr=1e-2, eps=1e-3), "cpu")
    loss = forward_backward(model, batches, n_batches, torch.device("cpu"), "fp32")
    ok, _, norm = clip_and_step(model, opt, loss, grad_clip=1.0)
    assert ok
    return {k: v.clone() for k, v in model.state_dict().items()}, norm


def test_accumulated_micro_batches_equal_one_big_batch():
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 61, (8, 17), generator=g)
    x, y = data[:, :-1], data[:, 1:]
    big, norm_big = _update([(x, y)], 1)
    small, norm_small = _update([(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)], 4)
    assert abs(norm_big - norm_small) < 1e-4 * norm_big
    # Adam's first step moves each weight by about lr (1e-2): float rounding between the two sums may only
    # show up far below that
    for k in big:
        torch.testing.assert_close(small[k], big[k], atol=5e-5, rtol=1e-5)
    # and the check can fail: a wrong divisor (sum instead of mean over micro-batches) changes the update
    wrong, norm_wrong = _update([(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)], 1)
    assert abs(norm_wrong - 4 * norm_big) < 1e-3 * norm_wrong


def test_non_finite_loss_skips_the_update(tiny_config):
    model = GPT(tiny_config)
    opt = build_optimizer(model, TrainConfig(), "cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 101, (2, 8))
    _, loss = model(x, x)
    (loss * float("nan")).backward()
    ok, _, _ = clip_and_step(model, opt, loss.detach() * float("nan"), 1.0)
    assert not ok
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
