"""Batches of packed conversations with a loss mask: the batch source of supervised fine-tuning.

Same contract as `SequenceLoader` (which serves pretraining): `next_batch() -> (x, y)` int64 tensors
[batch_size, seq_len], `iter_sequential` for evaluation, `state_dict` / `load_state_dict` for exact resume,
a global cursor shared by the ranks. The difference is in y: every target that is not assistant content
(or its `<|im_end|>`), and every padding position, is -100, which the model's loss leaves out of its mean.
So the trainer needs nothing SFT-specific: the same loss, the same loop.

An epoch is one packing of all kept conversations (`gptforge.data.chat_packing`), rows in a seeded order;
each conversation is in exactly one row per epoch. With several ranks each rank takes every world_size-th row
of that order, and the last `rows_per_epoch % world_size` rows of each epoch are skipped (every rank makes the
same number of steps), so their conversations are not trained on that epoch; the next epoch's packing and
order differ, so it is not the same conversations every time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..errors import UserError
from ..layout import CHAT_DATA_KIND
from ..model import IGNORE_INDEX
from .chat_packing import best_fit, fit_to_rows
from .loader import check_loader_args
from .prepare import read_manifest
from .shards import open_shard

STATE_VERSION = 1


class _Concatenated:
    """Several shards read as one array (a conversation may straddle two shards)."""

    def __init__(self, shards: list[np.ndarray]) -> None:
        self.shards = shards
        self.starts = np.concatenate([[0], np.cumsum([s.size for s in shards])]).astype(np.int64)

    def read(self, start: int, count: int) -> np.ndarray:
        parts = []
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while count > 0:
            offset = start - int(self.starts[shard])
            take = min(count, self.shards[shard].size - offset)
            parts.append(np.asarray(self.shards[shard][offset:offset + take]))
            start, count, shard = start + take, count - take, shard + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def is_chat_data(data_dir: str | os.PathLike) -> bool:
    """Whether `data_dir` was prepared with `gptforge prepare --chat`."""
    return read_manifest(data_dir).get("kind") == CHAT_DATA_KIND


class ChatLoader:
    """Packed rows of `seq_len` + 1 tokens from split `split` of a chat data directory, masked targets."""

    def __init__(self, data_dir: str | os.PathLike, split: str, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        check_loader_args(split, seq_len, batch_size, rank, world_size)
        self.data_dir = Path(data_dir)
        manifest = read_manifest(self.data_dir)
        if manifest.get("kind") != CHAT_DATA_KIND:
            raise UserError(f"{self.data_dir} holds plain text shards, not conversations; prepare the data with "
                            "`gptforge prepare ... --chat`")
        self.manifest = manifest
        self.split, self.seq_len, self.batch_size = split, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.capacity = seq_len + 1
        info = manifest["splits"][split]
        self.tokens = _Concatenated([open_shard(self.data_dir / e["file"]) for e in info["shards"]])
        self.masks = _Concatenated([open_shard(self.data_dir / e["file"]) for e in info["mask_shards"]])
        index = self._read_index(self.data_dir / info["index"])
        self.offsets = np.concatenate([[0], np.cumsum(index[:, 0])]).astype(np.int64)
        if int(self.offsets[-1]) != int(self.tokens.starts[-1]):
            raise UserError(f"{self.data_dir / info['index']} does not match the token shards of split {split!r}; "
                            "prepare the data again")
        self.kept, self.lengths = fit_to_rows(index[:, 0], index[:, 1], self.capacity)
        self.conversations = int(index.shape[0])
        self.truncated = int((index[self.kept, 0] > self.capacity).sum())
        self.dropped = self.conversations - int(self.kept.size)
        self.pad_id = int(manifest["tokenizer"]["eot_id"])
        self._packed_epoch: int | None = None
        self._rows: list[list[int]] = []
        self._order: np.ndarray | None = None
        self.sequences_per_epoch = len(self._packing(0)[0])
        self.padding_fraction = (1.0 - int(self.lengths.sum()) / (self.sequences_per_epoch * self.capacity)
                                 if self.sequences_per_epoch else 1.0)
        if self.sequences_per_epoch < world_size:
            raise UserError(f"split {split!r} of {self.data_dir} packs into {self.sequences_per_epoch} row(s) of "
                            f"{self.capacity} tokens for {world_size} rank(s) ({self.dropped} conversation(s) "
                            "dropped as too long); prepare more conversations or lower the rank count")
        self.epoch = 0
        self.position = 0

    @staticmethod
    def _read_index(path: Path) -> np.ndarray:
        try:
            index = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f"{path} is missing or damaged ({e}); prepare the data again") from None
        if index.ndim != 2 or index.shape[1] != 2:
            raise UserError(f"{path} has shape {index.shape}, expected (conversations, 2); prepare the data again")
        return index.astype(np.int64, copy=False)

    # ---- packing ----------------------------------------------------------------------------------------

    def _packing(self, epoch: int) -> tuple[list[list[int]], np.ndarray]:
        """(rows as positions into self.kept, the order rows are served in) for `epoch`; cached."""
        if self._packed_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._rows = best_fit(self.lengths, self.capacity, order=rng.permutation(self.lengths.size))
            self._order = rng.permutation(len(self._rows))
            self._packed_epoch = epoch
        return self._rows, self._order

    def describe(self) -> str:
        """One line for the training log: what packing gives for this split."""
        return (f"{self.split}: {self.conversations:,} conversations packed into {self.sequences_per_epoch:,} rows of "
                f"{self.capacity} tokens per epoch, padding {100 * self.padding_fraction:.1f}%, "
                f"{self.truncated} truncated, {self.dropped} dropped")

    def row(self, items: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and mask of one packed row (padding: end-of-text ids with mask 0)."""
        tokens = np.full(self.capacity, self.pad_id, dtype=np.int64)
        mask = np.zeros(self.capacity, dtype=bool)
        at = 0
        for item in items:
            conversation = int(self.kept[item])
            start, n = int(self.offsets[conversation]), int(self.lengths[item])
            tokens[at:at + n] = self.tokens.read(start, n)
            mask[at:at + n] = self.masks.read(start, n).astype(bool)
            at += n
        return tokens, mask

    def _batch(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        packed = [self.row(items) for items in rows]
        tokens = np.stack([t for t, _ in packed])
        mask = np.stack([m for _, m in packed])
        x = tokens[:, :-1]
        y = np.where(mask[:, 1:], tokens[:, 1:], IGNORE_INDEX)  # a target is scored only where it is trained
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))

    # ---- serving ----------------------------------------------------------------------------------------

    @property
    def sequences_per_rank(self) -> int:
        return self.sequences_per_epoch // self.world_size

    def _next_row(self) -> list[int]:
        if self.position + self.world_size > self.sequences_per_epoch:
            self.epoch += 1
            self.position = 0
        rows, order = self._packing(self.epoch)
        items = rows[int(order[self.position + self.rank])]
        self.position += self.world_size
        return items

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 [batch_size, seq_len]; y is -100 wherever nothing is to be learned."""
        return self._batch([self._next_row() for _ in range(self.batch_size)])

    def iter_sequential(self, batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Epoch 0's rows in order (this rank's strided share), for evaluation; the cursor is untouched."""
        batch_size = batch_size or self.batch_size
        rows, order = self._epoch0()
        indices = range(self.rank, self.sequences_per_epoch, self.world_size)
        for start in range(0, len(indices), batch_size):
            yield self._batch([rows[int(order[i])] for i in indices[start:start + batch_size]])

    def _epoch0(self) -> tuple[list[list[int]], np.ndarray]:
        """Epoch 0's packing without disturbing the cached packing of the current epoch."""
        saved = (self._packed_epoch, self._rows, self._order)
        try:
            return self._packing(0)
        finally:
            self._packed_epoch, self._rows, self._order = saved

    # ---- resuming ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "kind": CHAT_DATA_KIND, "split": self.split, "seq_len": self.seq_len,
                "seed": self.seed, "epoch": self.epoch, "position": self.position, "world_size": self.world_size,
                "sequences_per_epoch": self.sequences_per_epoch, "conversations": self.conversations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            version, kind, split, seq_len = state["version"], state.get("kind"), state["split"], state["seq_len"]
            seed, epoch, position = int(state["seed"]), int(state["epoch"]), int(state["position"])
            saved_world, rows = int(state["world_size"]), int(state["sequences_per_epoch"])
            conversations = int(state["conversations"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"chat loader state is incomplete or malformed ({e!r}); resume from another "
                            "checkpoint") from None
        if version != STATE_VERSION or kind != CHAT_DATA_KIND:
            raise UserError("the checkpoint's data state is not a chat loader's (version or kind differ); resume "
                            "with the data the run was started with")
        if split != self.split or seq_len != self.seq_len:
            raise UserError(f"chat loader state is for split {split!r} with seq_len {seq_len}, not {self.split!r} "
                            f"with {self.seq_len}; resume with the run's original settings")
        if rows != self.sequences_per_epoch or conversations != self.conversations:
            raise UserError(f"{self.data_dir} now packs {self.conversations} conversations into "
                            f"{self.sequences_per_epoch} rows, the checkpoint saw {conversations} into {rows}: the "
                            "prepared data changed; resume with the original data")
        if position % saved_world or not 0 <= position <= rows or epoch < 0:
            raise UserError(f"chat loader state has an impossible position {position}; resume from another "
                            "checkpoint")
        # The saved seed wins, as in SequenceLoader: resuming continues the run's own order, whatever seed this
        # loader was built with (`--resume --set data.seed=N` included). The packing cached in __init__ (and by
        # any batch served since) was drawn from the old seed, so it goes: the next row repacks its epoch.
        self.seed, self.epoch, self.position = seed, epoch, position
        self._packed_epoch, self._rows, self._order = None, [], None
