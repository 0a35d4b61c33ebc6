"""Resolve what a user passes as `--model` into a model (and its tokenizer when there is one).

Accepted, in this order: `hf:DIR` or a directory holding a Hugging Face `config.json`; a run directory
(`config.json` + `checkpoints/`, newest valid checkpoint); a checkpoint directory (`model.safetensors`);
a `.safetensors` file; a preset name (random weights, for speed tests).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from .config import GPT2_VOCAB_SIZE, PRESETS, get_preset
from .errors import UserError
from .layout import (CHECKPOINTS_DIR, CHECKSUMS_FILE, STATE_FILE, TOKENIZER_DIR, WEIGHTS_FILE, is_sharded_checkpoint,
                     latest_valid_checkpoint)
from .model import GPT
from .weights import load_weights

if TYPE_CHECKING:
    from .tokenizer import Tokenizer


def is_hf_dir(path: Path) -> bool:
    """Whether `path` is a Hugging Face model directory: its config.json names a `model_type`, which a gptforge
    run's config.json never has. Public because `prepare --chat --tokenizer` must tell models apart exactly
    as `load_model` does."""
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return "model_type" in json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def read_json_object(path: Path) -> dict[str, Any]:
    """A small JSON object file (state.json, checksums.json), or {} when it is missing or damaged: for
    describing a checkpoint, where a damaged file is reported elsewhere and must not stop the report."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


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


@dataclass(frozen=True)
class ModelSource:
    """What a `--model` spec names, found before anything is loaded.

    kind: "hf" (a Hugging Face directory or hub id), "run" (a run directory; `path` is its newest valid
    checkpoint, None when it has none yet), "checkpoint" (a checkpoint directory with model.safetensors),
    "sharded" (an FSDP checkpoint not yet consolidated), "weights" (a .safetensors file), "preset".
    """

    spec: str
    kind: str
    path: Path | None = None
    run_dir: Path | None = None

    def provenance(self) -> dict[str, Any]:
        """Which weights exactly, for results files (eval --json, sample --json): the checkpoint directory,
        weights file or HF directory, and for a training checkpoint its step, tokens seen and the weights'
        sha256 as recorded in its checksums (nothing is re-hashed)."""
        found: dict[str, Any] = {"checkpoint": str(self.path) if self.path is not None else None}
        if self.kind in ("run", "checkpoint", "sharded") and self.path is not None:
            state = read_json_object(self.path / STATE_FILE)
            found.update({key: state.get(key) for key in ("step", "tokens")})
            sums = read_json_object(self.path / CHECKSUMS_FILE)
            if isinstance(sums.get(WEIGHTS_FILE), str):
                found["weights_sha256"] = sums[WEIGHTS_FILE]
        return found

    @property
    def weights(self) -> Path | None:
        if self.kind == "weights":
            return self.path
        if self.kind in ("run", "checkpoint") and self.path is not None:
            return self.path / WEIGHTS_FILE
        return None


def resolve_model_source(spec: str, report: Callable[[str], None] | None = _warn) -> ModelSource:
    """Classify `spec` (the order is the module docstring's), or a UserError naming --model. A run's broken
    newer checkpoints are skipped and each is `report`ed in one line (default: stderr)."""
    path = Path(spec[3:] if spec.startswith("hf:") else spec)
    if spec.startswith("hf:") or (path.is_dir() and is_hf_dir(path)):
        return ModelSource(spec, "hf", path)
    if path.is_dir() and (path / CHECKPOINTS_DIR).is_dir():
        return ModelSource(spec, "run", latest_valid_checkpoint(path, report=report), path)
    run_dir = path.resolve().parent.parent if path.resolve().parent.name == CHECKPOINTS_DIR else None
    if path.is_dir():
        if (path / WEIGHTS_FILE).is_file():
            return ModelSource(spec, "checkpoint", path, run_dir)
        if is_sharded_checkpoint(path):
            return ModelSource(spec, "sharded", path, run_dir)
        raise UserError(f"--model {spec}: directory has no {WEIGHTS_FILE}, no checkpoints/ and no Hugging Face "
                        "config.json; pass a run directory, a checkpoint directory or a preset name")
    if path.suffix == ".safetensors" and path.is_file():
        return ModelSource(spec, "weights", path)
    if spec in PRESETS:
        return ModelSource(spec, "preset")
    if path.exists():
        raise UserError(f"--model {spec}: not a run directory, checkpoint, safetensors file or HF directory")
    raise UserError(f"--model {spec}: no such path and not a preset name (presets: {', '.join(PRESETS)})")


def load_model(spec: str | ModelSource, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, seed: int | None = None) -> tuple[GPT, "Tokenizer | None"]:
    """Load the model `spec` names, in eval mode, with the tokenizer saved beside it (None for a preset).
    A preset's random weights are drawn from `seed` (the global RNG is left as it was)."""
    from .tokenizer import load_tokenizer

    source = spec if isinstance(spec, ModelSource) else resolve_model_source(spec)
    if source.kind == "hf":
        from .interop.hf import load_hf_model
        model, tokenizer = load_hf_model(source.path)
        return model.to(device=device, dtype=dtype).eval(), tokenizer
    if source.kind == "preset":
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            model = GPT(get_preset(source.spec))
        return model.to(device=device, dtype=dtype).eval(), None
    if source.kind == "sharded":
        raise UserError(f"--model {source.spec}: a sharded (FSDP) checkpoint; make the single-file weights first "
                        f"with `gptforge consolidate {source.spec}`")
    if source.weights is None:  # a run without a valid checkpoint
        raise UserError(f"run directory {source.run_dir} has no valid checkpoint yet; train it first "
                        "(gptforge train) or pass a checkpoint directory")
    tokenizer_dir = find_tokenizer_dir(source.weights.parent)
    tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir else None
    return load_weights(source.weights, device, dtype).eval(), tokenizer


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


def chosen_tokenizer(model: GPT, own: "Tokenizer | None", spec: str, choice: str | None = None,
                     option: str = "--tokenizer", hint: str = "") -> "Tokenizer":
    """The tokenizer to use with `model` (loaded from `spec` with tokenizer `own`, None when it has none):
    `choice` (gpt2, char, a directory...) when given, checked to fit; else `own`, else `default_tokenizer`.

    A tokenizer that does not fit writes a model that decodes to the wrong text, or a chat model without its
    markers and template that can no longer chat; so `choice` must have as many ids as `own` (without one:
    no more than the model's vocabulary) and the same special tokens and chat template. Fitting is all a
    replacement can do: export a model's own tokenizer in another form, or give bare weights one."""
    if choice is None:
        return own or default_tokenizer(model, spec, hint=hint)
    from .tokenizer import get_tokenizer

    tokenizer = get_tokenizer(choice)
    name = f"{option} {choice}"
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"{name} has {tokenizer.vocab_size:,} ids but the model {spec} only "
                        f"{model.config.vocab_size:,}; pass the tokenizer the model was trained with")
    if own is None:
        return tokenizer
    if tokenizer.vocab_size != own.vocab_size:
        raise UserError(f"{name} has {tokenizer.vocab_size:,} ids but the model {spec} was trained with a "
                        f"{own.vocab_size:,}-id tokenizer; leave {option} out to use the one saved with it")
    if tokenizer.special_tokens != own.special_tokens or tokenizer.chat_template != own.chat_template:
        what = "chat markers and template" if own.chat_template or tokenizer.chat_template else "special tokens"
        raise UserError(f"{name} does not have the {what} of the model {spec}'s own tokenizer; leave {option} "
                        "out to use the one saved with it")
    return tokenizer
