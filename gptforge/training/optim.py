"""AdamW as GPT-3 Appendix B sets it up, with weight decay only where it regularises.

Decoupled weight decay applies to every parameter with two or more dimensions: the matmul weights and,
following GPT-2/nanoGPT convention, the token and position embeddings (2-D tables; the token table is also
the tied output head). Biases and LayerNorm gains/shifts (1-D) are not decayed: shrinking them toward zero
only fights the normalisation.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from ..config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: >=2-D tensors with `weight_decay`, the rest (biases, norms) with none.

    Tied parameters appear once (named_parameters de-duplicates them), so the shared embedding/head
    matrix gets one update per step.
    """
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
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


def fused_supported(device: torch.device) -> bool:
    """Fused AdamW exists for CUDA, and for CPU since torch 2.4; it is one kernel instead of a dozen."""
    if "fused" not in inspect.signature(torch.optim.AdamW).parameters:
        return False
    return device.type in ("cuda", "cpu")


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device | str) -> torch.optim.AdamW:
    """AdamW(betas, eps from `config`) over `param_groups`, fused where the device supports it."""
    device = torch.device(device)
    groups = param_groups(model, config.weight_decay)
    kwargs = {"fused": True} if fused_supported(device) else {}
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps, **kwargs)
