"""Key/value cache: the prompt goes through the model once (prefill), then one token per row per step (decode).

The model uses it through three calls (see `GPT.hidden_states`): `start_step(T)` gives the positions of the
T new tokens, each attention layer calls `update(layer, k, v)` and attends over what it returns, and
`advance(T)` records that T slots were filled. Everything about slots, padding and rings lives here; every
attention computation lives in model.py.

Layout: one preallocated (B, nh, size, hd) key and value buffer per layer. Dense layers keep every position
(size = the slots this generation can fill, at most the context). GPT-3's banded layers only ever look at the
last `window` keys, so their buffer is a ring of `window` slots: slot s lives at s % window and is
overwritten once it falls out of the band. Attention does not care about key order, so the ring needs no
reordering, only a mask when some of its entries are padding.

Batches of prompts of different lengths are left-padded: row i starts `pad[i]` slots late, its positions
are `slot - pad[i]` (so each row sees exactly the positions it would see alone) and its keys before
`pad[i]` are masked out. Padding queries attend to themselves only, which keeps their (unused) hidden
states finite — a fully masked row would be NaN, and NaN values leak through a zero attention weight.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig


class KVCache:
    """Keys and values of one batch of sequences, for `model.hidden_states(idx, kv_cache=cache)`."""

    def __init__(self, config: ModelConfig, pads: list[int], capacity: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, static: bool = False) -> None:
        """`pads[i]`: left-padding slots of row i; `capacity`: the most slots this cache will hold
        (prompt width + new tokens, at most the model's context).

        `static=True`: decode steps have fixed shapes and no Python values that change per step (the slot
        is a device tensor, attention always spans the whole buffer under a mask), so a step can be
        captured in a CUDA graph. It does more attention work, so the dynamic path is the CPU default."""
        if capacity > config.block_size:
            raise ValueError(f"cache capacity {capacity} exceeds the context {config.block_size}")
        self.batch = len(pads)
        self.capacity = capacity
        self.length = 0  # slots filled so far (the same for every row)
        self.device = torch.device(device)
        self.windows: list[int | None] = [config.window if config.is_band_layer(i) else None
                                          for i in range(config.n_layer)]
        self.sizes = [capacity if w is None else min(w, capacity) for w in self.windows]
        # A static cache's dense buffers get one spare slot, never written and always masked out, so the slots
        # a step attends over are never the whole buffer: a compiled step (which attends over the filled
        # slots only) would otherwise compile again for the one step that fills the buffer (a slice of the
        # whole buffer is contiguous, a shorter one is not, and the compiled matmul differs).
        self.spare = 1 if static else 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for window, size in zip(self.windows, self.sizes):
            shape = (self.batch, config.n_head, size + (self.spare if window is None else 0), config.head_dim)
            # zeros, not empty: masked-out entries still enter the matmul, and garbage NaNs would leak
            self.keys.append(torch.zeros(shape, device=device, dtype=dtype))
            self.values.append(torch.zeros(shape, device=device, dtype=dtype))
        self._slots = torch.arange(capacity + 1, device=device)
        self.pad: torch.Tensor | None = None  # (B, 1) left padding, None when no row is padded
        self.max_pad = max(pads)
        if self.max_pad:
            self.pad = torch.tensor(pads, device=device, dtype=torch.long)[:, None]
        self.static = static
        self._t = torch.zeros((), dtype=torch.long, device=device)  # static mode: the slot being written
        self._masks: dict[int | None, torch.Tensor | None] = {}  # this step's mask per window
        self._new = 0  # tokens of the current step

    # ------------------------------------------------------------------ the model's three calls

    def start_step(self, T: int) -> torch.Tensor:
        """Positions of the T tokens about to be fed, (T,) or (B, T) when rows are padded; prepares this
        step's attention masks (one per distinct window, shared by the layers that have it)."""
        t = self.length
        if t == 0:  # prefill
            if T > self.capacity:
                raise ValueError(f"prompt width {T} exceeds the cache capacity {self.capacity}")
            self._masks = {w: self._prefill_mask(T, w) for w in set(self.windows)}
            slots = self._slots[:T]
        else:
            if T != 1:
                raise ValueError("after the prefill the cache takes one token per row per step")
            if t >= self.capacity:
                raise ValueError("KV cache is full; the caller must re-prefill (slide the context window)")
            if self.static:
                self._masks = {w: self._static_mask(w) for w in set(self.windows)}
                slots = self._t.view(1)
            else:
                self._masks = {w: self._decode_mask(t, w) for w in set(self.windows)}
                slots = self._slots[t:t + 1]
        self._new = T
        return slots if self.pad is None else (slots[None, :] - self.pad).clamp(min=0)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store this step's keys and values (B, nh, T, hd) of `layer`; return the keys and values to attend
        over and their mask (None: the layer's own causal or band pattern over exactly those keys)."""
        window, size = self.windows[layer], self.sizes[layer]
        mask = self._masks[window]
        if self.length == 0:  # prefill: keep what later steps need; the prompt attends to itself
            if self.keys[layer].dtype != k.dtype:
                # The forward computes in another dtype than the weights are stored in (autocast, or
                # FSDP2's bf16 compute over fp32 shards): keep keys and values as it computes them.
                self.keys[layer] = self.keys[layer].to(k.dtype)
                self.values[layer] = self.values[layer].to(k.dtype)
            T = k.size(2)
            if T <= size:
                self.keys[layer][:, :, :T].copy_(k)
                self.values[layer][:, :, :T].copy_(v)
            else:  # a band layer's ring keeps only the last `size` slots, at slot % size
                ring = torch.arange(T - size, T, device=k.device) % size
                self.keys[layer].index_copy_(2, ring, k[:, :, T - size:])
                self.values[layer].index_copy_(2, ring, v[:, :, T - size:])
            return k, v, mask
        if self.static:
            return self.static_update(layer, k, v)
        keys, values = self.keys[layer], self.values[layer]
        t = self.length
        slot = t if window is None else t % size
        keys[:, :, slot:slot + 1].copy_(k)
        values[:, :, slot:slot + 1].copy_(v)
        n = min(t + 1, size)  # slots holding this row's past (all of a full ring)
        return keys[:, :, :n], values[:, :, :n], mask

    def static_update(self, layer: int, k: torch.Tensor, v: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`update` of a static cache's decode step: the slot is the device tensor `_t` (in a ring, `_t` modulo
        the buffer's own length), so the same work runs every step and attention spans the whole buffer under
        this step's mask. It reads no Python number that changes per step or per cache, which is what lets a
        compiled step (gptforge.generation.compiled) run unchanged for every step and every capacity."""
        keys, values = self.keys[layer], self.values[layer]
        slot = (self._t if self.windows[layer] is None else self._t % keys.size(2)).view(1)
        keys.index_copy_(2, slot, k)
        values.index_copy_(2, slot, v)
        return keys, values, self._masks[self.windows[layer]]

    def decode_spans(self) -> dict[int | None, int]:
        """For the decode step about to run, the slots each window's layers have filled, this step's included:
        what a static step needs to attend over (the rest of its buffer is masked out anyway)."""
        return {window: min(self.length + 1, size) for window, size in zip(self.windows, self.sizes)}

    def slot_range(self, n: int) -> torch.Tensor:
        """The slot numbers 0 .. n-1 (a view, no allocation)."""
        return self._slots[:n]

    def capacity_dims(self) -> list[tuple[torch.Tensor, int]]:
        """Each buffer and current mask whose size follows the capacity, with that dimension: what a compiled
        step must not specialize on."""
        buffers = [(t, 2) for t in (*self.keys, *self.values)]  # (B, nh, size, hd)
        return buffers + [(m, 3) for m in self._masks.values() if m is not None]  # (B, 1, Tq, size)

    def advance(self, T: int) -> None:
        """The forward has stored T new slots in every layer."""
        self.length += T
        if self.static:
            self._t.add_(T)  # a device op, so a captured CUDA graph advances it on every replay

    # ------------------------------------------------------------------ masks (True = may attend)

    def _prefill_mask(self, T: int, window: int | None) -> torch.Tensor | None:
        """(B, 1, T, T) mask for a padded prompt, or None when no row is padded (the layer's own pattern)."""
        if self.pad is None:
            return None
        q = self._slots[:T, None]
        k = self._slots[None, :T]
        allowed = k <= q
        if window is not None:
            allowed = allowed & (k > q - window)
        real_key = k >= self.pad[:, :, None]  # (B, 1, T)
        mask = allowed[None] & (real_key | (k == q)[None])  # padding queries see only themselves
        return mask[:, None]

    def _decode_mask(self, t: int, window: int | None) -> torch.Tensor | None:
        """(B, 1, 1, n) mask over the cached keys for the query at slot t; None when every key is real."""
        if self.pad is None:
            return None
        size = self.capacity if window is None else min(window, self.capacity)
        if t < size:  # nothing overwritten yet: slot j holds position j
            return (self._slots[None, :t + 1] >= self.pad)[:, None, None, :]
        if t - size + 1 >= self.max_pad:
            return None  # the band has moved past every row's padding
        slot_of = t - torch.remainder(t - self._slots[:size], size)  # the slot each ring entry holds now
        return (slot_of[None, :] >= self.pad)[:, None, None, :]

    def _static_mask(self, window: int | None) -> torch.Tensor:
        """(B, 1, 1, size) mask over the whole buffer from the device slot `_t`: slots not yet written,
        padding, and (in a ring) entries that hold which slot is computed on the device."""
        size = self.capacity + self.spare if window is None else min(window, self.capacity)
        t = self._t
        ring = self._slots[:size]
        slot_of = ring if window is None else t - torch.remainder(t - ring, size)
        lo = 0 if self.pad is None else self.pad
        return ((slot_of >= lo) & (slot_of <= t))[..., None, None, :].expand(self.batch, 1, 1, size)

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
            if self.max_pad == 0:
                self.pad = None


class CudaGraphDecoder:
    """Replays one captured decode step of a static KVCache (CUDA only).

    Per step the Python work is one copy of the new tokens and one graph replay, which is what makes
    batch-1 decoding fast on a GPU, where launching ~150 small kernels per token dominates otherwise.
    `step(tokens, cache)` is the decode step to capture: (B, 1) ids -> (B, V) logits.
    """

    def __init__(self, step, cache: KVCache) -> None:
        if not cache.static or cache.device.type != "cuda":
            raise ValueError("CUDA graphs need a static KVCache on a CUDA device")
        self.cache = cache
        self.tokens = torch.zeros(cache.batch, 1, dtype=torch.long, device=cache.device)
        t, length = cache._t.clone(), cache.length
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(stream):
            step(self.tokens, cache)  # warm-up; writes only the slot the first real step rewrites
        torch.cuda.current_stream().wait_stream(stream)
        cache._t.copy_(t)
        cache.length = length
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            self.logits = step(self.tokens, cache)
        cache.length = length  # capture records device work without running it, but the host count moved

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cache.length >= self.cache.capacity:
            raise ValueError("KV cache is full; the caller must re-prefill (slide the context window)")
        self.tokens.copy_(tokens.view(-1, 1))
        self.graph.replay()
        self.cache.length += 1
        return self.logits
