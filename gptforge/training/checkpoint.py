"""Checkpoints that survive crashes: one directory per step, written atomically and checksummed.

`checkpoints/step_N/` holds `model.safetensors` (gptforge.weights), `optimizer.safetensors` (AdamW moments,
Muon's momentum, step counts; no pickle), `state.json` (step, tokens seen, loader position, RNG states, anything the
trainer needs to continue bit for bit) and `checksums.json` (sha256 of each). The directory is built
under a temporary name and renamed into place (gptforge.atomic.atomic_directory), so a kill or a full
disk mid-save leaves the previous checkpoint as the newest one. Checksums catch what the rename cannot:
a file damaged or truncated afterwards (copying, a bad disk); such a checkpoint is reported and skipped.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .. import atomic
from ..errors import UserError
from ..layout import (CHECKPOINTS_DIR, CHECKSUMS_FILE, OPTIMIZER_FILE, REQUIRED_FILES, STATE_FILE, WEIGHTS_FILE,
                      checkpoint_dir, latest_valid_checkpoint, list_checkpoints, sha256_file, verify_checkpoint)
from ..weights import load_state_into, read_weights, save_weights
from .optim import Optimizers, optimizers_of

# re-exported for callers that import them from here (the names are defined once, in gptforge.layout)
__all__ = ["CHECKPOINTS_DIR", "checkpoint_dir", "latest_valid_checkpoint", "list_checkpoints", "load_checkpoint",
           "model_config_differences", "read_state", "save_checkpoint", "verify_checkpoint"]


# ---- optimizer state <-> safetensors ----------------------------------------------------------------


def optimizer_tensors(optimizer: torch.optim.Optimizer | Optimizers
                      ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flatten an optimizer's state into named tensors plus JSON metadata (its param groups, and which torch
    optimizer holds how many of them: AdamW alone, or AdamW and Muon).

    State is keyed by parameter *name* (from each group's "names"), not position, so a checkpoint cannot be
    loaded into a differently ordered model without an error. Parameter names are unique across the
    optimizers, so AdamW's moments and Muon's momentum buffers share one namespace.
    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    groups = []
    kinds = []
    for opt in optimizers_of(optimizer):
        sd = opt.state_dict()
        kinds.append([type(opt).__name__, len(sd["param_groups"])])
        for group in sd["param_groups"]:
            names = group.get("names") or [f"param_{i}" for i in group["params"]]
            for index, name in zip(group["params"], names):
                for key, value in sd["state"].get(index, {}).items():
                    if isinstance(value, torch.Tensor):
                        tensors[f"{name}::{key}"] = value.detach().to("cpu").contiguous()
                    else:
                        scalars.setdefault(name, {})[key] = value
            groups.append({k: v for k, v in group.items() if k != "params"})
    metadata = {"param_groups": json.dumps(groups), "scalars": json.dumps(scalars), "optimizers": json.dumps(kinds)}
    return tensors, metadata


def state_by_name(tensors: dict[str, torch.Tensor], scalars: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each parameter name's saved optimizer state: its tensors (stored as NAME::FIELD) and its scalars."""
    state: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        name, field = key.split("::", 1)
        state.setdefault(name, {})[field] = tensor
    for name, values in scalars.items():
        state.setdefault(name, {}).update(values)
    return state


def saved_optimizers(metadata: dict[str, str], n_groups: int) -> list[list]:
    """[[class name, groups], ...] of a checkpoint; one written before Muon existed holds one AdamW."""
    return json.loads(metadata["optimizers"]) if "optimizers" in metadata else [["AdamW", n_groups]]


def check_same_optimizers(saved: list[list], optimizer: torch.optim.Optimizer | Optimizers, source: str) -> None:
    """A UserError naming train.optimizer when the checkpoint's optimizers are not this run's."""
    def name(kinds: list) -> str:
        return "muon" if any(k[0] == "Muon" for k in kinds) else "adamw"

    current = [[type(o).__name__, len(o.param_groups)] for o in optimizers_of(optimizer)]
    if [list(k) for k in saved] != current:
        raise UserError(f"optimizer state in {source} is for train.optimizer={name(saved)}, this run has "
                        f"train.optimizer={name(current)}; resume with --set train.optimizer={name(saved)} "
                        "or start a fresh run")


def load_optimizer_tensors(optimizer: torch.optim.Optimizer | Optimizers, tensors: dict[str, torch.Tensor],
                           metadata: dict[str, str], source: str) -> None:
    """Inverse of `optimizer_tensors`: rebuild each optimizer's state dict by parameter name and load it."""
    saved_groups = json.loads(metadata["param_groups"])
    scalars = json.loads(metadata.get("scalars", "{}"))
    saved_kinds = saved_optimizers(metadata, len(saved_groups))
    if len(optimizers_of(optimizer)) == 1 and len(saved_kinds) == 1 and \
            len(saved_groups) != len(optimizer.param_groups):
        raise UserError(f"optimizer state in {source} has {len(saved_groups)} parameter groups, this run has "
                        f"{len(optimizer.param_groups)}; start a fresh run or resume with the same setup")
    check_same_optimizers(saved_kinds, optimizer, source)
    by_name = state_by_name(tensors, scalars)
    offset = 0
    for opt in optimizers_of(optimizer):
        current = opt.state_dict()
        state: dict[int, dict[str, Any]] = {}
        groups = []
        for saved, group in zip(saved_groups[offset:], current["param_groups"]):
            names = group.get("names") or [f"param_{i}" for i in group["params"]]
            if saved.get("names", names) != names:
                raise UserError(f"optimizer state in {source} is for different parameters than this model; "
                                "resume with the model configuration the run was started with")
            for index, name in zip(group["params"], names):
                if by_name.get(name):
                    state[index] = by_name[name]
            groups.append({**saved, "params": group["params"]})
        offset += len(current["param_groups"])
        opt.load_state_dict({"state": state, "param_groups": groups})


# ---- save / load --------------------------------------------------------------------------------------


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | Optimizers, state: dict[str, Any], keep: int = 3) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep` checkpoints.

    `model` must be the plain GPT (not a compiled or distributed wrapper). An OSError while writing (e.g.
    a full disk) leaves no partial directory and every earlier checkpoint untouched.
    """
    final = checkpoint_dir(run_dir, step)
    with atomic.atomic_directory(final, overwrite=True) as tmp:
        save_weights(model, tmp / WEIGHTS_FILE)
        tensors, metadata = optimizer_tensors(optimizer)
        with atomic.atomic_file(tmp / OPTIMIZER_FILE) as f:
            save_file(tensors, str(f), metadata=metadata)
        atomic.write_text(tmp / STATE_FILE, json.dumps(state, indent=1, default=json_default))
        sums = {name: sha256_file(tmp / name) for name in REQUIRED_FILES}
        atomic.write_text(tmp / CHECKSUMS_FILE, json.dumps(sums, indent=1))
    prune_checkpoints(run_dir, keep)
    return final


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints, and leftovers of interrupted saves."""
    for _, path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def remove_partial_saves(run_dir: str | os.PathLike) -> None:
    """Delete `.tmp-*` directories a killed save left behind (call only when no other writer runs)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(atomic.TMP_PREFIX):
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)


def json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and scalars, tensors
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in {STATE_FILE}")


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(path) / STATE_FILE).read_text())


# what a resume cannot do without, with the JSON types it must have
RESUME_STATE_KEYS = {"step": int, "tokens": int, "elapsed": (int, float), "skipped_steps": int, "bad_in_row": int,
                     "loader": dict, "log_window": dict}


def check_resume_state(path: str | os.PathLike) -> dict[str, Any]:
    """state.json of checkpoint `path`, or a UserError naming it when a resume could not use it (a file edited
    by hand with its checksum recomputed passes verification but may still lack what training needs)."""
    file = Path(path) / STATE_FILE
    try:
        state = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{file} is unreadable ({e}); resume from an earlier checkpoint or start over with "
                        "--fresh") from None
    problems = [] if isinstance(state, dict) else ["not a JSON object"]
    if not problems:
        problems = [f"{key} missing" if key not in state else f"{key} is not {getattr(kind, '__name__', 'a number')}"
                    for key, kind in RESUME_STATE_KEYS.items()
                    if key not in state or not isinstance(state[key], kind) or isinstance(state[key], bool)]
        if not isinstance(state.get("rng"), dict) and not isinstance(state.get("rng_per_rank"), list):
            problems.append("rng missing")
    if problems:
        raise UserError(f"{file} cannot be resumed from ({', '.join(problems)}); resume from an earlier checkpoint "
                        "(--resume RUN/checkpoints/step_N) or start over with --fresh")
    return state


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | Optimizers | None = None) -> dict[str, Any]:
    """Load weights (and optimizer state) from checkpoint `path` into `model`; return its state.json.

    Refuses a checkpoint whose model shape differs from `model`'s, naming the differing fields.
    """
    path = Path(path)
    problem = verify_checkpoint(path)
    if problem:
        raise UserError(f"checkpoint {path} is unusable ({problem}); pass an earlier checkpoint or --resume auto")
    saved_config, tensors = read_weights(path / WEIGHTS_FILE)
    differing = model_config_differences(saved_config.to_dict(), model.config.to_dict())
    if differing:
        raise UserError(f"checkpoint {path} was trained with a different model shape ({differing}); "
                        "resume with the run's own model settings or start a new run with another --out")
    device = next(model.parameters()).device
    load_state_into(model, {k: v.to(device) for k, v in tensors.items()}, str(path))
    if optimizer is not None:
        try:
            opt_tensors = load_file(str(path / OPTIMIZER_FILE), device=str(device))
            with safe_open(str(path / OPTIMIZER_FILE), framework="pt") as f:
                metadata = f.metadata() or {}
        except (SafetensorError, OSError) as e:
            raise UserError(f"optimizer state {path / OPTIMIZER_FILE} is unreadable ({e}); "
                            "resume from an earlier checkpoint") from None
        load_optimizer_tensors(optimizer, opt_tensors, metadata, str(path))
    return read_state(path)


def model_config_differences(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """"n_layer: 4 in the checkpoint vs 6 now, ..." for every field that differs ('' when none)."""
    keys = sorted(set(saved) | set(current))
    return ", ".join(f"{k}: {saved.get(k)!r} in the checkpoint vs {current.get(k)!r} now"
                     for k in keys if saved.get(k) != current.get(k))
