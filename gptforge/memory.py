"""Per-GPU training memory under data parallelism: DDP (full replicas) versus FSDP2 (everything sharded).

Why a separate function from `gptforge.info.training_memory`: the answer to "how many GPUs do I need for
gpt3-2.7b?" depends on how the model is spread. DDP keeps a whole copy of weights, gradients and AdamW
state on every GPU, so adding GPUs never lowers per-GPU memory; FSDP2 divides those 16 bytes per parameter
by the number of GPUs, at the price of holding a few gathered blocks at a time. Activations are per GPU in
both cases (each GPU runs its own micro-batch). The building blocks (parameter counts, activation bytes)
come from `gptforge.info`, so both answers use one set of formulas.
"""

from __future__ import annotations

from typing import Literal

from .config import ModelConfig
from .errors import UserError
from .info import BYTES, activation_bytes, flops_per_token, parameter_counts
from .units import human_bytes

Parallel = Literal["ddp", "fsdp"]


def _allocated_params(config: ModelConfig) -> int:
    """Parameters as allocated: the tied head once, plus the vocabulary padding rows."""
    return parameter_counts(config)["total"] + (config.padded_vocab_size - config.vocab_size) * config.n_embd


def _checkpointed_activation_bytes(config: ModelConfig, micro_batch: int, seq_len: int, dtype: str) -> int:
    """Activations with per-block activation checkpointing: each block keeps only its input (s·b·h in the
    compute dtype); one block's full activations exist while it is recomputed in backward; the logits and
    embeddings are unchanged (they are outside the blocks)."""
    def with_layers(n: int) -> int:
        return activation_bytes(ModelConfig(**{**config.to_dict(), "n_layer": n}), micro_batch, seq_len, dtype)

    per_layer = with_layers(2) - with_layers(1)
    outside_blocks = with_layers(1) - per_layer  # logits and embeddings
    block_inputs = config.n_layer * BYTES[dtype] * seq_len * micro_batch * config.n_embd
    return int(outside_blocks + per_layer + block_inputs)


def per_gpu_memory(config: ModelConfig, world_size: int, micro_batch: int, seq_len: int | None = None,
                   parallel: Parallel = "fsdp", precision: str = "bf16",
                   activation_checkpointing: bool = False) -> dict:
    """Estimated peak bytes on each GPU for training `config` on `world_size` GPUs.

    P = allocated parameters (tied head once, padded vocabulary rows included), N = world_size,
    L = P_layer (parameters of one transformer block), R = P_root (token + position embeddings + final norm,
    the parameters FSDP2's root module owns), c = bytes of the compute dtype (2 for bf16, 4 for fp32).

    DDP (every GPU holds a replica; what `torch.nn.parallel.DistributedDataParallel` allocates by default):
      weights 4P + gradients 4P + AdamW m and v 8P + gradient buckets 4P (DDP copies gradients into flat
      communication buckets unless gradient_as_bucket_view) + bf16 autocast copies of the matmul weights
      c·N_matmul (bf16 only) + activations.
    FSDP2 (`fully_shard` per block, then the root; bf16 MixedPrecisionPolicy with fp32 gradient reduction):
      sharded weights 4P/N + sharded gradients 4P/N + sharded AdamW 8P/N
      + gathered weights in the compute dtype: c·(R + 2L) — the root stays gathered through forward and
        backward, and at any moment one block computes while the next one is prefetched
      + unsharded gradients of the block being reduce-scattered, in fp32, current and in flight: 2·4·L
      + activations.
    Activations (both): `gptforge.info.activation_bytes` at `micro_batch` x `seq_len` in the compute dtype
      (Korthikanti et al. 2022, flash attention; logits included); with activation checkpointing only each
      block's input (c·s·b·h per layer) plus one block's activations during recomputation.

    Not counted: the CUDA context and NCCL buffers (~0.5-1 GiB per GPU), allocator fragmentation, and
    temporary buffers of fused kernels; add ~10-20% headroom. Returns a dict with "parts" (name -> bytes),
    "total", "params", "world_size", "parallel", "micro_batch", "seq_len".
    """
    if world_size < 1:
        raise UserError(f"world size must be at least 1, got {world_size}")
    if micro_batch < 1:
        raise UserError(f"micro-batch must be at least 1, got {micro_batch}")
    if parallel not in ("ddp", "fsdp"):
        raise UserError(f"parallel must be 'ddp' or 'fsdp', got {parallel!r}")
    if precision not in ("bf16", "fp32"):
        raise UserError(f"precision must be 'bf16' or 'fp32', got {precision!r}")
    seq_len = seq_len or config.block_size
    if seq_len > config.block_size:
        raise UserError(f"seq_len {seq_len} exceeds the model's context {config.block_size}")
    P = _allocated_params(config)
    layer = parameter_counts(config)["per_layer"]
    root = P - config.n_layer * layer
    c = BYTES[precision]
    if activation_checkpointing:
        activations = _checkpointed_activation_bytes(config, micro_batch, seq_len, precision)
    else:
        activations = activation_bytes(config, micro_batch, seq_len, precision)
    act_name = f"activations (micro-batch {micro_batch} x {seq_len}" + (", checkpointed)" if activation_checkpointing else ")")
    if parallel == "ddp":
        parts = {"weights (fp32)": 4 * P, "gradients (fp32)": 4 * P, "AdamW state (fp32 m, v)": 8 * P,
                 "DDP gradient buckets (fp32)": 4 * P}
        if precision != "fp32":
            parts[f"autocast weight copies ({precision})"] = c * flops_per_token(config, seq_len)["n_matmul"]
    else:
        n = world_size
        parts = {f"weights (fp32, 1/{n} shard)": -(-4 * P // n), f"gradients (fp32, 1/{n} shard)": -(-4 * P // n),
                 f"AdamW state (fp32 m, v, 1/{n} shard)": -(-8 * P // n),
                 f"gathered weights ({precision}: root + 2 blocks)": c * (root + 2 * layer),
                 "unsharded block gradients (fp32, 2 blocks)": 2 * 4 * layer}
    parts[act_name] = activations
    parts = {k: int(v) for k, v in parts.items()}
    return {"parallel": parallel, "world_size": world_size, "micro_batch": micro_batch, "seq_len": seq_len,
            "precision": precision, "params": P, "parts": parts, "total": sum(parts.values())}


def format_distributed(config: ModelConfig, world_size: int, micro_batch: int, seq_len: int, dtype: str) -> str:
    """Per-GPU training memory under DDP and FSDP2, with and without activation checkpointing, so a user can
    pick a strategy before launching torchrun (formulas: `per_gpu_memory`)."""
    lines = [f"training memory per GPU, {world_size} GPUs, micro-batch {micro_batch} x {seq_len}, {dtype}:",
             f"  {'':<36} {'activations kept':>18} {'with act. checkpointing':>24}"]
    for parallel, label in (("ddp", "DDP (full replica)"), ("fsdp", "FSDP2 (sharded weights/grads/AdamW)")):
        plain, ckpt = (per_gpu_memory(config, world_size, micro_batch, seq_len, parallel, dtype, checkpointing)
                       ["total"] for checkpointing in (False, True))
        lines.append(f"  {label:<36} {human_bytes(plain):>18} {human_bytes(ckpt):>24}")
    lines.append("  (add ~10-20% for the CUDA context, communication buffers and fragmentation)")
    return "\n".join(lines)
