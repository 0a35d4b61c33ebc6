"""Resolve what a user passes as `--model` into a model (and its tokenizer when there is one).

Accepted, in this order: `hf:DIR` or a directory holding a Hugging Face `config.json`; a run directory
(`config.json` + `checkpoints/`, newest valid checkpoint); a checkpoint directory (`model.safetensors`);
a `.safetensors` file; a preset name (random weights, for speed tests).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .config import PRESETS, get_preset
from .errors import UserError
from .model import GPT
from .weights import WEIGHTS_FILE, load_weights

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

TOKENIZER_DIR = "tokenizer"
RUN_CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"


def _is_hf_dir(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return "model_type" in json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def find_tokenizer_dir(path: Path) -> Path | None:
    """The tokenizer saved with the weights in directory `path`: `path/tokenizer`, or the run's own
    `tokenizer/` when `path` is `RUN/checkpoints/step_N`.

    Only that exact layout looks outside `path`: a checkpoint directory or .safetensors file elsewhere
    (say in the working directory) must not pick up whatever unrelated `tokenizer/` sits two levels up.
    """
    candidates = [path / TOKENIZER_DIR]
    if path.resolve().parent.name == CHECKPOINTS_DIR:
        candidates.append(path.resolve().parent.parent / TOKENIZER_DIR)
    return next((c for c in candidates if c.is_dir()), None)


def load_model(spec: str, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> tuple[GPT, "Tokenizer | None"]:
    """Load the model `spec` names, in eval mode, with the tokenizer saved beside it (None for a preset)."""
    from .tokenizer import load_tokenizer

    path = Path(spec[3:] if spec.startswith("hf:") else spec)
    if spec.startswith("hf:") or (path.is_dir() and _is_hf_dir(path)):
        from .interop.hf import load_hf_model
        model, tokenizer = load_hf_model(path)
        return model.to(device=device, dtype=dtype).eval(), tokenizer
    if path.is_dir() and (path / CHECKPOINTS_DIR).is_dir():
        from .train.checkpoint import latest_valid_checkpoint
        checkpoint = latest_valid_checkpoint(path)
        if checkpoint is None:
            raise UserError(f"run directory {path} has no valid checkpoint yet; train it first "
                            "(gptforge train) or pass a checkpoint directory")
        path = checkpoint
    if path.is_dir():
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            from .train.dist_checkpoint import is_sharded_checkpoint
            if is_sharded_checkpoint(path):
                raise UserError(f"--model {spec}: a sharded (FSDP) checkpoint; make the single-file weights first "
                                f"with `gptforge consolidate {spec}`")
            raise UserError(f"--model {spec}: directory has no {WEIGHTS_FILE}, no checkpoints/ and no Hugging Face "
                            "config.json; pass a run directory, a checkpoint directory or a preset name")
        tokenizer_dir = find_tokenizer_dir(path)
        tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir else None
        return load_weights(weights, device, dtype).eval(), tokenizer
    if path.suffix == ".safetensors" and path.is_file():
        tokenizer_dir = find_tokenizer_dir(path.parent)
        tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir else None
        return load_weights(path, device, dtype).eval(), tokenizer
    if spec in PRESETS:
        model = GPT(get_preset(spec))
        return model.to(device=device, dtype=dtype).eval(), None
    if path.exists():
        raise UserError(f"--model {spec}: not a run directory, checkpoint, safetensors file or HF directory")
    raise UserError(f"--model {spec}: no such path and not a preset name (presets: {', '.join(PRESETS)})")
