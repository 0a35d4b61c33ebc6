"""Sharded checkpoints for FSDP2 runs (torch.distributed.checkpoint), and their consolidation into one file.

Why sharded: under FSDP2 no rank holds the whole model, and gathering weights plus AdamW moments (16 bytes
per parameter) onto rank 0 to write one file would need the memory FSDP exists to avoid. Instead every rank
writes its own shards with `torch.distributed.checkpoint` (DCP), which also reshards on load, so a run can
resume on a different number of GPUs.

Layout of `checkpoints/step_N/` for an FSDP2 run:
  sharded/            DCP directory: `.metadata` + one `__R_0.distcp` per rank; keys `model.<name>` and
                      `optim.<...>` (from torch.distributed.checkpoint.state_dict.get_state_dict)
  model_config.json   the ModelConfig, so the directory is self-describing
  state.json          step, tokens, loader cursor, per-rank RNG states (as the single-process checkpoint)
  checksums.json      sha256 of every file above
  model.safetensors   only after `consolidate` (`gptforge consolidate`, or automatically at the end of a
                      run): the full weights in gptforge.weights' format, so sample/eval/export read it.

Atomicity: all ranks write into `checkpoints/.tmp-step_N.sharded/`; after a barrier rank 0 writes the small
files and checksums, fsyncs and renames the directory into place; a second barrier keeps every rank from
going on before the checkpoint exists. A kill at any moment leaves the previous checkpoint the newest
valid one. The directory must be on a filesystem all ranks share (always true on one node).
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .. import atomic
from ..config import ModelConfig
from ..errors import UserError
from ..layout import (CHECKSUMS_FILE, DCP_METADATA, MODEL_CONFIG_FILE, OPTIMIZER_FILE, SHARDED_DIR, STATE_FILE,
                      WEIGHTS_FILE, is_sharded_checkpoint, sha256_file, verify_checkpoint)
from ..model import GPT
from ..outputs import WEIGHTS_FILE_KIND, check_output
from ..weights import TIED_KEYS, read_weights, save_weights
from . import distributed as D
from .checkpoint import (check_same_optimizers, json_default, model_config_differences, read_state,
                         saved_optimizers, state_by_name)
from .optim import Optimizers, optimizers_of

__all__ = ["consolidate", "is_sharded_checkpoint", "load_full_into_sharded", "load_sharded", "save_sharded"]


def _all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != CHECKSUMS_FILE)


def write_checksums(root: Path) -> None:
    """checksums.json over every file of the checkpoint (shards included), atomically."""
    sums = {name: sha256_file(root / name) for name in _all_files(root)}
    atomic.write_text(root / CHECKSUMS_FILE, json.dumps(sums, indent=1))


def save_sharded(final: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | Optimizers,
                 state: dict[str, Any], model_config: ModelConfig) -> Path:
    """Write a sharded checkpoint to `final` from every rank (a collective: all ranks must call it).

    `state` is rank 0's state.json content. Returns `final` once it exists on disk for everyone.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = Path(final)
    tmp = final.parent / f"{atomic.TMP_PREFIX}{final.name}.sharded"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    D.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizers_of(optimizer))
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / SHARDED_DIR))
    D.barrier()
    error = None
    if _rank() == 0:
        try:
            atomic.write_text(tmp / MODEL_CONFIG_FILE, json.dumps(model_config.to_dict(), indent=1))
            atomic.write_text(tmp / STATE_FILE, json.dumps(state, indent=1, default=json_default))
            write_checksums(tmp)
            atomic.publish_directory(tmp, final, overwrite=True)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error = f"{type(e).__name__}: {e}"
    error = D.broadcast_object(error)
    if error:
        raise OSError(error)
    return final


def load_sharded(path: str | os.PathLike, model: nn.Module,
                 optimizer: torch.optim.Optimizer | Optimizers | None) -> dict[str, Any]:
    """Load a sharded checkpoint into an FSDP2 model (and optimizer) on every rank; returns state.json.

    DCP reshards: the checkpoint may come from a different number of ranks.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict,
                                                         set_model_state_dict, set_state_dict)

    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise UserError(f"checkpoint {path} is not a sharded (FSDP) checkpoint: it has no {SHARDED_DIR}/{DCP_METADATA}")
    _check_model_config(path, D.unwrap(model).config)
    if optimizer is None:
        model_sd = get_model_state_dict(model)
        dcp.load({"model": model_sd}, checkpoint_id=str(path / SHARDED_DIR))
        set_model_state_dict(model, model_sd)
    else:
        model_sd, optim_sd = get_state_dict(model, optimizers_of(optimizer))
        sd = {"model": model_sd, "optim": optim_sd}
        dcp.load(sd, checkpoint_id=str(path / SHARDED_DIR))
        set_state_dict(model, optimizers_of(optimizer), model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    return json.loads((path / STATE_FILE).read_text())


def load_full_into_sharded(path: str | os.PathLike, model: nn.Module,
                           optimizer: torch.optim.Optimizer | Optimizers | None) -> dict[str, Any]:
    """Load a single-file checkpoint (from one process or DDP) into an FSDP2 model on every rank.

    Each rank reads the full tensors and keeps its own shard (`full_state_dict=True`); the AdamW moments,
    stored by parameter name in optimizer.safetensors, become the name-keyed full optimizer state dict that
    `set_optimizer_state_dict` shards the same way. Every rank holds one full copy in host memory while
    loading: fine for models a single process could checkpoint in the first place.
    """
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    path = Path(path)
    problem = verify_checkpoint(path)
    if problem:
        raise UserError(f"checkpoint {path} is unusable ({problem}); pass an earlier checkpoint or --resume auto")
    saved_config, tensors = read_weights(path / WEIGHTS_FILE)
    differing = model_config_differences(saved_config.to_dict(), D.unwrap(model).config.to_dict())
    if differing:
        raise UserError(f"checkpoint {path} was trained with a different model shape ({differing}); resume "
                        "with the run's own model settings or start a new run with another --out")
    for key in TIED_KEYS:  # the tied head is not stored; FSDP2's state dict names it too
        tensors[key] = tensors["transformer.wte.weight"]
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, tensors, options=full)
    if optimizer is not None:
        try:
            stored = load_file(str(path / OPTIMIZER_FILE))
            with safe_open(str(path / OPTIMIZER_FILE), framework="pt") as f:
                metadata = f.metadata() or {}
            groups = json.loads(metadata["param_groups"])
            scalars = json.loads(metadata.get("scalars", "{}"))
            saved_kinds = saved_optimizers(metadata, len(groups))
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise UserError(f"optimizer state {path / OPTIMIZER_FILE} is unreadable ({e}); "
                            "resume from an earlier checkpoint") from None
        check_same_optimizers(saved_kinds, optimizer, str(path))
        state = state_by_name(stored, scalars)
        param_groups = [{**{k: v for k, v in g.items() if k != "names"}, "params": g["names"]} for g in groups]
        set_optimizer_state_dict(model, optimizers_of(optimizer), {"state": state, "param_groups": param_groups},
                                 options=full)
    return read_state(path)


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    file = Path(path) / MODEL_CONFIG_FILE
    if not file.is_file():
        raise UserError(f"sharded checkpoint {path} has no {MODEL_CONFIG_FILE}; it was not written by gptforge")
    return ModelConfig.from_dict(json.loads(file.read_text()))


def _check_model_config(path: Path, current: ModelConfig) -> None:
    differing = model_config_differences(read_model_config(path).to_dict(), current.to_dict())
    if differing:
        raise UserError(f"checkpoint {path} was trained with a different model shape ({differing}); resume "
                        "with the run's own model settings or start a new run with another --out")


def consolidate(path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Gather a sharded checkpoint's weights into one safetensors file (default: `path/model.safetensors`).

    Runs in one process with no process group (DCP's `no_dist` mode) and loads the shards directly into
    a freshly allocated fp32 GPT, so peak memory is one copy of the weights; AdamW moments are not read.
    The result is exactly the format `gptforge.weights.load_weights` (and so sample / eval / export) reads.
    When writing inside the checkpoint, checksums.json is updated to cover the new file.
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    if out is not None:  # its own file inside the checkpoint by default; anywhere else, nothing is replaced
        check_output(out, WEIGHTS_FILE_KIND, inputs={"CKPT_DIR": path})
    if not is_sharded_checkpoint(path):
        if (path / WEIGHTS_FILE).is_file():
            raise UserError(f"{path} already holds {WEIGHTS_FILE} and no shards: nothing to consolidate")
        raise UserError(f"{path} is not a sharded checkpoint (no {SHARDED_DIR}/{DCP_METADATA}); pass "
                        "checkpoints/step_N of a run trained with train.parallel=fsdp")
    config = read_model_config(path)
    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device="cpu")
    model.lm_head.weight = model.transformer.wte.weight
    targets = {f"model.{k}": v for k, v in model.state_dict().items() if k not in TIED_KEYS}
    reader = dcp.FileSystemReader(str(path / SHARDED_DIR))
    stored = {k for k in reader.read_metadata().state_dict_metadata if k.startswith("model.")}
    missing = sorted(set(targets) - stored)
    if missing:
        raise UserError(f"sharded checkpoint {path} lacks {', '.join(missing[:3])}: it does not match its "
                        f"{MODEL_CONFIG_FILE}; it may be from another program")
    with torch.no_grad():
        _load_without_process_group(targets, reader)
    destination = Path(out) if out is not None else path / WEIGHTS_FILE
    save_weights(model, destination)
    if out is None and (path / CHECKSUMS_FILE).is_file():
        sums = json.loads((path / CHECKSUMS_FILE).read_text())
        sums[WEIGHTS_FILE] = sha256_file(destination)
        atomic.write_text(path / CHECKSUMS_FILE, json.dumps(sums, indent=1))
    return destination


def _load_without_process_group(state_dict: dict[str, Any], reader: Any) -> None:
    """DCP-load into `state_dict` in this process alone, even when a process group exists.

    The trainer consolidates on rank 0 only, inside a torchrun job: a load that used the group's
    collectives would wait forever for the other ranks. `dcp.load` takes `no_dist` from torch 2.7; before
    that (the floor is 2.5) `load` decides from whether a group exists, so the deprecated
    `load_state_dict`, which has always taken `no_dist`, is the way to say it.
    """
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        if "no_dist" in inspect.signature(dcp.load).parameters:
            dcp.load(state_dict, storage_reader=reader, no_dist=True)
        else:  # torch < 2.7
            warnings.filterwarnings("ignore", message=".*load_state_dict.* is deprecated")
            dcp.load_state_dict(state_dict, storage_reader=reader, no_dist=True)


def _rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
