"""The GPT-2 / GPT-3 transformer, written to be read top to bottom.

Parameter names follow GPT-2's own checkpoint (transformer.wte, .h.N.attn.c_attn, ...), stored as
nn.Linear (out, in), so that the mapping to Hugging Face layouts and GGUF is a table, not a puzzle.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .fused_loss import linear_cross_entropy

IGNORE_INDEX = -100


def band_mask(q_len: int, k_len: int, window: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean mask (True = may attend) for causal attention limited to the last `window` keys.

    Queries are the last `q_len` of `k_len` positions (q_len < k_len when earlier keys come from a cache).
    Query at absolute position t sees keys t-window+1 .. t.
    """
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    return (k_pos <= q_pos) & (k_pos > q_pos - window)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.window = config.window if config.is_band_layer(layer) else None
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias and config.qkv_bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, C) -> q, k, v each (B, n_head, T, head_dim)."""
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.n_head * self.head_dim, dim=2)
        return tuple(t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of q over k/v, then the output projection. `mask` overrides the layer's own pattern."""
        dropout = self.dropout if self.training else 0.0
        q_len, k_len = q.size(2), k.size(2)
        band_reaches_all = self.window is None or self.window >= k_len  # the band is then just causal
        if mask is None and band_reaches_all and q_len == k_len:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        elif mask is None and band_reaches_all and q_len == 1:  # one new query: every key is in its past
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:
            if mask is None:
                mask = band_mask(q_len, k_len, self.window or k_len, q.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        B, _, T, _ = q.shape
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.c_proj(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(*self.split_heads(x))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.ffn_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.ffn_dim, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.pre_norm = config.norm == "pre"
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, attention=None) -> torch.Tensor:
        """`attention(attn_module, normed_x)` replaces plain self-attention (the KV-cache path uses it)."""
        attend = attention or (lambda attn, h: attn(h))
        if self.pre_norm:
            x = x + attend(self.attn, self.ln_1(x))
            return x + self.mlp(self.ln_2(x))
        x = self.ln_1(x + attend(self.attn, x))
        return self.ln_2(x + self.mlp(x))


class GPT(nn.Module):
    """GPT-2 (and GPT-3 with `attention="alternating"`): token + learned position embeddings, a stack of
    blocks, a final LayerNorm (pre-LN only) and an output head tied to the token embedding."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            # Post-LN blocks already end in a LayerNorm (as GPT-1): no final one.
            ln_f=(nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
                  if config.norm == "pre" else nn.Identity()),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)

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
            if module is self.transformer.wte:
                with torch.no_grad():  # rows past the real vocabulary exist only for speed
                    module.weight[self.config.vocab_size:].zero_()
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

    def embed(self, idx: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if position_ids is None:
            T = idx.size(1)
            if T > self.config.block_size:
                raise ValueError(f"sequence length {T} exceeds the model's context {self.config.block_size}")
            position_ids = torch.arange(T, device=idx.device)
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(position_ids))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and output projection onto the real vocabulary only, so padded ids are never sampled
        or scored. Slicing the weight's first rows (contiguous) rather than the logits (strided) avoids a
        copy of the logits forward and a zero-filled padded gradient backward."""
        return F.linear(self.transformer.ln_f(x), self.lm_head.weight[: self.config.vocab_size])

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                ignore_index: int = IGNORE_INDEX, *,
                return_logits: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, vocab_size) and, given targets, the mean cross-entropy over targets that are not
        `ignore_index` (fine-tuning masks prompt tokens that way).

        `return_logits=False` (training) returns (None, loss) and never builds the full logits: the output
        projection and the loss run in row chunks (`gptforge.fused_loss`), with the gradients computed in
        the same pass when autograd needs them. Same loss; far less memory and copying at GPT-2's vocabulary.
        """
        x = self.embed(idx)
        for block in self.transformer.h:
            x = block(x)
        if not return_logits:
            if targets is None:
                raise ValueError("return_logits=False needs targets: the loss is all it returns")
            h = self.transformer.ln_f(x)
            return None, linear_cross_entropy(h.reshape(-1, h.size(-1)), self.lm_head.weight,
                                              targets.reshape(-1), self.config.vocab_size, ignore_index)
        logits = self.head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=ignore_index)
        return logits, loss
