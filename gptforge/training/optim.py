"""The optimizer: AdamW as GPT-3 Appendix B sets it up, or Muon for the blocks' matrices with AdamW for the rest.

AdamW: decoupled weight decay applies to every parameter with two or more dimensions: the matmul weights and,
following GPT-2/nanoGPT convention, the token and position embeddings (2-D tables; the token table is also
the tied output head). Biases and LayerNorm gains/shifts (1-D) are not decayed: shrinking them toward zero
only fights the normalisation.

Muon (`train.optimizer = "muon"`, torch.optim.Muon; muon.py says when its iteration runs in fp32 instead):
momentum orthogonalized by Newton-Schulz iterations. It is meant for hidden layers' 2-D weights only (torch refuses any other shape), so it takes the attention and MLP
matrices inside the blocks; the embeddings (whose rows are looked up, not multiplied: an orthogonalized update
would spread each token's gradient over every row) and the tied head, the biases and the LayerNorms stay with
AdamW exactly as above. Two torch optimizers, stepped as one by `Optimizers`; the schedule scales both.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn

from ..config import TrainConfig
from .muon import muon_optimizer

BLOCKS_PREFIX = "transformer.h."  # parameters inside the transformer blocks (gptforge.model's names)


def param_groups(model: nn.Module, weight_decay: float, exclude: frozenset[str] = frozenset()) -> list[dict]:
    """Two AdamW groups: >=2-D tensors with `weight_decay`, the rest (biases, norms) with none; parameters named
    in `exclude` (Muon's) are left out.

    Tied parameters appear once (named_parameters de-duplicates them), so the shared embedding/head
    matrix gets one update per step.
    """
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or name in exclude:
            continue
        if p.dim() >= 2:
            decay.append(p)
            decay_names.append(name)
        else:
            no_decay.append(p)
            no_decay_names.append(name)
    return [
        {"params": decay, "weight_decay": weight_decay, "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
    ]


def muon_param_names(model: nn.Module) -> list[str]:
    """The 2-D weights inside the blocks (attention c_attn / c_proj, MLP c_fc / c_proj): Muon's parameters."""
    return [name for name, p in model.named_parameters()
            if p.requires_grad and p.dim() == 2 and name.startswith(BLOCKS_PREFIX)]


def fused_supported(device: torch.device) -> bool:
    """Fused AdamW exists for CUDA, and for CPU since torch 2.4; it is one kernel instead of a dozen."""
    if "fused" not in inspect.signature(torch.optim.AdamW).parameters:
        return False
    return device.type in ("cuda", "cpu")


class Optimizers:
    """Several torch optimizers over disjoint parameters, used as one: `param_groups` (all of them, in order),
    `step`, `zero_grad`. Checkpoints store each one's state by parameter name (`optimizers_of`), so the
    trainer, clipping and checkpointing code keep handling "the optimizer"."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = tuple(optimizers)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)


def optimizers_of(optimizer: torch.optim.Optimizer | Optimizers) -> tuple[torch.optim.Optimizer, ...]:
    """The torch optimizers behind `optimizer` (itself, when it is one)."""
    return optimizer.optimizers if isinstance(optimizer, Optimizers) else (optimizer,)


def build_optimizer(model: nn.Module, config: TrainConfig,
                    device: torch.device | str) -> torch.optim.AdamW | Optimizers:
    """AdamW(betas, eps from `config`) over `param_groups`, fused where the device supports it; with
    `config.optimizer == "muon"`, torch's Muon (train.muon_*) for `muon_param_names` and that AdamW for the rest.

    Muon's group carries `lr_scale` = muon_lr / lr: `set_lr` gives it the schedule's factor of its own peak.
    Its update is scaled by sqrt(max(1, rows / cols)) (torch's "original" adjust_lr_fn, Keller Jordan's), so a
    wide-output matrix (c_fc, c_attn) moves as much per entry RMS as a square one.
    """
    device = torch.device(device)
    kwargs = {"fused": True} if fused_supported(device) else {}
    if config.optimizer == "adamw":
        groups = param_groups(model, config.weight_decay)
        return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps, **kwargs)
    names = muon_param_names(model)
    params = dict(model.named_parameters())
    adamw = torch.optim.AdamW(param_groups(model, config.weight_decay, frozenset(names)), lr=config.lr,
                              betas=(config.beta1, config.beta2), eps=config.eps, **kwargs)
    muon_group = {"params": [params[n] for n in names], "names": names, "lr_scale": config.muon_lr / config.lr}
    muon = muon_optimizer([muon_group], device, config.precision, lr=config.muon_lr,
                          weight_decay=config.muon_weight_decay, momentum=config.muon_momentum,
                          nesterov=config.muon_nesterov, ns_steps=config.muon_ns_steps, adjust_lr_fn="original")
    return Optimizers([adamw, muon])


def set_lr(optimizer: torch.optim.Optimizer | Optimizers, lr: float) -> None:
    """Every group at the schedule's `lr` (train.lr's curve); a group with `lr_scale` (Muon's) at lr x lr_scale,
    so the warmup and decay shape both optimizers alike."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr
