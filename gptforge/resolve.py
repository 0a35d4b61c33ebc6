"""One resolver from what a user names (preset, TOML file, --data/--out/--init, --set) to a checked RunConfig.

Every command that reads a run config calls `resolve_run_config` (train, sft, info), so one file means one
model everywhere. Order, later wins:

    defaults (or, when resuming / restarting a run, that run's own config.json)
      < --preset NAME
      < the TOML file: a top-level `preset = "..."` or `[model] preset = "..."` (the same thing), then its
        [model] / [train] / [data] tables
      < --data / --out / --init
      < --set key=value (dotted keys: model.n_layer, train.lr, data.path)

A preset sets the model's shape and, for GPT-3 sizes, Table 2.1's peak learning rate (char-small: its
training recipe, config.PRESET_TRAIN). The model's
vocab_size follows the data's tokenizer unless set explicitly, since a model cannot use ids its tokenizer
never produces (nor read ids beyond its embedding). Only data the config names counts (--data, a [data]
path, --set data.path, a run's own config.json): there is no default data directory, so a preset means the
same model whatever the working directory holds.

Light on import (no torch): `gptforge info` resolves configs too.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from .config import GPT3_PEAK_LR, PRESET_TRAIN, ModelConfig, RunConfig, apply_overrides, get_preset, load_toml
from .errors import UserError
from .layout import MANIFEST_FILE, RUN_CONFIG_FILE, TOKENIZER_DIR


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def apply_preset(config: RunConfig, name: str) -> RunConfig:
    """`config` with preset `name`'s model shape, its GPT-3 Table 2.1 peak LR when it has one, and the training
    settings it brings (PRESET_TRAIN: char-small's time-to-loss recipe)."""
    settings = {"lr": GPT3_PEAK_LR.get(name, config.train.lr), **PRESET_TRAIN.get(name, {})}
    train = dataclasses.replace(config.train, **settings)
    return dataclasses.replace(config, model=get_preset(name), train=train)


def parse_set(items: list[str]) -> dict[str, str]:
    """`--set key=value` items as a dict (later items win)."""
    pairs = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set train.lr=3e-4")
        key, value = item.split("=", 1)
        pairs[key.strip()] = value.strip()
    return pairs


def read_run_config(path: str | os.PathLike) -> RunConfig:
    """A run directory's saved config.json, or a UserError naming it when it cannot be read back."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"run config {path} is damaged or unreadable ({e}); restore it from a copy, or start "
                        "the run over with --fresh") from None
    if not isinstance(data, dict):
        raise UserError(f"run config {path} is not a JSON object; restore it from a copy, or start the run "
                        "over with --fresh")
    try:
        return RunConfig.from_dict(data)
    except UserError as e:
        raise UserError(f"run config {path}: {e}") from None


def _toml_preset(table: dict[str, Any], config_file: str) -> str | None:
    """The preset a TOML file names, at the top level or in [model] (both mean the same)."""
    names = []
    if "preset" in table:
        names.append(table.pop("preset"))
    model = table.get("model")
    if isinstance(model, dict) and "preset" in model:
        names.append(model.pop("preset"))
    for name in names:
        if not isinstance(name, str):
            raise UserError(f"config file {config_file}: preset must be a string such as \"gpt3-small\", "
                            f"got {name!r}")
    if len(set(names)) > 1:
        raise UserError(f"config file {config_file} names two presets ({names[0]!r} and {names[1]!r}); keep one")
    return names[0] if names else None


def saved_run_config(run_dir: str | os.PathLike | None) -> RunConfig | None:
    """The config.json of an existing run directory (None when there is none)."""
    if run_dir is None:
        return None
    path = Path(run_dir) / RUN_CONFIG_FILE
    return read_run_config(path) if path.is_file() else None


def resolve_run_config(config_file: str | None = None, preset: str | None = None, data: str | None = None,
                       out: str | None = None, overrides: list[str] | None = None,
                       resume: str | None = None, base: RunConfig | None = None, fresh: bool = False,
                       init: str | None = None) -> RunConfig:
    """The fully resolved, validated run config (see the module docstring for precedence).

    `base` replaces the defaults (sft passes its fine-tuning defaults). When continuing (`resume`) or
    restarting (`fresh`) a run with neither `config_file` nor `preset`, the run's own config.json is the base,
    so `train --out RUN --fresh` restarts the same run rather than falling back to the defaults.
    """
    config = base or RunConfig()
    if base is None and not config_file and not preset and (resume is not None or fresh):
        if out:
            run_dir: Path | None = Path(out)
        elif resume not in (None, "auto"):
            run_dir = Path(resume).parent.parent  # RUN/checkpoints/step_N
        else:
            run_dir = None
        config = saved_run_config(run_dir) or config
    if preset:
        config = apply_preset(config, preset)
    explicit: dict[str, Any] = {}
    if config_file:
        table = load_toml(config_file)
        name = _toml_preset(table, config_file)
        if name:
            config = apply_preset(config, name)
        explicit.update(_flatten(table))
    if data:
        explicit["data.path"] = data
    if out:
        explicit["train.out_dir"] = out
    if init:
        explicit["train.init_from"] = init
    explicit.update(parse_set(overrides or []))
    init_from = explicit.get("train.init_from")
    if init_from and resume is None:  # a new run from pretrained weights takes their shape
        config = dataclasses.replace(config, model=init_model_config(str(init_from)))
    config = apply_overrides(config, explicit)
    return fit_vocab_to_data(config, explicit_vocab="model.vocab_size" in explicit or bool(init_from))


def vocab_source(config: RunConfig) -> str | None:
    """What decided model.vocab_size, in words, when it was the data's tokenizer (None: the preset or config).

    So `gptforge info` can say so: the same preset has another vocabulary once a data directory is named."""
    if not config.data.path or not (Path(config.data.path) / MANIFEST_FILE).is_file():
        return None
    vocab = data_vocab_size(config.data.path)
    if vocab == config.model.vocab_size:
        return f"vocab {vocab} from the tokenizer of data.path {config.data.path}"
    return f"vocab {config.model.vocab_size} set explicitly (the tokenizer of data.path {config.data.path} has {vocab})"


def init_model_config(spec: str) -> ModelConfig:
    """The model shape of `spec` (anything --model accepts), for `train --init`."""
    from .loading import load_model  # torch: only when a run starts from pretrained weights
    return load_model(spec, device="cpu")[0].config


def data_vocab_size(data_dir: str | os.PathLike) -> int:
    """The vocabulary size of a prepared data directory (from its manifest, else its tokenizer)."""
    from .data.prepare import read_manifest

    data_dir = Path(data_dir)
    if not (data_dir / MANIFEST_FILE).is_file():
        raise UserError(f"data directory {data_dir} has no {MANIFEST_FILE}; prepare it first with "
                        f"`gptforge prepare SOURCE --out {data_dir}` or pass --data DIR")
    info = read_manifest(data_dir)  # a damaged manifest is a UserError naming it
    if isinstance(info.get("tokenizer"), dict) and isinstance(info["tokenizer"].get("vocab_size"), int):
        return info["tokenizer"]["vocab_size"]
    from .tokenizer import load_tokenizer
    return load_tokenizer(data_dir / TOKENIZER_DIR).vocab_size


def fit_vocab_to_data(config: RunConfig, explicit_vocab: bool) -> RunConfig:
    """`config` with model.vocab_size taken from its data's tokenizer (checked, when set explicitly).

    Only data the config names counts: with none named (""), the preset's own vocabulary stands."""
    if not config.data.path:
        return config
    data_dir = Path(config.data.path)
    if not (data_dir / MANIFEST_FILE).is_file():
        return config  # checked when training starts; --print-config and info may run before `prepare`
    vocab = data_vocab_size(data_dir)
    if explicit_vocab:
        if config.model.vocab_size < vocab:
            raise UserError(f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer of "
                            f"{data_dir} ({vocab} ids); drop the setting or raise it to at least {vocab}")
        return config
    return dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=vocab))
