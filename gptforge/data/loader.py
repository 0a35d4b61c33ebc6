"""Serve (x, y) training batches from prepared shards: memory-mapped, seeded, rank-partitioned, resumable.

Each shard is cut at stride seq_len into sequences of seq_len + 1 tokens (x = the first seq_len, y = the
last seq_len), so sequences never straddle shards and every token but a shard's last is a target once
per epoch. An epoch is a permutation of all sequence indices drawn from seed + epoch, so the data is
sampled without replacement and reshuffled every epoch.

Ranks share one global cursor `position` (sequences consumed by all ranks together this epoch): rank r
takes `order[position + r]`, then the cursor moves by world_size. The ranks' slices are disjoint and
together cover the epoch (the last `sequences % world_size` are dropped so every rank makes the same number
of steps). Because the state is the global cursor, a run saved with one world size resumes exactly with
another: nothing has to be re-derived per rank.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..errors import UserError
from .prepare import SPLITS, read_manifest
from .shards import check_vocab, open_shard

STATE_VERSION = 1


def vocab_limit(manifest: dict[str, Any], model_vocab: int | None = None) -> tuple[int, str] | None:
    """(ids must be below this, whose limit it is) for a prepared directory's manifest and the model's real
    vocabulary, whichever is smaller; None when neither is known."""
    tokenizer = manifest.get("tokenizer")
    data_vocab = tokenizer.get("vocab_size") if isinstance(tokenizer, dict) else None
    limits = []
    if isinstance(data_vocab, int):
        limits.append((data_vocab, "the data's tokenizer"))
    if model_vocab is not None:
        limits.append((model_vocab, "the model's vocabulary"))
    return min(limits) if limits else None


def check_loader_args(split: str, seq_len: int, batch_size: int, rank: int, world_size: int) -> None:
    """The arguments every batch source (plain token shards or packed chat rows) takes, checked alike."""
    if split not in SPLITS:
        raise UserError(f"split {split!r}: must be one of {', '.join(SPLITS)}")
    if seq_len < 1 or batch_size < 1:
        raise UserError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be at least 1")
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"rank {rank} / world size {world_size}: need 0 <= rank < world_size")


class SequenceLoader:
    """Batches of `batch_size` sequences of `seq_len` tokens from split `split` of a prepared directory."""

    def __init__(self, data_dir: str | os.PathLike, split: str, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, vocab_size: int | None = None) -> None:
        """`vocab_size`: the model's real (unpadded) vocabulary; every shard's largest id is checked against
        it and against the data's own tokenizer (from the shard headers: no data is read) before any batch."""
        check_loader_args(split, seq_len, batch_size, rank, world_size)
        self.data_dir = Path(data_dir)
        self.split = split
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        manifest = read_manifest(self.data_dir)
        self.manifest = manifest
        paths = [self.data_dir / entry["file"] for entry in manifest["splits"][split]["shards"]]
        limit = vocab_limit(manifest, vocab_size)
        if limit is not None:
            for path in paths:
                check_vocab(path, *limit)
        self.shards = [open_shard(path) for path in paths]
        counts = np.array([max(0, (s.size - 1) // seq_len) for s in self.shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.sequences_per_epoch = int(self._starts[-1])
        if self.sequences_per_epoch < world_size:
            tokens = sum(s.size for s in self.shards)
            raise UserError(f"split {split!r} of {self.data_dir} has {tokens} tokens, {self.sequences_per_epoch} "
                            f"sequence(s) of {seq_len}+1 tokens for {world_size} rank(s); lower the sequence "
                            "length, prepare more data, or raise --val-fraction")
        self.epoch = 0
        self.position = 0
        self._order: np.ndarray | None = None

    # ---- ordering ---------------------------------------------------------------------------------------

    @property
    def sequences_per_rank(self) -> int:
        """Sequences each rank sees per epoch (the remainder of an uneven split is dropped)."""
        return self.sequences_per_epoch // self.world_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of sequence indices for `epoch` (all ranks); seeded by seed + epoch."""
        return np.random.default_rng(self.seed + epoch).permutation(self.sequences_per_epoch)

    def _next_index(self) -> int:
        if self.position + self.world_size > self.sequences_per_epoch:
            self.epoch += 1
            self.position = 0
            self._order = None
        if self._order is None:
            self._order = self.epoch_order(self.epoch)
        index = int(self._order[self.position + self.rank])
        self.position += self.world_size
        return index

    # ---- reading ----------------------------------------------------------------------------------------

    def sequence(self, index: int) -> np.ndarray:
        """Tokens of sequence `index`: seq_len + 1 of them, as int64."""
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        start = (index - int(self._starts[shard])) * self.seq_len
        return np.asarray(self.shards[shard][start:start + self.seq_len + 1], dtype=np.int64)

    def _batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([self.sequence(i) for i in indices])
        return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 tensors [batch_size, seq_len]; y is x shifted by one. Crosses epochs seamlessly."""
        return self._batch([self._next_index() for _ in range(self.batch_size)])

    def iter_sequential(self, batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The whole split in order (this rank's strided share when world_size > 1), for evaluation.

        Does not touch the training cursor; the last batch may be smaller.
        """
        batch_size = batch_size or self.batch_size
        indices = range(self.rank, self.sequences_per_epoch, self.world_size)
        for start in range(0, len(indices), batch_size):
            yield self._batch(list(indices[start:start + batch_size]))

    # ---- resuming ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """A small JSON-able dict; load_state_dict continues at exactly the next sequence."""
        return {"version": STATE_VERSION, "split": self.split, "seq_len": self.seq_len, "seed": self.seed,
                "epoch": self.epoch, "position": self.position, "world_size": self.world_size,
                "sequences_per_epoch": self.sequences_per_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state`. A different world size is re-partitioned exactly (the cursor is global)."""
        try:
            version, split, seq_len = state["version"], state["split"], state["seq_len"]
            seed, epoch, position = int(state["seed"]), int(state["epoch"]), int(state["position"])
            saved_world, sequences = int(state["world_size"]), int(state["sequences_per_epoch"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"data loader state is incomplete or malformed ({e!r}); resume from another "
                            "checkpoint") from None
        if version != STATE_VERSION:
            raise UserError(f"data loader state version {version} is not {STATE_VERSION}; this gptforge cannot resume it")
        if split != self.split or seq_len != self.seq_len:
            raise UserError(f"data loader state is for split {split!r} with seq_len {seq_len}, not {self.split!r} "
                            f"with {self.seq_len}; resume with the run's original settings")
        if sequences != self.sequences_per_epoch:
            raise UserError(f"{self.data_dir} now has {self.sequences_per_epoch} sequences per epoch but the saved "
                            f"state had {sequences}: the prepared data changed; resume with the original data")
        if position % saved_world or not 0 <= position <= sequences or epoch < 0:
            raise UserError(f"data loader state has an impossible position {position} (world size {saved_world}, "
                            f"{sequences} sequences); resume from another checkpoint")
        self.seed, self.epoch, self.position = seed, epoch, position
        self._order = None
