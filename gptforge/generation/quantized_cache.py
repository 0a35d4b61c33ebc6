"""Quantized weights kept on disk between runs: `sample`, `chat`, `serve` and `eval` with `--quantize` read the
quantized copy of a weights file that an earlier run made, instead of quantizing the file again.

Why: quantizing is most of a quantized start-up after `import torch`, and the result depends only on the
weights, the model's dtype, the kind, and the torch and CPU that packed it (the int4 kernel's packed layout is
the CPU's own). A stored copy is a safetensors file, memory-mapped when read: GPT-2 124M on a 2-core Zen 4,
`prepare_for_decoding` int8 0.12 -> 0.01 s, int4 0.31 -> 0.01 s (benchmarks/cli_startup.py --phases). Read in
place, eager int8 decoding (memory-bound) ran 3-5% slower than from a copy in fresh memory (0.95-0.97x,
11-15 interleaved rounds of 64 tokens; int4, compute-bound, and compiled steps, whose weights inductor lays
out anew, showed no difference); the copy would cost 0.045 s of every start-up, more than a short reply
loses, so entries are used where they lie.

Where: `$GPTFORGE_QUANTIZED_CACHE` (a folder; `off` turns the cache off), else `quantized/` in gptforge's
cache (gptforge.user_cache). One file per key, named by a hash of it; the key is repeated in the file's
metadata and checked on reading. A weights file is known by its resolved path, device and inode, size and
modification time, so a checkpoint rewritten or replaced is a new key (gptforge writes files by renaming a
finished temporary: a new inode). Entries are written the same way, through the guard every gptforge output
goes through (gptforge.outputs: one writer at a time, and never over a link or a file it did not write). An
entry that cannot be read or does not fit the model is ignored and written again. After each write, the least
recently used entries beyond MAX_BYTES are deleted, the newest always kept; nothing but entries is, in the
cache's own folder. A cache that cannot be written (read-only, full, another writer at it) costs only the
next run its quantizing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import UserError
from ..outputs import OutputKind, owned_output
from ..user_cache import cache_dir
from .quantize import quantize_model, quantized_state

ENV = "GPTFORGE_QUANTIZED_CACHE"
FOLDER = "quantized"  # in gptforge's cache
#: part of every key: raise it when quantize.py stores its formats differently (group size, padding, packing)
FORMAT = "1"
#: entries kept (least recently used deleted first); the newest is kept even when larger alone
MAX_BYTES = 4 << 30
ALIGN = 64  # bytes: where each stored tensor starts (see _write)
_MAX_HEADER = 100 << 20  # bytes: safetensors' own limit on a header
_LAYOUT = "layout"  # metadata: each tensor's dtype and shape (stored as padded bytes)
_ENTRY = re.compile(r"[0-9a-f]{32}-int[48]\.safetensors")


def cache_folder() -> Path | None:
    """Where entries live: `$GPTFORGE_QUANTIZED_CACHE`, else `<gptforge cache>/quantized`; None when the
    variable says `off`."""
    env = os.environ.get(ENV, "").strip()
    if env.lower() in ("off", "0", "false", "no"):
        return None
    return Path(env).expanduser() if env else cache_dir() / FOLDER


def entry_key(weights_file: str | os.PathLike, kind: str, dtype: torch.dtype) -> dict[str, str] | None:
    """What a quantized copy of `weights_file` (loaded as `dtype`) depends on, as the strings stored in the
    entry's metadata; None when the file cannot be found."""
    try:
        path = Path(weights_file).resolve(strict=True)
        stat = path.stat()
    except OSError:
        return None
    return {"format": FORMAT, "kind": kind, "dtype": str(dtype).removeprefix("torch."), "weights": str(path),
            "file": f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}",
            "torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}


def entry_path(folder: Path, key: dict[str, str]) -> Path:
    """Where the entry of `key` lives in `folder`."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return folder / f"{digest}-{key['kind']}.safetensors"


def quantize_cached(model: nn.Module, kind: str, weights_file: str | os.PathLike | None) -> nn.Module:
    """quantize_model(model, kind) for a model loaded from `weights_file` and unchanged since: from the cache
    when it holds this file's quantized copy, else quantized here and stored there (without a file, or with
    the cache off, quantized only). Returns `model`."""
    folder = cache_folder()
    dtype = next(model.parameters()).dtype
    key = None if folder is None or weights_file is None else entry_key(weights_file, kind, dtype)
    if key is None:
        return quantize_model(model, kind)
    path = entry_path(folder, key)
    stored = _read(path, key)
    if stored is not None:
        try:
            quantize_model(model, kind, stored)
        except (KeyError, ValueError):
            pass  # not this model's (it cannot be, unless edited): quantize, and replace the entry
        else:
            try:
                os.utime(path)  # recently used: kept longest
            except OSError:
                pass
            return model
    quantize_model(model, kind)
    _write(path, key, quantized_state(model), Path(weights_file))
    return model


def _read(path: Path, key: dict[str, str]) -> dict[str, torch.Tensor] | None:
    from safetensors import SafetensorError, safe_open

    if path.is_symlink() or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            layout = json.loads(metadata.pop(_LAYOUT, "{}"))
            if metadata != key or set(layout) != set(f.keys()):
                return None
            tensors = {}
            for name, (dtype, shape) in layout.items():
                dtype = getattr(torch, dtype)
                count = math.prod(shape)
                tensors[name] = f.get_tensor(name).view(dtype)[:count].view(shape)  # (memory-mapped, no copy)
            return tensors
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, AttributeError):
        return None


def _write(path: Path, key: dict[str, str], tensors: dict[str, torch.Tensor], weights_file: Path) -> None:
    """A safetensors file whose every tensor starts at a multiple of ALIGN bytes from the (page-aligned) start
    of its memory mapping: each is stored as its bytes, zero-padded to a multiple of ALIGN, and the header is
    padded so the data starts at one. The int8 kernel crashes on misaligned weights, and safetensors' own
    writer packs tensors back to back after an 8-byte-aligned header. Written through the guard every output
    goes through (gptforge.outputs): it replaces only an entry, never what the model was read from, a
    symbolic link or a path another writer holds."""
    layout, offsets, start = {}, {}, 0
    for name in sorted(tensors):
        tensor = tensors[name]
        layout[name] = (str(tensor.dtype).removeprefix("torch."), list(tensor.shape))
        size = tensor.numel() * tensor.element_size()
        padded = size + -size % ALIGN
        offsets[name] = {"dtype": "U8", "shape": [padded], "data_offsets": [start, start + padded]}
        start += padded
    header = json.dumps({"__metadata__": {**key, _LAYOUT: json.dumps(layout)}, **offsets},
                        separators=(",", ":")).encode()
    header += b" " * (-(8 + len(header)) % ALIGN)  # spaces: how safetensors pads its own header
    try:
        with owned_output(path, ENTRY, replace=True, inputs={"--model": str(weights_file)}, option=ENV,
                          command="quantize") as tmp, open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            for name in sorted(tensors):
                data = tensors[name].contiguous().view(-1).view(torch.uint8).numpy()
                f.write(memoryview(data))
                f.write(bytes(-data.size % ALIGN))
        _prune(path.parent, keep=path)
    except (OSError, UserError):
        pass  # the cache only saves time: the next run quantizes again


def _metadata(path: Path) -> dict[str, str]:
    """The metadata in a safetensors file's header ({} if it has none or is not one)."""
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 0 < length <= _MAX_HEADER:
                return {}
            header = json.loads(f.read(length))
    except (OSError, ValueError):
        return {}
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def _is_entry(path: Path) -> bool:
    """An entry this module wrote: its name, and a key in its metadata."""
    return _ENTRY.fullmatch(path.name) is not None and {"format", "kind", "weights", "file"} <= _metadata(path).keys()


ENTRY = OutputKind("a quantized-weights cache entry", False, _is_entry, replace_flag=None)


def _prune(folder: Path, keep: Path) -> None:
    """Delete the least recently used entries beyond MAX_BYTES (never `keep`, the one just written); nothing
    in the folder that is not an entry."""
    entries = []
    for path in folder.iterdir():
        if not path.is_symlink() and path.is_file() and _is_entry(path):
            try:
                stat = path.stat()
            except OSError:
                continue
            entries.append((stat.st_mtime_ns, stat.st_size, path))
    total = 0
    for _, size, path in sorted(entries, key=lambda entry: entry[0], reverse=True):
        total += size
        if total > MAX_BYTES and path != keep:
            path.unlink(missing_ok=True)
