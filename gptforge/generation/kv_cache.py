"""Key/value cache: run the prompt through the model once (prefill), then one token per step (decode).

Layout: one preallocated (B, n_head, size, head_dim) key and value buffer per layer. Dense layers keep
every position (size = the slots this generation can fill, at most the context). GPT-3's banded layers
only ever look at the last `window` keys, so their buffer is a ring of `window` slots: slot s lives at
s % window and is overwritten once it falls out of the band. Attention does not care about key order, so
the ring needs no reordering, only a mask when some of its entries are padding.

Batches of prompts of different lengths are left-padded: row i starts `pad[i]` slots late, its positions
are `slot - pad[i]` (so each row sees exactly the positions it would see alone) and its keys before
`pad[i]` are masked out. Padding queries attend to themselves only, which keeps their (unused) hidden
states finite — a fully masked row would be NaN, and NaN values leak through a zero attention weight.
"""

from __future__ import annotations

import torch

from ..model import GPT


class KVCache:
    """Cache and cached forward passes for one batch; `prefill` once, then `decode` one token per call."""

    def __init__(self, model: GPT, pads: list[int], capacity: int, static: bool = False) -> None:
        """`pads[i]`: left-padding slots of row i; `capacity`: the most slots this cache will hold
        (prompt width + new tokens, at most the model's context).

        `static=True`: decode steps have fixed shapes and no Python values that change per step (the slot
        is a device tensor, attention always spans the whole buffer under a mask), so a step can be
        captured in a CUDA graph. It does more attention work, so the dynamic path is the CPU default."""
        config = model.config
        if capacity > config.block_size:
            raise ValueError(f"cache capacity {capacity} exceeds the context {config.block_size}")
        param = model.transformer.wte.weight
        self.model = model
        self.batch = len(pads)
        self.capacity = capacity
        self.length = 0  # slots filled so far (the same for every row)
        device, dtype = param.device, param.dtype  # prefill re-types the buffers if the forward computes otherwise
        self.device = device
        self.windows: list[int | None] = [block.attn.window for block in model.transformer.h]
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for window in self.windows:
            size = capacity if window is None else min(window, capacity)
            shape = (self.batch, config.n_head, size, config.head_dim)
            # zeros, not empty: masked-out entries still enter the matmul, and garbage NaNs would leak
            self.keys.append(torch.zeros(shape, device=device, dtype=dtype))
            self.values.append(torch.zeros(shape, device=device, dtype=dtype))
        self.max_pad = max(pads)
        slots = torch.arange(capacity, device=device)
        if self.max_pad:
            self.pad = torch.tensor(pads, device=device, dtype=torch.long)[:, None]  # (B, 1)
            self.valid = slots[None, :] >= self.pad  # (B, capacity): which slots hold real tokens
        else:
            self.pad = None
            self.valid = None
        self._slots = slots
        self.static = static
        self._t = torch.zeros((), dtype=torch.long, device=device)  # static mode: the slot being written
        # One attention callable per layer, made once: decode steps must not allocate closures.
        self._attention = [self._make_attention(i) for i in range(len(self.windows))]
        self._masks: dict[int | None, torch.Tensor | None] = {}
        self._prefill = False

    # ------------------------------------------------------------------ forward passes

    @torch.inference_mode()
    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        """Run the left-padded prompts `idx` (B, T) from slot 0; returns the last position's logits (B, V)."""
        B, T = idx.shape
        if T > self.capacity:
            raise ValueError(f"prompt width {T} exceeds the cache capacity {self.capacity}")
        self.length = 0
        positions = self._slots[:T] if self.pad is None else (self._slots[None, :T] - self.pad).clamp(min=0)
        self._masks = {w: self._prefill_mask(T, w) for w in set(self.windows)}
        self._prefill = True
        try:
            logits = self._forward(idx, positions)
        finally:
            self._prefill = False
        self.length = T
        self._t.fill_(T)
        return logits

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one new token per row (`tokens` (B,) or (B, 1)); returns the next logits (B, V)."""
        t = self.length
        if t >= self.capacity:
            raise ValueError("KV cache is full; the caller must re-prefill (slide the context window)")
        idx = tokens.view(self.batch, 1)
        if self.static:
            logits = self.decode_static(idx)
            self.length = t + 1
            return logits
        positions = self._slots[t:t + 1] if self.pad is None else (t - self.pad)
        self._masks = {w: self._decode_mask(t, w) for w in set(self.windows)}
        logits = self._forward(idx, positions)
        self.length = t + 1
        return logits

    def decode_static(self, idx: torch.Tensor) -> torch.Tensor:
        """One decode step that reads the slot from `self._t` and advances it on the device: the same work
        every call, safe to capture in a CUDA graph. `self.length` is the caller's to advance."""
        t = self._t
        positions = t.view(1) if self.pad is None else (t - self.pad)
        lo = 0 if self.pad is None else self.pad
        self._masks = {}
        for window in set(self.windows):
            size = self.capacity if window is None else min(window, self.capacity)
            ring = self._slots[:size]
            slot_of = ring if window is None else t - torch.remainder(t - ring, size)
            self._masks[window] = ((slot_of >= lo) & (slot_of <= t))[..., None, None, :].expand(self.batch, 1, 1, size)
        logits = self._forward(idx, positions)
        self._t.add_(1)
        return logits

    def _forward(self, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.model.embed(idx, positions)
        for block, attention in zip(self.model.transformer.h, self._attention):
            x = block(x, attention=attention)
        return self.model.head(x[:, -1])

    # ------------------------------------------------------------------ attention with the cache

    def _make_attention(self, layer: int):
        window = self.windows[layer]
        size = self.keys[layer].size(2)

        def attention(attn, h: torch.Tensor) -> torch.Tensor:
            q, k, v = attn.split_heads(h)
            mask = self._masks[window]
            if self._prefill and self.keys[layer].dtype != k.dtype:
                # The forward computes in another dtype than the weights are stored in (autocast, or
                # FSDP2's bf16 compute over fp32 shards): keep keys and values as it computes them.
                self.keys[layer] = self.keys[layer].to(k.dtype)
                self.values[layer] = self.values[layer].to(k.dtype)
            keys, values = self.keys[layer], self.values[layer]
            if self._prefill:
                T = k.size(2)
                if window is None or T <= size:
                    keys[:, :, :T].copy_(k)
                    values[:, :, :T].copy_(v)
                else:  # only the last `size` slots stay in the ring, at slot % size
                    ring = torch.arange(T - size, T, device=k.device) % size
                    keys.index_copy_(2, ring, k[:, :, T - size:])
                    values.index_copy_(2, ring, v[:, :, T - size:])
                # mask None: attend applies the layer's own (causal or band) pattern to the whole prompt
                return attn.attend(q, k, v, mask)
            if self.static:
                slot = (self._t if window is None else self._t % size).view(1)
                keys.index_copy_(2, slot, k)
                values.index_copy_(2, slot, v)
                return attn.attend(q, keys, values, mask)
            t = self.length
            slot = t if window is None else t % size
            keys[:, :, slot:slot + 1].copy_(k)
            values[:, :, slot:slot + 1].copy_(v)
            n = min(t + 1, size)
            return attn.attend(q, keys[:, :, :n], values[:, :, :n], mask)

        return attention

    def _prefill_mask(self, T: int, window: int | None) -> torch.Tensor | None:
        """(B, 1, T, T) mask for a padded prompt, or None when no row is padded (the layer's own pattern)."""
        if self.pad is None:
            return None
        q = self._slots[:T, None]
        k = self._slots[None, :T]
        allowed = k <= q
        if window is not None:
            allowed = allowed & (k > q - window)
        real_key = self.valid[:, None, :T]  # (B, 1, T)
        mask = allowed[None] & (real_key | (k == q)[None])  # padding queries see only themselves
        return mask[:, None]

    def _decode_mask(self, t: int, window: int | None) -> torch.Tensor | None:
        """(B, 1, 1, n) mask over the cached keys for the query at slot t; None when every key is real."""
        if self.pad is None:
            return None
        if window is None or t < min(window, self.capacity):
            n = t + 1 if window is None else min(t + 1, self.capacity)
            return self.valid[:, None, None, :n]
        size = min(window, self.capacity)
        if t - size + 1 >= self.max_pad:
            return None  # the band has moved past every row's padding
        ring = self._slots[:size]
        slot_of = t - torch.remainder(t - ring, size)  # the slot each ring entry holds now
        return (slot_of[None, :] >= self.pad)[:, None, None, :]

    # ------------------------------------------------------------------ batch surgery

    def select(self, rows: list[int]) -> None:
        """Keep only `rows` of the batch (finished sequences are dropped to save compute)."""
        index = torch.tensor(rows, device=self.device)
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.batch = len(rows)
        if self.pad is not None:
            self.pad = self.pad.index_select(0, index)
            self.max_pad = int(self.pad.max())
            self.valid = self.valid.index_select(0, index)
            if self.max_pad == 0:
                self.pad = self.valid = None
        self._attention = [self._make_attention(i) for i in range(len(self.windows))]


class CudaGraphDecoder:
    """Replays one captured decode step of a static KVCache (CUDA only; experimental — it was written
    without a GPU to test on, and the CPU tests cover only the static path it captures).

    Per step the Python work is one copy of the new tokens and one graph replay, which is what makes
    batch-1 decoding fast on a GPU, where launching ~150 small kernels per token dominates otherwise.
    """

    def __init__(self, cache: KVCache) -> None:
        if not cache.static or cache.device.type != "cuda":
            raise ValueError("CUDA graphs need a static KVCache on a CUDA device")
        self.cache = cache
        self.tokens = torch.zeros(cache.batch, 1, dtype=torch.long, device=cache.device)
        t = cache._t.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(stream):
            cache.decode_static(self.tokens)  # warm-up; writes only the slot the first real step rewrites
        torch.cuda.current_stream().wait_stream(stream)
        cache._t.copy_(t)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            self.logits = cache.decode_static(self.tokens)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cache.length >= self.cache.capacity:
            raise ValueError("KV cache is full; the caller must re-prefill (slide the context window)")
        self.tokens.copy_(tokens.view(-1, 1))
        self.graph.replay()
        self.cache.length += 1
        return self.logits
