"""Which text goes to the train split and which to val.

A corpus known before reading to be one document (one plain text file: `sources.single_document_chars`
counts its characters) is split at its tail, as nanoGPT splits a text file: val and train never interleave.
Otherwise each document piece (a document, or one of the <= 16 Ki-character pieces of a longer one) is drawn
by a seeded hash with probability `val_fraction` — reproducible, independent of worker count, and it keeps
documents whole where they are short. That needs enough pieces to draw from: with few of them (one text
file, a handful of documents) the draw gives an empty or a wildly off val set. So when the whole corpus has
fewer than MIN_EXPECTED_VAL_PIECES / val_fraction pieces, the split is made as nanoGPT makes it instead: the
last `val_fraction` of the text, cut at a whitespace boundary where tokenization is unchanged, is val.

Deciding needs to know whether the corpus is that small, so the first pieces are held back until either the
threshold is passed (hash draw) or the corpus ends (tail split). The hold-back is capped at
MAX_HELD_PIECES pieces, so memory stays bounded. `SplitPlan.describe()` says in the manifest how it was made.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Iterable, Iterator

from .sources import PIECE_CHARS, Piece, safe_cut_near

#: A hash draw is used when it is expected to put at least this many pieces into val.
MIN_EXPECTED_VAL_PIECES = 5
#: The most pieces held back to decide (bounded memory: at most this many x PIECE_CHARS characters).
MAX_HELD_PIECES = 2048

Unit = tuple[str, int, bool]  # (text, split 0=train 1=val, ends a document)


def split_of(unit: int, seed: int, val_fraction: float) -> int:
    """0 (train) or 1 (val) for the unit-th document piece: a seeded hash, so the split is reproducible."""
    if val_fraction <= 0:
        return 0
    digest = hashlib.blake2b(f"{seed}:{unit}".encode(), digest_size=8).digest()
    return int(int.from_bytes(digest, "little") < val_fraction * 2.0 ** 64)


class SplitPlan:
    """Assign pieces to splits (`assign`), choosing hash draw or tail split as the module docstring says."""

    def __init__(self, seed: int, val_fraction: float, document_chars: int | None = None) -> None:
        """`document_chars`: the corpus is one document of this many characters (its tail is val, streamed)."""
        self.seed = seed
        self.val_fraction = val_fraction
        self.method = "none" if val_fraction <= 0 else "hash"
        self.document_chars = document_chars
        self.pieces = 0
        self.val_chars = 0
        self.total_chars = 0

    @property
    def threshold(self) -> int:
        """Pieces needed for a hash draw (capped at MAX_HELD_PIECES)."""
        return min(MAX_HELD_PIECES, math.ceil(MIN_EXPECTED_VAL_PIECES / self.val_fraction))

    def assign(self, pieces: Iterable[Piece]) -> Iterator[Unit]:
        if self.val_fraction <= 0:
            for piece in pieces:
                self.pieces += 1
                yield piece.text, 0, piece.last
            return
        if self.document_chars is not None:
            self.method = "tail"
            yield from self._tail(pieces, self.document_chars)
            return
        stream = iter(pieces)
        held: list[Piece] = []
        for piece in stream:
            held.append(piece)
            if len(held) >= self.threshold:
                break
        else:  # the corpus ended first: too few pieces for a draw
            self.method = "tail"
            yield from self._tail(held, sum(len(p.text) for p in held))
            return
        for unit, piece in enumerate(_chain(held, stream)):
            self.pieces += 1
            yield piece.text, split_of(unit, self.seed, self.val_fraction), piece.last

    def _tail(self, pieces: Iterable[Piece], total: int) -> Iterator[Unit]:
        """The last val_fraction of the `total` characters to val, cut at a safe boundary inside its piece."""
        self.total_chars = total
        cut_at = total - max(1, round(total * self.val_fraction))
        offset = 0
        for piece in pieces:
            self.pieces += 1
            end = offset + len(piece.text)
            if end <= cut_at:
                yield piece.text, 0, piece.last
            elif offset >= cut_at:
                self.val_chars += len(piece.text)
                yield piece.text, 1, piece.last
            else:
                cut = safe_cut_near(piece.text, cut_at - offset)
                if cut > 0:
                    yield piece.text[:cut], 0, piece.last and cut == len(piece.text)
                if cut < len(piece.text):
                    self.val_chars += len(piece.text) - cut
                    yield piece.text[cut:], 1, piece.last
            offset = end

    def describe(self) -> dict[str, Any]:
        """How the split was made, for the manifest."""
        if self.method == "none":
            return {"method": "none", "detail": "--val-fraction 0: everything is train"}
        if self.method == "hash":
            return {"method": "hash", "seed": self.seed, "val_fraction": self.val_fraction,
                    "detail": f"each document piece (up to {PIECE_CHARS} characters) drawn into val with "
                              f"probability {self.val_fraction} by a hash seeded with {self.seed}"}
        why = ("one document" if self.document_chars is not None else
               f"only {self.pieces} document piece(s), too few for a random draw at {self.val_fraction}")
        return {"method": "tail", "val_fraction": self.val_fraction, "val_chars": self.val_chars,
                "detail": f"{why}: the last {self.val_chars:,} of {self.total_chars:,} characters "
                          "(cut at a whitespace boundary) are val"}


def _chain(first: list[Piece], rest: Iterator[Piece]) -> Iterator[Piece]:
    yield from first
    first.clear()  # release the held-back pieces as soon as they are handed out
    yield from rest
