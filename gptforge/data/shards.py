"""The token shard file: a 64-byte header, then the tokens, so a reader can check a file before trusting it.

Header (little-endian): magic `GPTFSHRD` (8 bytes), format version (uint32), dtype code (uint32: the item
size, 1 = uint8 (chat loss masks), 2 = uint16, 4 = uint32), token count (uint64), zero padding to 64 bytes. The file size must equal
64 + count * itemsize, which catches a truncated copy or an interrupted write. Shards are memory-mapped
for reading, so a loader never holds a whole corpus in RAM.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..atomic import atomic_file
from ..errors import UserError

MAGIC = b"GPTFSHRD"
FORMAT_VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQ")
DTYPE_CODES: dict[int, np.dtype] = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16), 4: np.dtype(np.uint32)}
_CHECK_BLOCK = 1 << 24


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _dtype_code(dtype: np.dtype | type) -> int:
    dtype = np.dtype(dtype)
    for code, known in DTYPE_CODES.items():
        if known == dtype:
            return code
    raise ValueError(f"shard dtype must be uint8, uint16 or uint32, not {dtype}")


def encode_header(count: int, dtype: np.dtype | type) -> bytes:
    """The 64-byte header for a shard of `count` tokens of `dtype`."""
    return _HEADER.pack(MAGIC, FORMAT_VERSION, _dtype_code(dtype), count).ljust(HEADER_BYTES, b"\0")


def write_shard(path: str | os.PathLike, tokens: np.ndarray, dtype: np.dtype | type) -> None:
    """Write `tokens` as one shard atomically; ids must fit `dtype` (checked, since a silent wrap is fatal)."""
    dtype = np.dtype(dtype)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(dtype).max):
        raise ValueError(f"token ids outside the range of {dtype}")
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(encode_header(tokens.size, dtype))
        f.write(tokens.astype(dtype, copy=False).tobytes())


class ShardWriter:
    """Append token arrays to numbered shards `{prefix}_{i:06d}.bin` of at most `max_tokens` tokens each.

    Used inside a directory that is itself written atomically (prepare), so each shard is written in place
    and its header's count is filled in when it is closed. `shards` lists (file name, token count).
    """

    def __init__(self, directory: Path, prefix: str, dtype: np.dtype | type, max_tokens: int) -> None:
        if max_tokens < 1:
            raise ValueError("max_tokens must be positive")
        self.directory = Path(directory)
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self.max_tokens = max_tokens
        self.shards: list[tuple[str, int]] = []
        self.total = 0
        self._file: BinaryIO | None = None
        self._count = 0

    def _open(self) -> None:
        name = f"{self.prefix}_{len(self.shards):06d}.bin"
        self._file = open(self.directory / name, "wb")
        self._file.write(encode_header(0, self.dtype))
        self.shards.append((name, 0))
        self._count = 0

    def _close_current(self) -> None:
        if self._file is None:
            return
        self._file.seek(0)
        self._file.write(encode_header(self._count, self.dtype))
        self._file.close()
        self._file = None
        self.shards[-1] = (self.shards[-1][0], self._count)

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens, dtype=self.dtype)
        start = 0
        while start < tokens.size:
            if self._file is None:
                self._open()
            take = min(self.max_tokens - self._count, tokens.size - start)
            self._file.write(tokens[start:start + take].tobytes())
            self._count += take
            self.total += take
            start += take
            if self._count == self.max_tokens:
                self._close_current()

    def close(self) -> list[tuple[str, int]]:
        self._close_current()
        return self.shards


def read_header(path: str | os.PathLike) -> tuple[np.dtype, int]:
    """Validate a shard's header and size; return (dtype, token count). UserError names the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise UserError(f"shard {path} is missing; prepare the data again (gptforge prepare)") from None
    if len(header) < HEADER_BYTES:
        raise UserError(f"shard {path} is shorter than its {HEADER_BYTES}-byte header; prepare the data again")
    magic, version, code, count = _HEADER.unpack_from(header)
    if magic != MAGIC:
        raise UserError(f"{path} is not a gptforge token shard (bad magic {magic!r}); "
                        "point at a directory written by gptforge prepare")
    if version != FORMAT_VERSION:
        raise UserError(f"shard {path} has format version {version}, this gptforge reads {FORMAT_VERSION}; "
                        "prepare the data again with this version")
    if code not in DTYPE_CODES:
        raise UserError(f"shard {path} has unknown dtype code {code}; the file is damaged, prepare the data again")
    dtype = DTYPE_CODES[code]
    expected = HEADER_BYTES + count * dtype.itemsize
    if size != expected:
        raise UserError(f"shard {path} is {size} bytes but its header promises {expected} "
                        f"({count} tokens); the file is truncated or damaged, prepare the data again")
    return dtype, count


def open_shard(path: str | os.PathLike) -> np.ndarray:
    """The shard's tokens as a read-only memory map (an empty array for an empty shard)."""
    dtype, count = read_header(path)
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


def check_shard_ids(path: str | os.PathLike, vocab_size: int) -> None:
    """Raise UserError if any token id is >= vocab_size (a shard from another tokenizer, or damage)."""
    tokens = open_shard(path)
    for start in range(0, tokens.size, _CHECK_BLOCK):
        block = tokens[start:start + _CHECK_BLOCK]
        top = int(block.max())
        if top >= vocab_size:
            position = start + int(np.argmax(block >= vocab_size))
            raise UserError(f"shard {path}: token id {int(tokens[position])} at position {position} is outside "
                            f"the vocabulary of {vocab_size}; the data was prepared with another tokenizer — "
                            "prepare it again with this one")
