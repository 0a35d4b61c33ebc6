"""Mixed precision: bf16 autocast where the hardware computes bf16 natively, fp32 everywhere else.

Weights and optimizer state stay fp32 (master weights); only matmuls and friends run in bf16 inside
autocast. fp16 is never used: on a CPU it is ~1000x slower, and on a GPU it needs loss scaling that bf16
does not.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from .. import devices
from ..errors import UserError


def resolve_device(spec: str) -> torch.device:
    """`train.device`: the same rule as every command's --device (gptforge.devices), named as the option."""
    return devices.resolve_device(spec, option="train.device")


def cpu_has_native_bf16() -> bool:
    """True when oneDNN runs bf16 matmuls natively (AVX512-BF16 / AMX), i.e. faster than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(spec: str, device: torch.device) -> str:
    """"auto" -> "bf16" on CUDA with bf16 support or a CPU with native bf16, else "fp32"."""
    if spec == "fp32":
        return "fp32"
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
    elif device.type == "cpu":
        ok = cpu_has_native_bf16()
    else:
        ok = False
    if spec == "bf16" and not ok:
        raise UserError(f"train.precision=bf16: {device.type} here has no native bf16; use train.precision=fp32")
    return "bf16" if ok else "fp32"


def autocast(device: torch.device, precision: str) -> ContextManager:
    """The forward/backward context for `precision`: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
