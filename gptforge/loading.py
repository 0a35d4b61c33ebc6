"""Resolve what a user passes as `--model` into a model (and its tokenizer when there is one).

Accepted, in this order: `hf:DIR` or a directory holding a Hugging Face `config.json`; a run directory
(`config.json` + `checkpoints/`, newest valid checkpoint); a checkpoint directory (`model.safetensors`);
a `.safetensors` file; a preset name (random weights, for speed tests).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .config import GPT2_VOCAB_SIZE, PRESETS, get_preset
from .errors import UserError
from .layout import CHECKPOINTS_DIR, TOKENIZER_DIR, WEIGHTS_FILE, is_sharded_checkpoint, latest_valid_checkpoint
from .model import GPT
from .weights import load_weights

if TYPE_CHECKING:
    from .tokenizer import Tokenizer


def _is_hf_dir(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return "model_type" in json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
        checkpoint = latest_valid_checkpoint(path, report=_warn)
        if checkpoint is None:
            raise UserError(f"run directory {path} has no valid checkpoint yet; train it first "
                            "(gptforge train) or pass a checkpoint directory")
        path = checkpoint
    if path.is_dir():
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
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


def default_tokenizer(model: GPT, spec: str, hint: str = "") -> "Tokenizer":
    """The tokenizer for a model loaded without one (a preset, a bare .safetensors, an HF directory without
    tokenizer files), the same for sample, eval and export: GPT-2's when the vocabulary is exactly GPT-2's
    50,257 ids (the one vocabulary recognisable by its size), else one line saying what to pass instead.
    `hint` adds a command's own way out (export: " or pass --tokenizer")."""
    if model.config.vocab_size == GPT2_VOCAB_SIZE:
        from .tokenizer import get_tokenizer
        return get_tokenizer("gpt2")
    raise UserError(f"--model {spec}: no tokenizer saved with it and its vocabulary ({model.config.vocab_size:,} "
                    f"ids) is not GPT-2's ({GPT2_VOCAB_SIZE:,}); use a run or checkpoint directory with its "
                    f"tokenizer/{hint}")
