"""Weight layout for decoding: the same values, stored the way batch-1 matrix-vector products read fastest.

At batch 1 a decode step multiplies one vector by every weight matrix, so its speed is how fast the weights
stream from memory. On CPU, torch's fp32 `x @ W^T` with W stored (out, in) row-major (nn.Linear's layout)
runs at about half the speed of the same product with W^T contiguous: measured here for GPT-2's 50,257 x 768
output head, 42 vs 23 ms a product (1 thread, busy machine); for 50,257 x 128, 12 vs 4.6 ms. bf16 kernels
prefer the row-major form (31 vs 34 ms), so only fp32 is re-laid. Transformers' GPT-2 gets the fast form for
its blocks by accident (Conv1D stores (in, out)), not for its head.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..model import GPT


def prepare_for_decoding(model: GPT) -> GPT:
    """Store `model`'s fp32 CPU linear weights (the tied output head included) column-major, in place.

    Each (out, in) weight becomes a transposed view of contiguous (in, out) storage: every value, name and
    shape stays the same and nothing else changes, except that batch-1 decoding on CPU runs faster. For
    inference: saving and exporting make contiguous copies, but training code (FSDP sharding, fused
    optimizers) expects contiguous parameters, so do not train a model prepared this way. Returns `model`.
    """
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, nn.Linear):
                continue
            w = module.weight
            if w.device.type == "cpu" and w.dtype == torch.float32 and w.is_contiguous():
                w.data = w.data.t().contiguous().t()  # (in, out) storage seen as (out, in); wte is the head
    return model
