"""Size a model before building it: parameters, FLOPs per token, and memory for training and inference.

Everything is computed from the config alone (no weights allocated), so `gptforge info --preset gpt3-175b`
answers instantly. The formulas are written out below so a user can check them by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig, TrainConfig
from .fused_loss import chunk_rows
from .units import human_bytes, human_count

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def parameter_counts(config: ModelConfig) -> dict[str, int]:
    """Parameters with the tied head counted once and vocabulary padding excluded (GPT-2 124M: 124,439,808)."""
    d, f, b = config.n_embd, config.ffn_dim, int(config.bias)
    qkv_b = int(config.bias and config.qkv_bias)
    layer_norm = d * (1 + b)
    per_layer = (2 * layer_norm
                 + 3 * d * d + 3 * d * qkv_b  # c_attn
                 + d * d + d * b              # attn.c_proj
                 + d * f + f * b              # mlp.c_fc
                 + f * d + d * b)             # mlp.c_proj
    token_embedding = config.vocab_size * d
    position_embedding = config.block_size * d
    final_norm = layer_norm if config.norm == "pre" else 0
    total = token_embedding + position_embedding + config.n_layer * per_layer + final_norm
    return {"total": total, "non_embedding": total - token_embedding - position_embedding,
            "per_layer": per_layer, "token_embedding": token_embedding,
            "position_embedding": position_embedding}


def optimizer_groups(config: ModelConfig, train: TrainConfig) -> list[dict]:
    """Which optimizer trains which parameters (as gptforge.training.optim builds them), from the configs alone.

    adamw: every parameter, weight decay on the matrices and embeddings, none on biases and norms. muon: the
    blocks' matrices (c_attn, attn c_proj, c_fc, mlp c_proj) to torch's Muon, the rest to that AdamW."""
    counts = parameter_counts(config)
    d, f = config.n_embd, config.ffn_dim
    block_matrices = config.n_layer * (4 * d * d + 2 * d * f)
    embeddings = counts["token_embedding"] + counts["position_embedding"]
    rest = counts["total"] - embeddings - block_matrices  # biases and LayerNorms
    adamw = dict(optimizer="adamw", lr=train.lr, betas=[train.beta1, train.beta2], eps=train.eps)
    if train.optimizer == "adamw":
        return [dict(adamw, params="embeddings (tied head) and block matrices", parameters=embeddings + block_matrices,
                     weight_decay=train.weight_decay),
                dict(adamw, params="biases and LayerNorms", parameters=rest, weight_decay=0.0)]
    return [dict(optimizer="muon", params=f"block matrices ({4 * config.n_layer} tensors)", parameters=block_matrices,
                 lr=train.muon_lr, momentum=train.muon_momentum, nesterov=train.muon_nesterov,
                 ns_steps=train.muon_ns_steps, weight_decay=train.muon_weight_decay),
            dict(adamw, params="embeddings (tied head)", parameters=embeddings, weight_decay=train.weight_decay),
            dict(adamw, params="biases and LayerNorms", parameters=rest, weight_decay=0.0)]


def format_group(g: dict) -> str:
    """One `optimizer_groups` entry in a line: "muon   lr 0.02, momentum 0.95 ...: block matrices (..)"."""
    settings = (f"lr {g['lr']:g}, momentum {g['momentum']:g}{' (Nesterov)' if g['nesterov'] else ''}, "
                f"{g['ns_steps']} Newton-Schulz steps" if g["optimizer"] == "muon"
                else f"lr {g['lr']:g}, betas {g['betas'][0]:g}/{g['betas'][1]:g}")
    return (f"{g['optimizer']:<6} {settings}, weight decay {g['weight_decay']:g}: {g['params']} "
            f"({human_count(g['parameters'])})")


def mean_attended_keys(seq_len: int, window: int | None) -> float:
    """Average number of keys a query attends to over positions 0..seq_len-1 (causal, optionally banded)."""
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    # positions t < window see t+1 keys; the rest see `window`
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def flops_per_token(config: ModelConfig, seq_len: int | None = None) -> dict[str, float]:
    """Matmul FLOPs per token: forward = 2·N_matmul + 4·d·(attended keys) per layer; training = 3× forward.

    N_matmul counts the weights used in matrix products (all linears and the output head, not biases,
    norms or the position table). Attention counts QKᵀ and AV for the keys causal (and banded) attention
    actually needs, averaged over the sequence, as flash-style kernels compute.
    """
    seq_len = seq_len or config.block_size
    d, f = config.n_embd, config.ffn_dim
    n_matmul = config.n_layer * (4 * d * d + 2 * d * f) + config.vocab_size * d
    attention = sum(4 * d * mean_attended_keys(seq_len, config.window if config.is_band_layer(i) else None)
                    for i in range(config.n_layer))
    forward = 2 * n_matmul + attention
    return {"n_matmul": n_matmul, "forward": forward, "train": 3 * forward,
            "attention_share": attention / forward}


@dataclass
class MemoryEstimate:
    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def output_head_bytes(config: ModelConfig, tokens: int, dtype: str) -> int:
    """Memory of training's fused output projection + loss (`gptforge.fused_loss`), which never holds the
    full tokens×vocab logits: one chunk of logits (in `dtype`, an fp32 copy when `dtype` is narrower, and
    its fp32 log-softmax), the fp32 gradient of the hidden states (tokens×h) and of the head weight
    (V×h, plus a `dtype` partial when narrower than fp32), kept from the forward for the backward."""
    vocab, h, width = config.padded_vocab_size, config.n_embd, BYTES[dtype]
    narrow = width < 4
    rows = min(tokens, chunk_rows(tokens, config.vocab_size))
    chunk = rows * vocab * (width + (4 if narrow else 0) + 4)
    return chunk + 4 * tokens * h + 4 * vocab * h + (width * vocab * h if narrow else 0)


def activation_bytes(config: ModelConfig, micro_batch: int, seq_len: int, dtype: str,
                     flash_attention: bool = True) -> int:
    """Activations kept for the backward pass (Korthikanti et al. 2022, generalised to any d_ff).

    Per layer, in elements of `dtype`: attention 5.5·s·b·h (+2.5·a·s²·b score terms without flash attention),
    the two LayerNorm inputs 2·s·b·h, the MLP 1.5·s·b·h + 2·s·b·f; plus the output head as training runs it
    (`output_head_bytes`). With d_ff = 4h this is the paper's 34·s·b·h bytes at 16 bits.
    """
    s, b, h, f, a = seq_len, micro_batch, config.n_embd, config.ffn_dim, config.n_head
    width = BYTES[dtype]
    per_layer = width * (5.5 * s * b * h + 2 * s * b * h + 1.5 * s * b * h + 2 * s * b * f)
    if not flash_attention:
        per_layer += width * 2.5 * a * s * s * b
    logits = output_head_bytes(config, s * b, dtype)
    embeddings = 2 * width * s * b * h
    return int(config.n_layer * per_layer + logits + embeddings)


def training_memory(config: ModelConfig, micro_batch: int, seq_len: int | None = None,
                    dtype: str = "bf16") -> MemoryEstimate:
    """One process holding the whole model: fp32 master weights, fp32 grads, AdamW's two fp32 moments,
    the autocast copies of matmul weights (bf16), and activations at `micro_batch`."""
    seq_len = seq_len or config.block_size
    params = parameter_counts(config)["total"] + (config.padded_vocab_size - config.vocab_size) * config.n_embd
    parts = {"weights (fp32)": 4 * params, "gradients (fp32)": 4 * params, "AdamW state (fp32 m, v)": 8 * params}
    if dtype != "fp32":
        parts[f"autocast weight copies ({dtype})"] = BYTES[dtype] * flops_per_token(config, seq_len)["n_matmul"]
    parts[f"activations (micro-batch {micro_batch} x {seq_len})"] = activation_bytes(
        config, micro_batch, seq_len, dtype)
    return MemoryEstimate(parts)


def kv_cache_bytes(config: ModelConfig, batch: int, seq_len: int, dtype: str) -> int:
    """Keys and values for every layer; a band layer keeps only its last `window` positions."""
    total = 0
    for i in range(config.n_layer):
        kept = min(seq_len, config.window) if config.is_band_layer(i) else seq_len
        total += 2 * batch * kept * config.n_embd * BYTES[dtype]
    return total


def inference_memory(config: ModelConfig, batch: int = 1, seq_len: int | None = None,
                     dtype: str = "bf16") -> MemoryEstimate:
    seq_len = seq_len or config.block_size
    params = parameter_counts(config)["total"]
    return MemoryEstimate({f"weights ({dtype})": BYTES[dtype] * params,
                           f"KV cache (batch {batch} x {seq_len})": kv_cache_bytes(config, batch, seq_len, dtype)})


def describe_shape(config: ModelConfig) -> str:
    """The model's shape in one line (what `info` prints for presets, configs and runs alike)."""
    attention = ("dense" if config.attention == "dense"
                 else f"alternating dense / band (window {config.window})")
    return (f"{config.n_layer} layers, d_model {config.n_embd}, {config.n_head} heads x {config.head_dim}, "
            f"d_ff {config.ffn_dim}, context {config.block_size}, vocab {config.vocab_size} "
            f"(padded to {config.padded_vocab_size}), {config.norm}-LN, attention {attention}")


def format_report(config: ModelConfig, name: str, micro_batch: int, seq_len: int | None,
                  dtype: str, inference_batch: int, train: TrainConfig | None = None) -> str:
    seq_len = seq_len or config.block_size
    counts = parameter_counts(config)
    flops = flops_per_token(config, seq_len)
    lines = [
        f"{name}: {describe_shape(config)}",
        "",
        f"parameters             {counts['total']:>18,}  ({human_count(counts['total'])})",
        f"  without embeddings   {counts['non_embedding']:>18,}  ({human_count(counts['non_embedding'])})",
        f"FLOPs per token (T={seq_len})",
        f"  forward              {flops['forward']:>18,.0f}  ({human_count(flops['forward'])})",
        f"  training (3x fwd)    {flops['train']:>18,.0f}  ({human_count(flops['train'])}; "
        f"attention {100 * flops['attention_share']:.1f}%)",
    ]
    for title, estimate in (
            (f"training memory, one device, {dtype} autocast", training_memory(config, micro_batch, seq_len, dtype)),
            (f"inference memory, {dtype}", inference_memory(config, inference_batch, seq_len, dtype))):
        lines.append("")
        lines.append(f"{title}: {human_bytes(estimate.total)}")
        lines.extend(f"  {part:<40} {human_bytes(size):>12}" for part, size in estimate.parts.items())
    if train is not None:
        lines += ["", f"training optimizer: train.optimizer = {train.optimizer}"]
        lines.extend(f"  {format_group(g)}" for g in optimizer_groups(config, train))
    return "\n".join(lines)
