"""On-disk names of run, checkpoint and data directories, defined once.

This is the bottom layer: it imports nothing from gptforge but `errors`, and nothing heavier than the
standard library, so inference (`loading`), training, evaluation and interop can all agree on where things
live without importing each other.

    RUN/                         a training run (gptforge train / sft)
      config.json                the fully resolved run config (RUN_CONFIG_FILE)
      tokenizer/                 the tokenizer (TOKENIZER_DIR); chat_template.jinja when it has chat markers
      checkpoints/step_N/        one checkpoint per saved step (CHECKPOINTS_DIR, checkpoint_dir)
        model.safetensors        weights (WEIGHTS_FILE)
        optimizer.safetensors    AdamW state (OPTIMIZER_FILE)
        state.json               step, tokens, data position, RNG states (STATE_FILE)
        checksums.json           sha256 of each file (CHECKSUMS_FILE)
        sharded/                 FSDP2 runs: a torch.distributed.checkpoint directory (SHARDED_DIR)
        model_config.json        FSDP2 runs: the ModelConfig (MODEL_CONFIG_FILE)
      metrics.jsonl, loss.png, samples.txt
    DATA/                        prepared token shards (gptforge prepare)
      manifest.json              counts, splits, tokenizer (MANIFEST_FILE)
      tokenizer/                 the tokenizer the shards were made with
      train_000000.bin, val_000000.bin, ...
    .DATA.lock                   beside DATA while a prepare builds it (output_lock_file; exports too)
      train_mask_000000.bin, train_conversations.npy, ...   chat data: loss masks, conversation lengths
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

# ---- run directory ---------------------------------------------------------------------------------------
RUN_CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
SAMPLES_FILE = "samples.txt"
LOCK_FILE = ".lock"

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # inside TOKENIZER_DIR, when the tokenizer has chat markers

# ---- checkpoint directory --------------------------------------------------------------------------------
WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
CHECKSUMS_FILE = "checksums.json"
SHARDED_DIR = "sharded"
DCP_METADATA = ".metadata"
MODEL_CONFIG_FILE = "model_config.json"
REQUIRED_FILES = (WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE)
STEP_DIR_PREFIX = "step_"
_STEP_DIR = re.compile(rf"^{STEP_DIR_PREFIX}(\d+)$")

# ---- prepared data directory -----------------------------------------------------------------------------
MANIFEST_FILE = "manifest.json"
# chat data (gptforge prepare --chat): beside each split's token shards, loss-mask shards of the same sizes
# and the token count of every conversation, in order
CHAT_DATA_KIND = "chat"


def shard_file(prefix: str, index: int) -> str:
    """The name of a prepared-data shard: `{prefix}_{index:06d}.bin` (prefix = split, or a chat mask prefix)."""
    return f"{prefix}_{index:06d}.bin"


def chat_mask_prefix(split: str) -> str:
    return f"{split}_mask"


def chat_index_file(split: str) -> str:
    return f"{split}_conversations.npy"


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / f"{STEP_DIR_PREFIX}{step}"


def is_run_dir(path: str | os.PathLike) -> bool:
    """A gptforge run: its resolved config beside a checkpoints/ folder (possibly still empty)."""
    path = Path(path)
    return (path / RUN_CONFIG_FILE).is_file() and (path / CHECKPOINTS_DIR).is_dir()


def output_lock_file(out: str | os.PathLike) -> Path:
    """The lock a writer (`prepare`, `export`, `tokenizer train`, ...) holds while it builds `out`: beside it
    (the output itself is only renamed into place at the end), hidden, and removed when the writer ends."""
    out = Path(out)
    return out.parent / f".{out.name}{LOCK_FILE}"


def is_data_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / SHARDED_DIR / DCP_METADATA).is_file()


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every finished checkpoint directory, oldest first (temporary ones are ignored)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def required_files(path: str | os.PathLike) -> tuple[str, ...]:
    """Files a complete checkpoint lists in its checksums: the single-file layout, or an FSDP run's
    sharded one (a torch.distributed.checkpoint directory plus state.json)."""
    if is_sharded_checkpoint(path):
        return (STATE_FILE, f"{SHARDED_DIR}/{DCP_METADATA}")
    return REQUIRED_FILES


def verify_checkpoint(path: str | os.PathLike) -> str | None:
    """None if the checkpoint at `path` is complete and every file matches its checksum, else why not."""
    path = Path(path)
    sums_file = path / CHECKSUMS_FILE
    if not sums_file.is_file():
        return f"{CHECKSUMS_FILE} is missing"
    try:
        sums = json.loads(sums_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{CHECKSUMS_FILE} is not valid JSON"
    if not isinstance(sums, dict):
        return f"{CHECKSUMS_FILE} is not a JSON object"
    for name in required_files(path):
        if name not in sums:
            return f"{name} is not listed in {CHECKSUMS_FILE}"
    for name, expected in sums.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if sha256_file(file) != expected:
            return f"{name} does not match its checksum (truncated or damaged)"
    return None


def latest_valid_checkpoint(run_dir: str | os.PathLike, report=None) -> Path | None:
    """The newest checkpoint of `run_dir` whose files all match their checksums; broken newer ones are
    reported through `report(message)` (one line each) and skipped. None when there is no valid one."""
    for _step, path in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        if report:
            report(f"gptforge: checkpoint {path} is unusable ({problem}); skipping it for an earlier one")
    return None
