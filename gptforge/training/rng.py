"""Every random number generator a training step draws from, saved to and restored from plain JSON.

Exact resume needs the RNG streams to continue where they stopped: Python's `random`, NumPy's global
generator, torch's CPU generator (dropout on CPU) and the generator of the CUDA device this process trains
on. States are stored as JSON (base64 for torch's byte tensors) so state.json stays readable and pickle-free.

Only the training device's CUDA generator is kept ("cuda_device"): it is the only one a step draws from,
and a state per visible GPU ("cuda", written by earlier versions) could not be restored where fewer GPUs
are visible. Such an older state is still read: its entry for this process's device is taken.
"""

from __future__ import annotations

import base64
import random
from typing import Any

import numpy as np
import torch

from ..errors import UserError


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (every device) with `seed`."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def capture_rng(device: torch.device | None = None) -> dict[str, Any]:
    """Every RNG a step can draw from: Python, NumPy, torch CPU and, when `device` is a CUDA device, its
    generator."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": _b64(torch.get_rng_state()),
    }
    if device is not None and device.type == "cuda":
        state["cuda_device"] = _b64(torch.cuda.get_rng_state(_cuda_index(device)))
    return state


def restore_rng(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Inverse of `capture_rng` (raises KeyError/TypeError/ValueError on a malformed state, UserError when
    an older per-GPU state has no entry for `device`)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(_unb64(state["torch"]))
    if device is None or device.type != "cuda":
        return
    index = _cuda_index(device)
    if "cuda_device" in state:
        saved = state["cuda_device"]
    elif "cuda" in state:  # an older checkpoint: one state per GPU visible when it was saved
        per_gpu = state["cuda"]
        if not isinstance(per_gpu, list):
            raise TypeError(f"'cuda' is a {type(per_gpu).__name__}, not a list")
        if index >= len(per_gpu):
            raise UserError(f"the checkpoint's CUDA random state covers {len(per_gpu)} GPU(s), none for cuda:{index} "
                            "that this process trains on; resume with the GPUs it was saved with visible "
                            "(CUDA_VISIBLE_DEVICES), or start over with --fresh")
        saved = per_gpu[index]
    else:
        return  # saved on CPU: the CUDA generator keeps its seeded state
    torch.cuda.set_rng_state(_unb64(saved), index)
