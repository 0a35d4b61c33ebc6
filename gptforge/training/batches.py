"""Where training batches come from: one protocol, one factory that reads the data directory's manifest.

The trainer does not know what kind of data it trains on. It asks `open_batch_source` for a `BatchSource`
and calls `next_batch()`; the loss ignores every target equal to -100 (`gptforge.model.IGNORE_INDEX`), so a
source that masks tokens (SFT: score only the assistant's replies) needs nothing else from the loop.

To add a kind of data: make a class with this protocol's members and add `"KIND": "module:Class"` to
`BATCH_SOURCES`; `gptforge prepare` (or `prepare --chat`) writes `"kind": "KIND"` into the manifest
(no `kind` means plain token shards). The class is constructed as
`Class(data_dir, split, seq_len, batch_size, seed=..., rank=..., world_size=...)`.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Iterator, Protocol, runtime_checkable

import torch

from ..errors import UserError

IGNORE_INDEX = -100  # the same value as gptforge.model.IGNORE_INDEX (not imported: this module stays light)

# manifest "kind" -> "module:class"; imported only when a run uses that kind
BATCH_SOURCES: dict[str, str] = {
    "tokens": "gptforge.data.loader:SequenceLoader",  # plain token shards (gptforge prepare)
    "chat": "gptforge.data.chat_loader:ChatLoader",  # packed conversations, loss on replies (prepare --chat)
}
# manifest "kind" -> the command a stopped run on it continues with: a run on chat data is a fine-tune
RESUME_COMMANDS: dict[str, str] = {"tokens": "gptforge train", "chat": "gptforge sft"}


@runtime_checkable
class BatchSource(Protocol):
    """Training batches with a resumable position."""

    epoch: int  # completed passes over the split
    sequences_per_epoch: int  # sequences (all ranks together) in one pass

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y): int64 [batch, seq_len]; y holds the next tokens, -100 where a token is not scored."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """A small JSON-able position; `load_state_dict` continues at exactly the next batch."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def iter_sequential(self, batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The whole split in order (this rank's strided share), for validation of masked data."""
        ...


def data_kind(data_dir: str | os.PathLike) -> str:
    """The manifest's `kind` ("tokens" when it names none)."""
    from ..data.prepare import read_manifest
    kind = read_manifest(data_dir).get("kind", "tokens")
    if kind not in BATCH_SOURCES:
        raise UserError(f"data directory {data_dir} holds data of kind {kind!r}, which this gptforge cannot "
                        f"train on (known: {', '.join(BATCH_SOURCES)}); prepare it again")
    return kind


def check_ids_fit_model(data_dir: str | os.PathLike, vocab_size: int) -> None:
    """Refuse (one line naming the data or the shard) data with token ids the model has no embedding row for.

    An id past the embedding is an IndexError deep inside the first forward pass. Every split is checked,
    since validation reads `val` with the same model; only shard headers are read. Whatever the kind of data,
    its manifest lists each split's token shards under `shards`."""
    from ..data.loader import vocab_limit
    from ..data.prepare import read_manifest
    from ..data.shards import check_vocab

    manifest = read_manifest(data_dir)
    tokenizer = manifest.get("tokenizer")
    data_vocab = tokenizer.get("vocab_size") if isinstance(tokenizer, dict) else None
    if isinstance(data_vocab, int) and vocab_size < data_vocab:
        raise UserError(f"model.vocab_size={vocab_size} is smaller than the tokenizer of {data_dir} ({data_vocab} "
                        f"ids); raise it to at least {data_vocab}")
    limit = vocab_limit(manifest, vocab_size)
    for split in manifest.get("splits", {}).values():
        for entry in split.get("shards", []):
            check_vocab(Path(data_dir) / entry["file"], *limit)


def open_batch_source(data_dir: str | os.PathLike, split: str, seq_len: int, batch_size: int, seed: int = 0,
                      rank: int = 0, world_size: int = 1, vocab_size: int | None = None) -> BatchSource:
    """The batch source for `data_dir`'s kind of data (a UserError naming the directory when unusable).

    `vocab_size`: the model's real vocabulary; with it, no token id of the data may reach past it
    (`check_ids_fit_model`), checked here for every kind of source."""
    module, _, name = BATCH_SOURCES[data_kind(data_dir)].partition(":")
    if vocab_size is not None:
        check_ids_fit_model(data_dir, vocab_size)
    cls = getattr(importlib.import_module(module), name)
    return cls(data_dir, split, seq_len, batch_size, seed=seed, rank=rank, world_size=world_size)
