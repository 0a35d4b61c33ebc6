"""Model weights on disk: safetensors with the model config in the metadata, so a file is self-describing.

The tied output head is not stored (it *is* the token embedding); loading re-ties it. Nothing here uses
pickle, so a weights file from a stranger cannot run code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import atomic
from .config import ModelConfig
from .errors import UserError
from .model import GPT

WEIGHTS_FILE = "model.safetensors"
CONFIG_METADATA_KEY = "gptforge_model_config"
TIED_KEYS = ("lm_head.weight",)


def model_state_for_saving(model: GPT) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in TIED_KEYS}


def save_weights(model: GPT, path: str | os.PathLike) -> None:
    """Write `model`'s weights (and its config, as metadata) to `path` atomically."""
    metadata = {CONFIG_METADATA_KEY: json.dumps(model.config.to_dict())}
    with atomic.atomic_file(path) as tmp:
        save_file(model_state_for_saving(model), str(tmp), metadata=metadata)


def _unreadable(path: Path, e: Exception) -> UserError:
    return UserError(f"weights file {path} is not a readable safetensors file ({e}); "
                     "it may be truncated: re-copy it or use an earlier checkpoint")


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The model config a gptforge safetensors file carries in its metadata; the tensors are not read, so
    describing a multi-GB checkpoint (`gptforge info --model`) costs one small read."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise _unreadable(path, e) from None
    if CONFIG_METADATA_KEY not in metadata:
        raise UserError(f"weights file {path} has no gptforge model config in its metadata; "
                        "was it written by gptforge? (Hugging Face directories load with --model hf:DIR)")
    return ModelConfig.from_dict(json.loads(metadata[CONFIG_METADATA_KEY]))


def read_weights(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The config and tensors stored in a gptforge safetensors file, or a UserError saying what is wrong."""
    config = read_config(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise _unreadable(Path(path), e) from None
    return config, tensors


def load_state_into(model: GPT, tensors: dict[str, torch.Tensor], source: str, assign: bool = False) -> None:
    """Copy `tensors` into `model`, naming missing, unexpected or mis-shaped tensors if they do not fit.
    `assign=True` makes the tensors the model's parameters instead of copying them (see model_from_state)."""
    expected = model_state_for_saving(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}{'...' if len(unexpected) > 3 else ''}")
        if wrong_shape:
            k = wrong_shape[0]
            parts.append(f"{k} has shape {tuple(tensors[k].shape)}, the model needs {tuple(expected[k].shape)}")
        raise UserError(f"weights in {source} do not fit this model: {'; '.join(parts)}")
    model.load_state_dict(tensors, strict=False, assign=assign)


def model_from_state(config: ModelConfig, tensors: dict[str, torch.Tensor], source: str) -> GPT:
    """A GPT whose parameters are `tensors` themselves: built on the meta device without initialisation,
    then given the loaded tensors (no second copy of the weights, no random numbers drawn).

    Why not GPT(config) then copy: initialising draws ~all parameters' worth of random numbers only to
    overwrite them, and initialising on the meta device imports torch._dynamo (~1 s at load, more at exit)."""
    with torch.device("meta"):
        model = GPT(config, init_weights=False)
    load_state_into(model, {k: t.contiguous() for k, t in tensors.items()}, source, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # the head is not stored: tie it to the loaded embedding
    return model


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None) -> GPT:
    """Build the model a weights file describes and load its weights."""
    config, tensors = read_weights(path)
    model = model_from_state(config, tensors, str(path))
    return model.to(device=device, dtype=dtype) if dtype else model.to(device)
