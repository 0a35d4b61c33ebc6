"""AdamW set-up (decay groups, GPT-3 defaults), Muon + AdamW groups, the schedule on both, and gradient
accumulation equivalence."""

from __future__ import annotations

import torch

from gptforge.config import ModelConfig, TrainConfig
from gptforge.model import GPT
import pytest

from gptforge.info import optimizer_groups
from gptforge.training.optim import Optimizers, build_optimizer, optimizers_of, param_groups, set_lr
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


def _update(batches, n_batches, optimizer="adamw"):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=32))
    # eps 1e-3, not 1e-8: Adam's first update is lr·g/(|g|+eps), whose slope at g≈0 is lr/eps, so with a tiny
    # eps a gradient entry near zero turns float rounding (~1e-10) into a visible update difference
    # precision fp32 as the forward: Muon's Newton-Schulz in fp32 too (in bf16 a rounding difference between
    # the two gradient sums can flip a bf16 rounding of the update and hide the arithmetic checked here)
    opt = build_optimizer(model, TrainConfig(lr=1e-2, eps=1e-3, optimizer=optimizer, precision="fp32"), "cpu")
    loss = forward_backward(model, batches, n_batches, torch.device("cpu"), "fp32")
    ok, _, norm = clip_and_step(model, opt, loss, grad_clip=1.0)
    assert ok
    return {k: v.clone() for k, v in model.state_dict().items()}, norm


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_accumulated_micro_batches_equal_one_big_batch(optimizer):
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 61, (8, 17), generator=g)
    x, y = data[:, :-1], data[:, 1:]
    big, norm_big = _update([(x, y)], 1, optimizer)
    small, norm_small = _update([(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)], 4, optimizer)
    assert abs(norm_big - norm_small) < 1e-4 * norm_big
    # Adam's first step moves each weight by about lr (1e-2): float rounding between the two sums may only
    # show up far below that
    for k in big:
        torch.testing.assert_close(small[k], big[k], atol=5e-5, rtol=1e-5)
    # and the check can fail: a wrong divisor (sum instead of mean over micro-batches) changes the update
    wrong, norm_wrong = _update([(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)], 1, optimizer)
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


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(tiny_config):
    model = GPT(tiny_config)
    opt = build_optimizer(model, TrainConfig(optimizer="muon", muon_lr=0.03, muon_momentum=0.9, muon_ns_steps=4,
                                             muon_nesterov=False, muon_weight_decay=0.01), "cpu")
    assert isinstance(opt, Optimizers)
    adamw, muon = optimizers_of(opt)
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    (muon_group,) = muon.param_groups
    want = {f"transformer.h.{i}.{m}.weight" for i in range(tiny_config.n_layer)
            for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert set(muon_group["names"]) == want
    assert (muon_group["lr"], muon_group["momentum"], muon_group["ns_steps"], muon_group["nesterov"],
            muon_group["weight_decay"]) == (0.03, 0.9, 4, False, 0.01)
    decay, no_decay = adamw.param_groups
    assert set(decay["names"]) == {"transformer.wte.weight", "transformer.wpe.weight"}  # the tied head is wte
    assert all(p.dim() == 1 for p in no_decay["params"]) and "transformer.h.0.attn.c_attn.bias" in no_decay["names"]
    every = [p for g in opt.param_groups for p in g["params"]]
    assert len(every) == len({id(p) for p in every}) == len(list(model.parameters()))
    # what `gptforge info` and the run's log say are the groups actually built
    described = {g["optimizer"] + ":" + str(g["weight_decay"]): g["parameters"]
                 for g in optimizer_groups(tiny_config, TrainConfig(optimizer="muon", muon_weight_decay=0.01))}
    padding = (tiny_config.padded_vocab_size - tiny_config.vocab_size) * tiny_config.n_embd  # info excludes it
    assert described == {"muon:0.01": sum(p.numel() for p in muon_group["params"]),
                         "adamw:0.1": sum(p.numel() for p in decay["params"]) - padding,
                         "adamw:0.0": sum(p.numel() for p in no_decay["params"])}


def test_the_schedule_scales_both_optimizers(tiny_config):
    opt = build_optimizer(GPT(tiny_config), TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02), "cpu")
    set_lr(opt, 5e-4)  # half the peak: warmup or decay
    adamw, muon = optimizers_of(opt)
    assert [g["lr"] for g in adamw.param_groups] == [5e-4, 5e-4]
    assert muon.param_groups[0]["lr"] == pytest.approx(0.01)
    plain = build_optimizer(GPT(tiny_config), TrainConfig(), "cpu")
    set_lr(plain, 3e-4)
    assert [g["lr"] for g in plain.param_groups] == [3e-4, 3e-4]
