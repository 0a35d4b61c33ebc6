"""torch.optim.Muon, with its Newton-Schulz iterations in float32 where the CPU has no native bf16 or the run
asked for fp32 (train.precision).

torch's Muon always orthogonalizes in bf16 (`_zeropower_via_newtonschulz` casts the momentum to bfloat16):
right on GPUs and on CPUs with AVX512-BF16 / AMX, where bf16 matmuls are the fast ones. On a CPU without them
oneDNN emulates bf16, and the iteration's matmuls run ~15-25x slower than in fp32 (measured on this project's
2-core AMD EPYC: a 384 x 128 matrix 15.5 ms in bf16 vs 0.9 ms in fp32 for 5 steps; 16 matrices of the
char-small model cost ~3 s per step, ten times the forward and backward). Torch offers no dtype option, so
`muon_optimizer` returns torch's own class where the run computes in bf16 and otherwise this subclass, whose step is
torch's (same state, "momentum_buffer"; same group settings; the same shape adjustment of the learning rate)
with the iteration in `ns_dtype`. With ns_dtype=bfloat16 it reproduces torch's step bit for bit (tested).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .precision import resolve_precision


def newton_schulz(update: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """torch's quintic Newton-Schulz orthogonalization (Keller Jordan's coefficients) computed in `dtype`: the
    matrix scaled to Frobenius norm <= 1, then `steps` of X <- aX + (bA + cA^2)X with A = XX^T, on the wide
    orientation so A is the smaller Gram matrix."""
    a, b, c = coefficients
    x = update.to(dtype)
    tall = update.size(0) > update.size(1)
    if tall:
        x = x.T
    x = x.div(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch's adjustment: "original" scales by sqrt(max(1, rows / cols)), "match_rms_adamw" by 0.2 sqrt(max)."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(max(1.0, rows / cols))


class Muon(torch.optim.Muon):
    """torch.optim.Muon whose Newton-Schulz runs in `ns_dtype` (see the module docstring)."""

    def __init__(self, params: Any, ns_dtype: torch.dtype = torch.float32, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            buffers: list[torch.Tensor] = []
            self._init_group(group, params, grads, buffers)
            lr, momentum = group["lr"], group["momentum"]
            for param, grad, buf in zip(params, grads, buffers):
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                       self.ns_dtype)
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], param.shape))
        return loss


def muon_optimizer(groups: list[dict], device: torch.device, precision: str = "auto",
                   **kwargs: Any) -> torch.optim.Muon:
    """torch's Muon where the run computes in bf16 (`precision`, train.precision, resolved on `device`), else
    `Muon` with a float32 Newton-Schulz: on a CPU without native bf16, and in a run that asked for fp32, whose
    arithmetic should then be fp32 throughout (torch's bf16 iteration turns a ~1e-7 difference in the gradient,
    such as another summation order across ranks, into whole bf16 steps of the update: 3e-3 apart in weights
    after 8 steps of a 2-rank run that agrees to 1e-4 in fp32)."""
    if resolve_precision(precision, device) == "bf16":
        return torch.optim.Muon(groups, **kwargs)
    return Muon(groups, ns_dtype=torch.float32, **kwargs)
