"""Locally banded causal attention that computes only the band.

GPT-3's band layers let the query at position t see keys t-window+1 .. t (GPT-Neo's convention). Running
dense attention under a T×T band mask gets the right answer but does the whole square — at T=2048,
window=256 about 8× the band's work. `band_attention` does blockwise local attention instead:

    positions  |<- head ->|<- b ->|<- b ->|<- b ->| ...
    queries                [ blk i ]
    keys        [ n blocks before  ][ blk i ]          n = ceil((window-1)/b): enough to reach t-window+1

Each query block of `b` positions attends to its own block and the `n` blocks before it (L = (n+1)·b keys),
under one small (b, L) band mask that is the same for every block. All blocks go through one fused SDPA
call as a batch, with the key windows an overlapping strided view of k (no T×T anything). The first
`head` positions (fewer than window + 2·b) are too early to have n full blocks before them; they go through
plain causal (or small band-masked) attention. Work per query: L ≈ window + b keys instead of T/2 (a
causal flash kernel) or T (the masked square).

An extra boolean mask (a KV cache's left padding of ragged prompts) can restrict the band further; only
its entries inside the blocks are read.

`band_attention_reference` is the plain masked path, kept as the definition the fast path is tested
against.

Dropout: both paths drop each attention weight independently with probability p and scale the rest by
1/(1-p), so their outputs have the same distribution, but the random draws are laid out differently and
the two paths give different samples for the same seed. Without dropout they agree to float rounding.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

# Block size for the blockwise path. Work per query is window + block keys, and per block there is a fixed
# overhead, so smaller blocks do less arithmetic but more bookkeeping; 128 measured best on CPU at
# window 256 (benchmarks/band_attention.py prints the comparison).
DEFAULT_BLOCK = 128


def band_mask(q_len: int, k_len: int, window: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean mask (True = may attend) for causal attention limited to the last `window` keys.

    Queries are the last `q_len` of `k_len` positions (q_len < k_len when earlier keys come from a cache).
    Query at absolute position t sees keys t-window+1 .. t.
    """
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    return (k_pos <= q_pos) & (k_pos > q_pos - window)


@functools.lru_cache(maxsize=64)
def _block_mask(block: int, n_before: int, window: int, device: torch.device) -> torch.Tensor:
    """(block, (n_before+1)·block) mask of a query block over its key window, the same for every block:
    query r sits at key index n_before·block + r of its window."""
    return band_mask(block, (n_before + 1) * block, window, device)


def band_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                             dropout_p: float = 0.0, training: bool = False, *,
                             attn_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Banded causal attention as dense SDPA under a T×T band mask (and `attn_mask`, if given): the
    definition, O(T²) work."""
    T = q.size(-2)
    mask = band_mask(T, T, window, q.device)
    if attn_mask is not None:
        mask = mask & attn_mask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p if training else 0.0,
                                          scale=scale)


def _mask_blocks(mask: torch.Tensor, head: int, n: int, b: int, nb: int) -> torch.Tensor:
    """The entries of a (Bm, Hm, T, T) mask that the blocks use, (Bm, Hm, nb, b, L): block i's queries
    head+i·b+r over its keys head+(i-n)·b+j. A strided view (each block steps b rows and b columns)."""
    m = mask[:, :, head:, head - n * b:]
    s = m.stride()
    return m.as_strided((*m.shape[:2], nb, b, (n + 1) * b), (s[0], s[1], b * (s[2] + s[3]), s[2], s[3]),
                        m.storage_offset())


def band_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                   dropout_p: float = 0.0, training: bool = False, *, attn_mask: torch.Tensor | None = None,
                   block: int | None = None, scale: float | None = None) -> torch.Tensor:
    """Self-attention of q (B, H, T, D) over k, v of the same length where query t sees keys
    t-window+1 .. t; returns (B, H, T, D). Only the band is computed (see the module docstring).

    `dropout_p` applies only when `training` (like F.dropout). `attn_mask`: an optional boolean
    (B or 1, H or 1, T, T) mask further restricting the band (a KV cache's left padding); only its entries
    inside the blocks are read. `block` overrides the block size. Any strides are accepted; the result
    is a (B, H, T, D) view of a (B, T, H, D)-contiguous tensor, so the usual
    `y.transpose(1, 2).reshape(B, T, C)` that follows costs no copy.
    """
    B, H, T, D = q.shape
    if k.size(-2) != T or v.size(-2) != T:
        raise ValueError(f"band_attention needs queries and keys of the same length, got {T} and {k.size(-2)}")
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool:
            raise ValueError(f"band_attention takes a boolean attn_mask, got {attn_mask.dtype}")
        attn_mask = attn_mask.expand(attn_mask.size(0) if attn_mask.dim() == 4 else 1,
                                     attn_mask.size(-3) if attn_mask.dim() >= 3 else 1, T, T)
    p = dropout_p if training else 0.0
    if window >= T and attn_mask is None:  # every query's band reaches position 0: plain causal attention
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=scale)
    b = min(block or DEFAULT_BLOCK, window)
    n = math.ceil((window - 1) / b)  # key blocks before a query block that its band can reach
    L = (n + 1) * b
    # The head is at least n·b long (so every block after it has n full blocks of keys before it) and
    # absorbs the remainder, so the blocks end exactly at T: no padding, no wasted rows.
    head = n * b + (T - n * b) % b
    if head >= T:  # too short for even one block: the square is small
        return band_attention_reference(q, k, v, window, dropout_p, training, attn_mask=attn_mask, scale=scale)
    nb = (T - head) // b
    # split, not two slices: its backward is one concatenation instead of two zero-filled full-size
    # gradients and their sum
    q_head, q_blocks = q.split([head, T - head], dim=2)

    if head <= window and attn_mask is None:
        y_head = F.scaled_dot_product_attention(q_head, k[:, :, :head], v[:, :, :head],
                                                dropout_p=p, is_causal=True, scale=scale)
    else:
        y_head = band_attention_reference(q_head, k[:, :, :head], v[:, :, :head], window, dropout_p,
                                          training, scale=scale,
                                          attn_mask=None if attn_mask is None else attn_mask[..., :head, :head])

    # Blocks go into the batch dimension: (B, T, H, D) positions -> (B·nb, H, b, D). For B=1 and the
    # usual head-major strides this is a view; otherwise reshape copies q once.
    qb = q_blocks.transpose(1, 2).reshape(B * nb, b, H, D).transpose(1, 2)

    def windows(x: torch.Tensor) -> torch.Tensor:
        # Key windows of L positions starting every b positions, from head - n·b on: (B, nb, H, D, L)
        # as an overlapping strided view (unfold), then (B·nb, H, L, D).
        start = head - n * b  # 0 when b divides T: then no slice (its backward is another full-size buffer)
        w = (x if start == 0 else x[:, :, start:]).transpose(1, 2).unfold(1, L, b)
        return w.permute(0, 1, 2, 4, 3).reshape(B * nb, H, L, D)

    if torch.compiler.is_compiling():  # traced into the graph (dynamo would skip the cache anyway)
        mask = band_mask(b, L, window, q.device)
    else:
        mask = _block_mask(b, n, window, q.device)
    if attn_mask is not None:  # (Bm, Hm, nb, b, L) -> (B·nb, Hm, b, L), alongside the blocks
        blocks = _mask_blocks(attn_mask, head, n, b, nb).transpose(1, 2)
        mask = (blocks.expand(B, *blocks.shape[1:]) & mask).reshape(B * nb, -1, b, L)
    y_blocks = F.scaled_dot_product_attention(qb, windows(k), windows(v), attn_mask=mask, dropout_p=p,
                                              scale=scale)  # (B·nb, H, b, D)
    y_blocks = y_blocks.transpose(1, 2).reshape(B, nb * b, H, D)
    y = torch.cat([y_head.transpose(1, 2), y_blocks], dim=1)  # (B, T, H, D)
    return y.transpose(1, 2)
