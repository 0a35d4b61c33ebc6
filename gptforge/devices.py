"""`--device` and `--dtype` for the commands that run a model (sample, eval) and `train.device` for training,
checked the same way everywhere.

Checked before any model is loaded, so a typo or a GPU-less machine costs a second and one clear line
instead of an AssertionError from deep inside torch after the weights were read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:  # torch is imported inside the functions: argparse setup must not pay for it
    import torch

#: Spellings accepted by --dtype (argparse choices) -> torch's attribute name.
DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
               "fp16": "float16", "float16": "float16"}
DTYPE_CHOICES = tuple(DTYPE_NAMES)
DEVICE_TYPES = ("cpu", "cuda", "mps")


def resolve_device(name: str | None, option: str = "--device") -> torch.device:
    """The device `name` means, checked to be usable here. None or "auto": cuda when available, else cpu.

    One rule for every command and for training (`train.device`, through `option`, which error messages
    name): cpu, cuda, cuda:N or mps, and the device must accept a tensor, so a missing backend or GPU index
    is one line before any weights are read rather than an error from deep inside torch later.
    """
    import torch

    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{option} {name}: not a device name; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in DEVICE_TYPES:
        raise UserError(f"{option} {name}: unsupported device type; use auto, cpu, cuda, cuda:N or mps")
    try:
        torch.empty(0, device=device)  # torch raises AssertionError or RuntimeError for a missing backend/index
    except (RuntimeError, AssertionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{option} {name}: not available on this machine ({first}); use cpu or auto") from None
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The weights dtype for `--dtype name` on `device` (default: bfloat16 on CUDA, float32 elsewhere).

    float16 is refused on the CPU: torch has few fp16 CPU kernels and it runs around 1000x slower there,
    which looks like a hang rather than a choice anyone would make on purpose.
    """
    import torch

    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPE_NAMES:
        raise UserError(f"--dtype {name}: unknown; choose one of {', '.join(DTYPE_CHOICES)}")
    dtype = getattr(torch, DTYPE_NAMES[name])
    if dtype == torch.float16 and device.type == "cpu":
        raise UserError(f"--dtype {name}: float16 is about 1000x slower on the CPU; use float32 or bfloat16 there")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """The name results files record ("float32", "bfloat16"), without torch's "torch." prefix."""
    return str(dtype).removeprefix("torch.")
