"""What a `--model` is, read from its files without loading the weights: `gptforge info --model SPEC`.

For a run directory: its shape and parameters, tokenizer, data, how far it trained (step and tokens of
the newest valid checkpoint, the last train and val loss logged), and every checkpoint with its step,
tokens, size and whether it is usable. For a checkpoint, weights file, HF directory or preset: what of
that applies. Checkpoints are verified against their checksums (reading them whole), because "which
checkpoint would `sample` use?" is the question a user asks before anything else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import ModelConfig, get_preset
from .errors import UserError
from .info import describe_shape, format_group, optimizer_groups, parameter_counts
from .layout import (METRICS_FILE, MODEL_CONFIG_FILE, RUN_CONFIG_FILE, STATE_FILE, TOKENIZER_DIR,
                     list_checkpoints, verify_checkpoint)
from .loading import ModelSource, find_tokenizer_dir, read_json_object, resolve_model_source
from .units import human_bytes, human_count

KIND_NAMES = {"run": "training run", "checkpoint": "checkpoint", "sharded": "sharded (FSDP) checkpoint",
              "weights": "weights file", "hf": "Hugging Face model", "preset": "preset (random weights)"}


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def _model_config(source: ModelSource) -> ModelConfig:
    if source.kind == "run":
        from .resolve import read_run_config
        return read_run_config(source.run_dir / RUN_CONFIG_FILE).model
    if source.kind == "preset":
        return get_preset(source.spec)
    if source.kind == "hf":
        from .interop.hf import hf_model_config
        return hf_model_config(source.path)
    if source.kind == "sharded":
        file = source.path / MODEL_CONFIG_FILE
        try:
            return ModelConfig.from_dict(json.loads(file.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"--model {source.spec}: {file} is unreadable ({e})") from None
    from .weights import read_config
    return read_config(source.weights)


def _tokenizer(directory: Path | None) -> dict[str, Any] | None:
    if directory is None:
        return None
    from .tokenizer import load_tokenizer
    tokenizer = load_tokenizer(directory)
    return {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "dir": str(directory)}


def _last_losses(run_dir: Path) -> dict[str, Any]:
    from .training.metrics import read_metrics  # the log's own reader: torn lines skipped as training skips them

    found: dict[str, Any] = {}
    for row in read_metrics(run_dir / METRICS_FILE):
        for key in ("loss", "val_loss"):
            if isinstance(row.get(key), (int, float)):
                found[key] = {"value": row[key], "step": row.get("step")}
    return found


def _checkpoints(source: ModelSource) -> list[dict[str, Any]]:
    rows = []
    for step, path in list_checkpoints(source.run_dir):
        problem = None if path == source.path else verify_checkpoint(path)  # source.path was just verified
        state = read_json_object(path / STATE_FILE)
        rows.append({"step": step, "path": str(path), "tokens": state.get("tokens"), "bytes": _size(path),
                     "problem": problem, "newest_valid": path == source.path})
    return rows


def describe_model(spec: str) -> dict[str, Any]:
    """A JSON-able description of what `spec` names (see the module docstring)."""
    source = resolve_model_source(spec, report=None)
    config = _model_config(source)
    info: dict[str, Any] = {"model": spec, "kind": source.kind, "config": config.to_dict(),
                            "parameters": parameter_counts(config)["total"]}
    if source.kind == "preset":
        info["tokenizer"] = None
    elif source.kind == "run":
        info["tokenizer"] = _tokenizer(source.run_dir / TOKENIZER_DIR if (source.run_dir / TOKENIZER_DIR).is_dir()
                                       else None)
    elif source.kind != "hf":  # an HF directory's tokenizer files are read when the model is loaded
        info["tokenizer"] = _tokenizer(find_tokenizer_dir(source.path if source.path.is_dir()
                                                          else source.path.parent))
    if source.kind in ("checkpoint", "sharded") or (source.kind == "run" and source.path is not None):
        state = read_json_object(source.path / STATE_FILE)
        info["checkpoint"] = str(source.path)
        info["step"], info["tokens"] = state.get("step"), state.get("tokens")
    if source.kind == "run":
        from .resolve import read_run_config
        run = read_run_config(source.run_dir / RUN_CONFIG_FILE)
        info["run_dir"] = str(source.run_dir)
        info["data"] = run.data.path
        info["max_steps"], info["max_tokens"] = run.train.max_steps or None, run.train.max_tokens or None
        info["optimizer"] = optimizer_groups(config, run.train)
        info["last"] = _last_losses(source.run_dir)
        info["checkpoints"] = _checkpoints(source)
        info.setdefault("checkpoint", None)
    return info


def _n(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "?"


def format_description(info: dict[str, Any]) -> str:
    """The description as a few aligned lines for a terminal."""
    config = ModelConfig.from_dict(info["config"])
    lines = [f"{info['model']}: {KIND_NAMES[info['kind']]}",
             f"  model        {describe_shape(config)}",
             f"  parameters   {info['parameters']:,} ({human_count(info['parameters'])})"]
    if "tokenizer" in info:
        tok = info["tokenizer"]
        lines.append(f"  tokenizer    {tok['kind']}, {tok['vocab_size']:,} ids" if tok
                     else "  tokenizer    none saved with it (sample/eval use GPT-2's for a 50,257-id vocabulary)")
    if "data" in info:
        lines.append(f"  data         {info['data']}")
    for i, group in enumerate(info.get("optimizer", [])):
        lines.append(f"  {'optimizer' if i == 0 else '':<12} {format_group(group)}")
    if info["kind"] == "run":
        if info["checkpoint"] is None:
            lines.append("  progress     no valid checkpoint yet")
        else:
            limits = [f"train.max_steps {info['max_steps']:,}" if info["max_steps"] else "",
                      f"train.max_tokens {info['max_tokens']:,}" if info["max_tokens"] else ""]
            limit = " / ".join(x for x in limits if x)
            lines.append(f"  progress     step {_n(info['step'])}, {_n(info['tokens'])} tokens"
                         + (f" (stops at {limit})" if limit else "") + f"; newest valid: {info['checkpoint']}")
        last = info["last"]
        parts = [f"{label} {last[key]['value']:.4f} (step {_n(last[key]['step'])})"
                 for key, label in (("loss", "train"), ("val_loss", "val")) if key in last]
        lines.append(f"  last loss    {', '.join(parts) if parts else 'none logged yet'}")
        lines.append(f"  checkpoints  {len(info['checkpoints'])}" + (":" if info["checkpoints"] else ""))
        for row in info["checkpoints"]:
            tokens = f"{human_count(row['tokens'])} tokens" if isinstance(row["tokens"], int) else "? tokens"
            status = ("newest valid" if row["newest_valid"] else
                      f"unusable: {row['problem']}" if row["problem"] else "valid")
            lines.append(f"    step_{row['step']:<10} {tokens:>14}  {human_bytes(row['bytes']):>11}  {status}")
    elif "step" in info:
        lines.append(f"  trained      step {_n(info['step'])}, {_n(info['tokens'])} tokens")
    return "\n".join(lines)
