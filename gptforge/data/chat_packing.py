"""Best-fit packing of whole conversations into fixed-length rows.

A row holds `capacity` = seq_len + 1 tokens (inputs are the first seq_len, targets the last seq_len). Each
conversation goes whole into one row; what no conversation fills is padding, never scored. Conversations are
placed longest first, each into the row whose free space it fills best (best-fit decreasing: within 11/9 of
the fewest possible rows, and close to optimal on real length mixes), so little of a batch is padding.

A conversation longer than a row is truncated to the row (its start, where the prompt and the beginning of the
answer are, is kept; a cut-off answer has no `<|im_end|>`, so the model is never taught to stop there); one
whose first trained token lies beyond the row would train nothing and is dropped. Both are counted.

Attention across the conversations of a row is not masked. Each conversation starts with `<|im_start|>`,
pretraining already packs documents after `<|endoftext|>` without masks (GPT-3, and our `prepare`), the
targets that would need context from another conversation are never scored, and nanochat measured no
difference; a document mask would also give up the fused causal attention kernel for an explicit mask.

Every epoch packs afresh: equal-length conversations are taken in a seeded order and the rows are shuffled,
so batches differ between epochs. The row structure itself depends only on the multiset of lengths (ties are
broken by row number), so every epoch has the same number of rows, which keeps resuming a simple cursor.
"""

from __future__ import annotations

import bisect
from typing import Any

import numpy as np


def fit_to_rows(lengths: np.ndarray, first_trained: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the conversations kept, their lengths truncated to `capacity`)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    kept = np.flatnonzero(np.asarray(first_trained, dtype=np.int64) < capacity)
    return kept, np.minimum(lengths[kept], capacity)


def best_fit(lengths: np.ndarray, capacity: int, order: np.ndarray | None = None) -> list[list[int]]:
    """Rows as lists of positions into `lengths` (each <= capacity); `order` breaks ties among equal lengths."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and int(lengths.max()) > capacity:
        raise ValueError("every length must fit the capacity; truncate first (fit_to_rows)")
    order = np.arange(lengths.size) if order is None else np.asarray(order)
    items = order[np.argsort(-lengths[order], kind="stable")]
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row), sorted: the first that fits is the best fit
    for item in items.tolist():
        need = int(lengths[item])
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            space, row = free.pop(at)
        else:
            space, row = capacity, len(rows)
            rows.append([])
        rows[row].append(item)
        if space - need > 0:
            bisect.insort(free, (space - need, row))
    return rows


def pack_report(lengths: np.ndarray, first_trained: np.ndarray, capacity: int) -> dict[str, Any]:
    """What packing the conversations at `capacity` gives: rows, padding share, truncated and dropped."""
    lengths = np.asarray(lengths, dtype=np.int64)
    kept, fitted = fit_to_rows(lengths, first_trained, capacity)
    rows = len(best_fit(fitted, capacity))
    used = int(fitted.sum())
    return {"capacity": capacity, "conversations": int(kept.size), "rows": rows,
            "padding": (1.0 - used / (rows * capacity)) if rows else 0.0,
            "truncated": int((lengths[kept] > capacity).sum()), "dropped": int(lengths.size - kept.size)}
