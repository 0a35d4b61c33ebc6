"""Checks and loads done before a run touches its directory: memory, the tokenizer, initial weights.

A run that cannot start must say so in one line while the run directory (and any previous run in it) is
still as the user left it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from ..config import ModelConfig
from ..errors import UserError
from ..info import parameter_counts
from ..units import human_bytes

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

STATE_BYTES_PER_PARAM = 16  # fp32 weights, gradients and AdamW's two moments


def device_memory(device: torch.device) -> int | None:
    """Total memory of `device` in bytes (host RAM for the CPU), or None when unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits_memory(config: ModelConfig, world_size: int, parallel: str, device: torch.device) -> None:
    """Refuse, before allocating anything, a model whose weights, gradients and AdamW state alone (16 bytes
    a parameter, sharded under FSDP2) exceed the device's memory — activations would only add to it."""
    params = parameter_counts(config)["total"] + (config.padded_vocab_size - config.vocab_size) * config.n_embd
    need = STATE_BYTES_PER_PARAM * params // (world_size if parallel == "fsdp" else 1)
    have = device_memory(device)
    if have is not None and need > have:
        raise UserError(f"model too large for this machine: {params:,} parameters need {human_bytes(need)} for "
                        f"weights, gradients and AdamW state alone, and {device} has {human_bytes(have)}; lower "
                        f"model.n_layer / n_embd / block_size (block_size={config.block_size}) — see "
                        "`gptforge info`")


def load_tokenizer_or_none(path: Path, strict: bool, log: Callable[[str], None] | None = None) -> "Tokenizer | None":
    """The tokenizer saved at `path` (None when there is none). A damaged one is a UserError when `strict`
    (the data's, checked before a run starts), else a warning (a run's own copy, used only for samples)."""
    if not path.is_dir():
        return None
    from ..tokenizer import load_tokenizer
    try:
        return load_tokenizer(path)
    except (ImportError, UserError) as e:
        if strict:
            raise UserError(f"tokenizer {path} cannot be loaded ({e}); prepare the data again") from None
        if log:
            log(f"warning: no samples during training: cannot load {path} ({e})")
        return None


def load_init_weights(spec: str, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The weights of `spec` (anything --model accepts) for a new run of shape `config`, on the CPU."""
    from ..loading import load_model
    from .checkpoint import model_config_differences

    model, _ = load_model(spec, device="cpu")
    saved = {k: v for k, v in model.config.to_dict().items() if k != "dropout"}
    wanted = {k: v for k, v in config.to_dict().items() if k != "dropout"}
    differing = model_config_differences(saved, wanted)
    if differing:
        raise UserError(f"train.init_from {spec}: its model differs from this run's ({differing}); drop the model "
                        "settings that change its shape (only model.dropout may differ)")
    return {k: v.float() for k, v in model.state_dict().items()}
