"""The token shard file: a 64-byte header, then the tokens, so a reader can check a file before trusting it.

Header (little-endian): magic `GPTFSHRD` (8 bytes), format version (uint32), dtype code (uint32: the item
size, 1 = uint8 (chat loss masks), 2 = uint16, 4 = uint32), token count (uint64), and since version 2 the
largest value in the shard (uint64), zero padding to 64 bytes. The file size must equal 64 + count *
itemsize, which catches a truncated copy or an interrupted write. The stored maximum lets a loader refuse
ids outside the model's vocabulary without reading the data (`shard_max_id`); version-1 shards, written
before it existed, are still read, and their maximum is computed once by a vectorised scan. Shards are
memory-mapped for reading, so a loader never holds a whole corpus in RAM.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..atomic import atomic_file
from ..errors import UserError
from ..layout import shard_file

MAGIC = b"GPTFSHRD"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: no stored maximum
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQQ")  # magic, version, dtype code, count, max value (v2; zero padding in v1)
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


@dataclass(frozen=True)
class ShardHeader:
    dtype: np.dtype
    count: int
    max_id: int | None  # None for version-1 shards (see shard_max_id); 0 for an empty shard
    version: int


def encode_header(count: int, dtype: np.dtype | type, max_id: int = 0) -> bytes:
    """The 64-byte header for a shard of `count` tokens of `dtype` whose largest value is `max_id`."""
    return _HEADER.pack(MAGIC, FORMAT_VERSION, _dtype_code(dtype), count, max_id).ljust(HEADER_BYTES, b"\0")


def write_shard(path: str | os.PathLike, tokens: np.ndarray, dtype: np.dtype | type) -> None:
    """Write `tokens` as one shard atomically; ids must fit `dtype` (checked, since a silent wrap is fatal)."""
    dtype = np.dtype(dtype)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(dtype).max):
        raise ValueError(f"token ids outside the range of {dtype}")
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(encode_header(tokens.size, dtype, int(tokens.max()) if tokens.size else 0))
        f.write(tokens.astype(dtype, copy=False).tobytes())


class ShardWriter:
    """Append token arrays to numbered shards `{prefix}_{i:06d}.bin` of at most `max_tokens` tokens each.

    Used inside a directory that is itself written atomically (prepare), so each shard is written in place
    and its header's count and maximum are filled in when it is closed. `shards` lists (file name, token
    count); `max_ids` maps each file name to its largest value.
    """

    def __init__(self, directory: Path, prefix: str, dtype: np.dtype | type, max_tokens: int) -> None:
        if max_tokens < 1:
            raise ValueError("max_tokens must be positive")
        self.directory = Path(directory)
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self.max_tokens = max_tokens
        self.shards: list[tuple[str, int]] = []
        self.max_ids: dict[str, int] = {}
        self.total = 0
        self._file: BinaryIO | None = None
        self._count = 0
        self._max = 0

    def _open(self) -> None:
        name = shard_file(self.prefix, len(self.shards))
        self._file = open(self.directory / name, "wb")
        self._file.write(encode_header(0, self.dtype))
        self.shards.append((name, 0))
        self._count = 0
        self._max = 0

    def _close_current(self) -> None:
        if self._file is None:
            return
        self._file.seek(0)
        self._file.write(encode_header(self._count, self.dtype, self._max))
        self._file.close()
        self._file = None
        self.shards[-1] = (self.shards[-1][0], self._count)
        self.max_ids[self.shards[-1][0]] = self._max

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens, dtype=self.dtype)
        start = 0
        while start < tokens.size:
            if self._file is None:
                self._open()
            take = min(self.max_tokens - self._count, tokens.size - start)
            chunk = tokens[start:start + take]
            self._max = max(self._max, int(chunk.max()))  # one vectorised pass; the header's max_id
            self._file.write(chunk.tobytes())
            self._count += take
            self.total += take
            start += take
            if self._count == self.max_tokens:
                self._close_current()

    def close(self) -> list[tuple[str, int]]:
        self._close_current()
        return self.shards


def read_shard_header(path: str | os.PathLike) -> ShardHeader:
    """Validate a shard's header and size. UserError names the file and says what to do."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise UserError(f"shard {path} is missing; prepare the data again (gptforge prepare)") from None
    if len(header) < HEADER_BYTES:
        raise UserError(f"shard {path} is shorter than its {HEADER_BYTES}-byte header; prepare the data again")
    magic, version, code, count, max_id = _HEADER.unpack_from(header)
    if magic != MAGIC:
        raise UserError(f"{path} is not a gptforge token shard (bad magic {magic!r}); "
                        "point at a directory written by gptforge prepare")
    if version not in READABLE_VERSIONS:
        raise UserError(f"shard {path} has format version {version}, this gptforge reads versions "
                        f"{', '.join(map(str, READABLE_VERSIONS))}; re-run gptforge prepare with this version")
    if code not in DTYPE_CODES:
        raise UserError(f"shard {path} has unknown dtype code {code}; the file is damaged, prepare the data again")
    dtype = DTYPE_CODES[code]
    expected = HEADER_BYTES + count * dtype.itemsize
    if size != expected:
        raise UserError(f"shard {path} is {size} bytes but its header promises {expected} "
                        f"({count} tokens); the file is truncated or damaged, prepare the data again")
    return ShardHeader(dtype, count, max_id if version >= 2 else None, version)


def read_header(path: str | os.PathLike) -> tuple[np.dtype, int]:
    """(dtype, token count) of a validated shard."""
    header = read_shard_header(path)
    return header.dtype, header.count


def open_shard(path: str | os.PathLike) -> np.ndarray:
    """The shard's tokens as a read-only memory map (an empty array for an empty shard)."""
    dtype, count = read_header(path)
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


def shard_max_id(path: str | os.PathLike) -> int:
    """The largest token id in a shard (0 when empty): from the header, or for a version-1 shard by one
    vectorised pass over the memory map (about a second per GB)."""
    header = read_shard_header(path)
    if header.max_id is not None:
        return header.max_id
    tokens = open_shard(path)
    return max((int(tokens[i:i + _CHECK_BLOCK].max()) for i in range(0, tokens.size, _CHECK_BLOCK)), default=0)


def check_vocab(path: str | os.PathLike, vocab_size: int, whose: str = "the vocabulary") -> None:
    """Refuse (UserError naming the file) a shard holding an id >= `vocab_size`: a shard from another
    tokenizer, or damage. Checked before training, because an id past the embedding is an IndexError deep in
    the model, and one inside its padding rows trains silently toward an infinite loss."""
    top = shard_max_id(path)
    if top >= vocab_size:
        raise UserError(f"shard {path} holds token id {top}, outside {whose} of {vocab_size} ids; the data was "
                        "prepared with another tokenizer or is damaged: re-run gptforge prepare with the model's "
                        "tokenizer")


def check_shard_ids(path: str | os.PathLike, vocab_size: int) -> None:
    """Raise UserError if any token id is >= vocab_size, naming the first such position."""
    if shard_max_id(path) < vocab_size:
        return
    tokens = open_shard(path)
    for start in range(0, tokens.size, _CHECK_BLOCK):
        block = tokens[start:start + _CHECK_BLOCK]
        if int(block.max()) >= vocab_size:
            position = start + int(np.argmax(block >= vocab_size))
            raise UserError(f"shard {path}: token id {int(tokens[position])} at position {position} is outside "
                            f"the vocabulary of {vocab_size}; the data was prepared with another tokenizer — "
                            "prepare it again with this one")
