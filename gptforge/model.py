"""The GPT-2 / GPT-3 transformer, written to be read top to bottom.

Parameter names follow GPT-2's own checkpoint (transformer.wte, .h.N.attn.c_attn, ...), stored as
nn.Linear (out, in), so that the mapping to Hugging Face layouts and GGUF is a table, not a puzzle.

One path computes hidden states for training, scoring and generation: `hidden_states(idx, kv_cache)`.
Without a cache the whole sequence attends to itself (causal, or banded in GPT-3's odd layers). With one
(`gptforge.generation.KVCache`), each attention layer hands its new keys and values to the cache and gets
back what to attend over: the prompt itself on the first call (prefill), then the cached keys of all
earlier tokens when one token per row is fed (decode). Shapes: B batch, T new tokens, C = n_embd,
nh heads of hd = C / nh dims, V the real vocabulary.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from .band_attention import band_attention, band_mask  # noqa: F401 (band_mask: public here too)
from .config import ModelConfig
from .fused_loss import linear_cross_entropy

if TYPE_CHECKING:
    from .generation.kv_cache import KVCache

IGNORE_INDEX = -100
# Sequence length x head width up to which CPU training under bf16 autocast computes attention in fp32
# (CausalSelfAttention.attend). Measured on a 2-core Xeon (AMX), forward + backward, bf16 time / fp32 time:
# heads of 32: 1.5 at T 256, 1.1 at 512, 0.9 at 1024; heads of 64: 2.0 at T 160, 0.8-1.1 at 256, 0.7 at 1024;
# heads of 128: 1.4 at T 128, 0.7-0.8 at 256.
CPU_FP32_ATTENTION_MAX = 256 * 64


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer  # the cache keeps one key/value buffer per layer, found by this index
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.window = config.window if config.is_band_layer(layer) else None  # None: dense
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias and config.qkv_bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, kv_cache: "KVCache | None" = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        mask = None
        if kv_cache is not None:
            # Prefill: k, v come back as given (the prompt attends to itself). Decode: the layer's cached keys
            # and values, this step's included, (B, nh, S, hd), with a mask of those each query may see
            # (None: all of them).
            k, v, mask = kv_cache.update(self.layer, k, v)
        y = self.attend(q, k, v, mask)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """softmax(q k^T / sqrt(hd)) v for (B, nh, Tq, hd) queries over (B, nh, Tk, hd) keys: every attention
        the model computes goes through here, so precision or kernel choices are made in one place."""
        if (q.device.type == "cpu" and torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")
                and q.size(2) * q.size(3) <= CPU_FP32_ATTENTION_MAX):
            # Training on CPU under bf16 autocast, short sequences: attention in fp32. There CPU's flash
            # attention (forward + backward) is slower in bf16 than in fp32: 3.9x at T 64 with heads of 32,
            # 1.9x at T 128 with heads of 64. Longer sequences are faster in bf16 (0.67x at T 1024 with heads
            # of 64), so they keep autocast's bf16. The fp32 result is cast back by c_proj's autocast.
            with torch.autocast("cpu", enabled=False):
                return self.attend(q.float(), k.float(), v.float(), mask)
        dropout = self.dropout if self.training else 0.0
        q_len, k_len = q.size(2), k.size(2)
        if q_len == 1 and k_len > 1:
            # Cached decode: one query per row over the keys the cache returned (all in its past; `mask`, if
            # any, drops padding and unwritten slots). Written out because for one query it is two small
            # matmuls, while CPU SDPA kernels are several times slower at this shape (bf16 most of all). On
            # CPU both products run in fp32 whatever the weights' dtype: torch's bf16 batched matmul is 2-3x
            # slower there at one query (gpt2 bf16, batch 1: 46 -> 55 tokens/s; dev-17m over 600 tokens:
            # 122 -> 185), far more than upcasting the cached keys and values costs.
            dtype, compute = q.dtype, (torch.float32 if q.device.type == "cpu" else q.dtype)
            q, k, v = q.to(compute), k.to(compute), v.to(compute)
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, nh, 1, Tk)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            probs = scores.float().softmax(dim=-1).to(compute)  # softmax in fp32 whatever the compute dtype
            if dropout:
                probs = F.dropout(probs, dropout)
            return (probs @ v).to(dtype)  # (B, nh, 1, hd)
        if mask is not None and self.window is not None and self.window < q_len == k_len:
            # Band call site, ragged prefill: the cache's padding mask (which has the band in it), applied
            # only inside the band's blocks.
            return band_attention(q, k, v, self.window, self.dropout, self.training, attn_mask=mask)
        if mask is not None:  # a KV cache's prefill mask: left padding of ragged batches, with the band
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        if self.window is None or self.window >= k_len:  # dense causal (a band reaching back to 0 is causal)
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        # The band call site: a band layer over a whole sequence (training, scoring, prefill); query t sees
        # keys t-window+1 .. t. Blockwise local attention computes only the band (gptforge.band_attention).
        return band_attention(q, k, v, self.window, self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.ffn_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.ffn_dim, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, C) -> (B, T, ffn_dim) -> (B, T, C); GELU in GPT-2's tanh form, so HF logits match exactly
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class OutputHead(nn.Linear):
    """The output projection (..., C) -> (..., V) onto the real vocabulary only, so padded ids are never
    sampled or scored. Its weight is the token embedding (tied, padding rows included); slicing the weight's
    first rows (contiguous) rather than the logits (strided) avoids a copy of the logits forward and a
    zero-filled padded gradient backward. A module, not a function, so decoding code can swap in a faster
    product for the same weight (gptforge.generation.prepare_for_decoding)."""

    def __init__(self, n_embd: int, padded_vocab_size: int, vocab_size: int) -> None:
        super().__init__(n_embd, padded_vocab_size, bias=False)
        self.vocab_size = vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight[: self.vocab_size])


class _SumTiedGradients(torch.autograd.Function):
    """Two views of the tied (V, C) matrix, one for the token embedding and one for the output head, whose
    gradients this adds up itself: the embedding's sparse rows into the head's dense gradient, in place.
    Autograd's own sum of a dense and a sparse gradient is out of place, a copy of the whole matrix every
    step (154 MB for GPT-2; its 2-core CPU step at B 4, T 128 went 1,822 -> 1,758 ms in fp32 and 976 -> 946
    in bf16 without it). The dense gradient is the fused loss's, which hands over its only reference, so
    adding into it is safe."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)  # a use that got no gradient stays None
        return weight.view_as(weight), weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad_tokens: torch.Tensor | None, grad_head: torch.Tensor | None) -> torch.Tensor | None:
        if grad_tokens is None or grad_head is None:
            return grad_head if grad_tokens is None else grad_tokens
        if grad_tokens.is_sparse and not grad_head.is_sparse:  # the embedding's B*T rows, repeats included
            return grad_head.index_add_(0, grad_tokens._indices()[0], grad_tokens._values().to(grad_head.dtype))
        return grad_head + grad_tokens


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.pre_norm = config.norm == "pre"
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: "KVCache | None" = None) -> torch.Tensor:
        if self.pre_norm:  # GPT-2/3: normalise each branch's input, keep the residual stream untouched
            x = x + self.attn(self.ln_1(x), kv_cache)
            return x + self.mlp(self.ln_2(x))
        x = self.ln_1(x + self.attn(x, kv_cache))  # post-LN (original Transformer, GPT-1)
        return self.ln_2(x + self.mlp(x))


class GPT(nn.Module):
    """GPT-2 (and GPT-3 with `attention="alternating"`): token + learned position embeddings, a stack of
    blocks, a final LayerNorm (pre-LN only) and an output head tied to the token embedding.

    `init_weights=False` leaves the parameters as allocated, for callers that load weights right after
    (gptforge.weights builds on the meta device, then assigns the loaded tensors)."""

    def __init__(self, config: ModelConfig, init_weights: bool = True) -> None:
        super().__init__()
        config.validate()
        self.config = config
        V, C = config.padded_vocab_size, config.n_embd
        # Embeddings are given uninitialised storage (`_weight`): _init_weights draws them once, and loaders
        # skip drawing entirely (nn.Embedding's own init on the meta device would import torch._dynamo, ~1 s).
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(V, C, _weight=torch.empty(V, C)),
            wpe=nn.Embedding(config.block_size, C, _weight=torch.empty(config.block_size, C)),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            # Post-LN blocks already end in a LayerNorm (as GPT-1): no final one.
            ln_f=(nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
                  if config.norm == "pre" else nn.Identity()),
        ))
        self.lm_head = OutputHead(config.n_embd, V, config.vocab_size)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one (padded V, C) matrix, in and out
        if init_weights:
            self.apply(self._init_weights)
            with torch.no_grad():
                # Rows past the real vocabulary exist only for fast matmul shapes. Zeroed last: `apply` visits
                # lm_head after wte, and lm_head *is* wte, so zeroing inside _init_weights would be undone.
                self.transformer.wte.weight[config.vocab_size:].zero_()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            if getattr(module, "is_residual_projection", False):
                std = std / math.sqrt(2 * self.config.n_layer)  # GPT-2: residual output projections only
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Parameters of the real model: tied head counted once, vocabulary padding rows not counted."""
        n = sum(p.numel() for p in self.parameters())
        n -= (self.config.padded_vocab_size - self.config.vocab_size) * self.config.n_embd
        if not include_embeddings:
            n -= self.config.vocab_size * self.config.n_embd + self.transformer.wpe.weight.numel()
        return n

    def hidden_states(self, idx: torch.Tensor, kv_cache: "KVCache | None" = None, *,
                      token_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) -> the last block's output (B, T, C), before the final norm.

        Without a cache, idx is a whole sequence from position 0. With one, idx holds the tokens that follow
        what the cache holds (the prompt first, then one per row per step); the cache says their positions,
        which differ per row in a left-padded batch. `token_weight`: the token embedding matrix to look up
        (default wte's; `forward` passes a view of it, see `embed_tokens`)."""
        T = idx.size(1)
        if kv_cache is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence length {T} exceeds the model's context {self.config.block_size}")
            positions = torch.arange(T, device=idx.device)  # (T,), broadcast over the batch
        else:
            positions = kv_cache.start_step(T)  # (T,) or (B, T)
        x = self.transformer.drop(self.embed_tokens(idx, token_weight) + self.transformer.wpe(positions))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        return x

    def embed_tokens(self, idx: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, T) -> (B, T, C), looked up in `weight` (default: wte's). With the head tied
        on a CPU, the lookup's gradient is sparse: its B*T rows are added into the head's dense gradient of
        the same matrix, where the default dense gradient is a zero-filled (V, C) tensor every step,
        page-faulted in afresh (154 MB for GPT-2, whose 2-core CPU step at B 4, T 128 went 3.31 -> 2.93 s in
        fp32, 2.11 -> 2.04 s in bf16). Autograd's own dense + sparse sum still copies the whole matrix;
        `forward`'s training path avoids that too (`_SumTiedGradients`)."""
        return F.embedding(idx, self.transformer.wte.weight if weight is None else weight,
                           sparse=self._sparse_tied_gradient())

    def _sparse_tied_gradient(self) -> bool:
        """Whether the token embedding's gradient is sparse rows (see `embed_tokens`): on a CPU with the head
        tied, while autograd records. Dense under torch.compile, for sharded (DTensor) weights and wherever
        the head is not tied (a sparse gradient alone is one AdamW cannot take)."""
        weight = self.transformer.wte.weight
        return (weight.device.type == "cpu" and self.lm_head.weight is weight and torch.is_grad_enabled()
                and type(weight) is nn.Parameter and not torch.compiler.is_compiling())

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and output projection (..., C) -> (..., V), the real vocabulary only (OutputHead)."""
        return self.lm_head(self.transformer.ln_f(x))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                ignore_index: int = IGNORE_INDEX, *, return_logits: bool = True,
                kv_cache: "KVCache | None" = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, V) and, given targets (B, T), the mean cross-entropy over targets that are not
        `ignore_index` (fine-tuning masks prompt tokens that way). `kv_cache`: see `hidden_states`.

        `return_logits=False` (training) returns (None, loss) and never builds the full logits: the output
        projection and the loss run in row chunks (`gptforge.fused_loss`), with the gradients computed in
        the same pass when autograd needs them. Same loss; far less memory and copying at GPT-2's vocabulary.
        """
        if not return_logits:
            if targets is None:
                raise ValueError("return_logits=False needs targets: the loss is all it returns")
            token_weight, head_weight = None, self.lm_head.weight
            if self._sparse_tied_gradient():  # the tied matrix's two uses summed in place (see the class)
                token_weight, head_weight = _SumTiedGradients.apply(head_weight)
            h = self.transformer.ln_f(self.hidden_states(idx, kv_cache, token_weight=token_weight))  # (B, T, C)
            return None, linear_cross_entropy(h.flatten(0, 1), head_weight, targets.reshape(-1),
                                              self.config.vocab_size, ignore_index)
        x = self.hidden_states(idx, kv_cache)
        logits = self.head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            # fp32 before the softmax: bf16 log-probabilities of a 50k vocabulary lose the small ones
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.reshape(-1), ignore_index=ignore_index)
        return logits, loss
