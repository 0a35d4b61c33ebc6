"""Logits processors: pure functions from (B, V) logits to (B, V) logits, one rule each.

They are separate functions (not methods of a sampler) so each can be checked against hand-computed values
and reused by a future server that batches requests with different settings: every parameter may be a
Python number (same for all rows) or a (B, 1) tensor (one value per row). Filtered-out tokens get -inf, so
a later softmax gives them exactly zero probability.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Param = float | int | torch.Tensor

NEG_INF = float("-inf")


def apply_temperature(logits: torch.Tensor, temperature: Param) -> torch.Tensor:
    """Divide by the temperature (> 0). Rows meant to be greedy (temperature 0) are handled by the sampler,
    which takes the argmax before this is applied; a 0 here is treated as 1 so it never divides by zero."""
    if isinstance(temperature, torch.Tensor):
        return logits / torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    return logits / temperature if temperature > 0 else logits


def apply_top_k(logits: torch.Tensor, top_k: Param) -> torch.Tensor:
    """Keep the `top_k` largest logits per row (ties with the k-th value are kept); 0 disables."""
    vocab = logits.size(-1)
    if not isinstance(top_k, torch.Tensor):
        if top_k <= 0 or top_k >= vocab:
            return logits
        kth = torch.topk(logits, int(top_k), dim=-1).values[..., -1:]
        return logits.masked_fill(logits < kth, NEG_INF)
    k = torch.where(top_k <= 0, torch.full_like(top_k, vocab), top_k).clamp(max=vocab).long()
    sorted_logits = torch.sort(logits, dim=-1, descending=True).values
    kth = sorted_logits.gather(-1, k - 1)
    return logits.masked_fill(logits < kth, NEG_INF)


def apply_top_p(logits: torch.Tensor, top_p: Param) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches `top_p`.

    A token is kept when the probability mass of the tokens ranked strictly above it is below `top_p`, so
    the most likely token always survives and p = 1 keeps everything.
    """
    if not isinstance(top_p, torch.Tensor) and top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_above = torch.cumsum(probs, dim=-1) - probs
    remove_sorted = mass_above >= top_p
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: Param) -> torch.Tensor:
    """Keep tokens whose probability is at least `min_p` times that of the most likely token; 0 disables."""
    if not isinstance(min_p, torch.Tensor) and min_p <= 0.0:
        return logits
    probs = torch.softmax(logits.float(), dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p
    return logits.masked_fill(probs < threshold, NEG_INF)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: Param) -> torch.Tensor:
    """Sign-aware repetition penalty (Keskar et al. 2019, as transformers does it): for tokens already in
    the sequence (`seen`, a (B, V) bool mask), divide positive logits by `penalty` and multiply negative
    ones, so a penalty > 1 always makes a repeat less likely."""
    if not isinstance(penalty, torch.Tensor) and penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def banned_ngram_tokens(history: Sequence[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already present in `history` (the next token's n-gram is the
    last n-1 tokens plus it). Reference implementation; generation keeps an incremental index instead."""
    if n <= 0 or len(history) < n - 1:
        return set()
    if n == 1:
        return set(history)
    prefix = tuple(history[len(history) - (n - 1):])
    return {history[i + n - 1] for i in range(len(history) - n + 1)
            if tuple(history[i:i + n - 1]) == prefix}


class NgramIndex:
    """Incremental no-repeat-n-gram bookkeeping for one sequence: maps each (n-1)-gram seen so far to the
    tokens that followed it, so banning costs O(1) per step instead of a scan of the history."""

    def __init__(self, n: int, history: Sequence[int] = ()) -> None:
        self.n = n
        self.history: list[int] = []
        self.followers: dict[tuple[int, ...], set[int]] = {}
        for token in history:
            self.append(token)

    def append(self, token: int) -> None:
        self.history.append(token)
        if self.n >= 1 and len(self.history) >= self.n:
            prefix = tuple(self.history[len(self.history) - self.n: -1])
            self.followers.setdefault(prefix, set()).add(token)

    def banned(self) -> set[int]:
        if self.n <= 0 or len(self.history) < self.n - 1:
            return set()
        prefix = tuple(self.history[len(self.history) - (self.n - 1):]) if self.n > 1 else ()
        return self.followers.get(prefix, set())


def apply_banned_tokens(logits: torch.Tensor, banned: Sequence[set[int]]) -> torch.Tensor:
    """Set the logits of each row's banned tokens to -inf (no-repeat-n-gram)."""
    rows = [r for r, tokens in enumerate(banned) for _ in tokens]
    if not rows:
        return logits
    cols = [t for tokens in banned for t in tokens]
    logits = logits.clone()
    logits[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)] = NEG_INF
    return logits
