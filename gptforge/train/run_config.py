"""Resolve what the user asked for (preset, TOML file, --data/--out, --set) into one checked RunConfig.

Order, later wins: defaults (or, when resuming, the run's own config.json) < --preset < the TOML file
(which may name a `preset` itself) < --data/--out < --set key=value. The model's vocab_size follows the
data's tokenizer unless set explicitly, since a model cannot use ids its tokenizer never produces (nor
read ids beyond its embedding).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..config import GPT3_PEAK_LR, RunConfig, apply_overrides, get_preset, load_toml
from ..errors import UserError


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _apply_preset(config: RunConfig, name: str) -> RunConfig:
    """Use preset `name`'s model shape, and its GPT-3 Table 2.1 peak LR when it has one."""
    train = dataclasses.replace(config.train, lr=GPT3_PEAK_LR.get(name, config.train.lr))
    return dataclasses.replace(config, model=get_preset(name), train=train)


def _parse_set(items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set train.lr=3e-4")
        key, value = item.split("=", 1)
        pairs[key.strip()] = value.strip()
    return pairs


def read_run_config(path: Path) -> RunConfig:
    """A run directory's saved config.json, or a UserError naming it when it cannot be read back."""
    try:
        return RunConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"run config {path} is damaged or unreadable ({e}); restore it from a copy, or start "
                        "the run over with --fresh") from None


def resolve_run_config(config_file: str | None = None, preset: str | None = None, data: str | None = None,
                       out: str | None = None, overrides: list[str] | None = None,
                       resume: str | None = None, base: RunConfig | None = None) -> RunConfig:
    """The fully resolved, validated run config (see the module docstring for precedence)."""
    config = base or RunConfig()
    if resume is not None and base is None and not config_file and not preset:
        run_dir = Path(out) if out else (Path(resume).parent.parent if resume != "auto" else None)
        saved = run_dir / "config.json" if run_dir else None
        if saved and saved.is_file():
            config = read_run_config(saved)
    if preset:
        config = _apply_preset(config, preset)
    explicit: dict[str, Any] = {}
    if config_file:
        table = load_toml(config_file)
        if "preset" in table:
            name = table.pop("preset")
            if not isinstance(name, str):
                raise UserError(f"config file {config_file}: preset must be a string such as \"gpt3-small\"")
            config = _apply_preset(config, name)
        explicit.update(_flatten(table))
    if data:
        explicit["data.path"] = data
    if out:
        explicit["train.out_dir"] = out
    explicit.update(_parse_set(overrides or []))
    config = apply_overrides(config, explicit)
    return fit_vocab_to_data(config, explicit_vocab="model.vocab_size" in explicit)


def fit_vocab_to_data(config: RunConfig, explicit_vocab: bool) -> RunConfig:
    """`config` with model.vocab_size taken from its data's tokenizer (checked, when set explicitly)."""
    from .trainer import data_vocab_size

    data_dir = Path(config.data.path)
    if not (data_dir / "manifest.json").is_file():
        return config  # checked when training starts; --print-config may run before `prepare`
    vocab = data_vocab_size(data_dir)
    if explicit_vocab:
        if config.model.vocab_size < vocab:
            raise UserError(f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer of "
                            f"{data_dir} ({vocab} ids); drop the setting or raise it to at least {vocab}")
        return config
    return dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=vocab))
