"""Weight layout for decoding: the same values, stored the way a decode step's matrix products read fastest.

A decode step multiplies a few vectors (one per row of the batch) by every weight matrix, so its speed is how
fast the weights stream from memory and how well the kernel uses them at such a small batch. On x86 CPUs,
oneDNN's linear with the weight reordered once into its own blocked layout (what torch.compile's CPU
"freezing" does; `torch.ops.mkldnn`) beats torch's default `F.linear` at these shapes. Measured on this
project's 2-core AMD EPYC (Zen 4, AVX-512 BF16), ms a product, median of 20 (`x @ W^T`, x (M, in)):

    weight, dtype              M   F.linear   oneDNN prepacked
    50,257 x 256 fp32 (head)  16     13.7          3.2
    50,257 x 768 bf16 (head)   1      8.1          3.6
     3,072 x 768 bf16          1      0.17         0.07

and whole models: dev-17m fp32 at 16 rows 829 -> 1,412 tokens/s, gpt2 bf16 at batch 1 25.5 -> 43.8 tokens/s.
On a 2-core Intel Xeon (AMX), whose MKL streams fp32 weights well, fp32 at one row is the exception: gpt2's
49 products take 18.6 ms a token with F.linear against 21.0 prepacked (whole model 44.4 vs 39.8 tokens/s),
while at 16 rows prepacked wins there too (32.4 vs 47.2 ms) and bf16 wins at both (11.7 vs 18.0 ms at one
row). The prepacked product is kept at every batch size all the same, for what follows.
The prepacked product also gives each row the same result whatever else is in the batch, which torch's fp32
`F.linear` does not (it switches kernels with the batch size): a served row's tokens do not depend on its
neighbours.

The reordered copy is made once and kept beside the parameter (which stays, unchanged, for state_dict,
saving and the tied input embedding), so a prepared model holds its linear weights twice. Where oneDNN is
missing or the CPU is not x86, fp32 weights are instead re-laid column-major in place, no copy: torch's fp32
`x @ W^T` runs about twice as fast at batch 1 with W^T contiguous (GPT-2's head: 42 vs 23 ms a product).
"""

from __future__ import annotations

import functools
import os
import platform
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import GPT
from .compiled import attach_compiled_decoder
from .quantize import QuantizedLinear
from .quantized_cache import quantize_cached

# The batch size oneDNN blocks a reordered weight for: fp32 layouts blocked for 16 rows are as fast at one row
# and 1.2-1.6x faster at 16 (GPT-2's blocks and head, dev-17m's head); bf16 ones are fastest blocked for one row.
PACK_BATCH = {torch.float32: 16, torch.bfloat16: 1}


class PrepackedLinear(nn.Linear):
    """`linear` (its own parameters: state_dict, ties and saving are unchanged) with the product computed by
    oneDNN from a copy of the weight reordered once. `rows`: only the first `rows` output rows (an OutputHead's
    real vocabulary). The copy is a snapshot: prepare after loading the weights. With autograd recording (a
    caller training or taking gradients) it computes the plain product, so gradients reach the parameters."""

    def __init__(self, linear: nn.Linear, rows: int | None = None, packed: torch.Tensor | None = None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameter objects
        self.rows = linear.out_features if rows is None else rows
        self.packed = reorder(linear, self.rows) if packed is None else packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        recording = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if recording or torch.compiler.is_compiling():
            # the plain product: gradients reach the parameters, and torch.compile (whose freezing lays out
            # the weight itself) sees an op it can trace instead of an opaque oneDNN tensor
            return F.linear(x, self.weight[: self.rows], self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def reorder(linear: nn.Linear, rows: int) -> torch.Tensor:
    """oneDNN's reordered copy of `linear`'s first `rows` output rows (what PrepackedLinear multiplies by)."""
    weight = linear.weight.detach()[:rows].contiguous()
    return torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH[weight.dtype])


def prepare_for_decoding(model: GPT, quantize: str | None = None, compile: bool = False,
                         weights_file: str | os.PathLike | None = None) -> GPT:
    """Make `model`'s CPU linear layers (the tied output head included) compute faster at decoding's small
    batches, in place: every parameter, name and shape stays as it was, and outputs agree to float rounding.
    `quantize` "int8" or "int4": their products use quantized copies of the weights instead (CPU only;
    gptforge.generation.quantize says how, and what it costs in fidelity). `weights_file`: the file the
    model was loaded from, unchanged since; the quantized copy is then kept on disk for the next run of the
    same file (gptforge.generation.quantized_cache). `compile`: decode steps run as one step compiled by
    torch.compile (CPU only, tens of seconds to compile on first use, 1.6-2.8x the tokens/s;
    gptforge.generation.compiled). For inference: prepare after loading, and do not train a prepared model.
    Returns `model`."""
    if quantize is not None:
        quantize_cached(model, quantize, weights_file)
    else:
        _prepack(model)
    if compile:
        attach_compiled_decoder(model)
    return model


def _prepack(model: GPT) -> None:
    """prepare_for_decoding without quantization: each linear as a PrepackedLinear where oneDNN works."""
    to_pack: list[tuple[str, nn.Linear, int]] = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or isinstance(module, (PrepackedLinear, QuantizedLinear)):
            continue
        w = module.weight
        if w.device.type != "cpu" or w.dtype not in PACK_BATCH:
            continue
        if _onednn_works(w.dtype):
            rows = getattr(module, "vocab_size", None)  # an OutputHead projects onto its real vocabulary
            to_pack.append((name, module, module.out_features if rows is None else rows))
        elif w.dtype == torch.float32 and w.is_contiguous():
            with torch.no_grad():
                w.data = w.data.t().contiguous().t()  # (in, out) storage seen as (out, in); wte is the head
    # A reorder runs on one core (it is most of `sample`'s start-up: ~1 s of CPU for GPT-2 124M fp32 on a
    # 2-core AVX2 EPYC), and it releases the GIL: one per core at a time instead of one after another.
    with ThreadPoolExecutor(max(1, min(torch.get_num_threads(), len(to_pack)))) as pool:
        packed = list(pool.map(lambda item: reorder(item[1], item[2]), to_pack))
    for (name, module, rows), pack in zip(to_pack, packed):
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, PrepackedLinear(module, rows, pack))


@functools.cache
def _onednn_works(dtype: torch.dtype) -> bool:
    """Whether this torch and CPU run oneDNN's prepacked linear for `dtype` (x86 only: measured there), and it
    agrees with F.linear on a small product."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False  # without native bf16 instructions oneDNN emulates them
    try:
        generator = torch.Generator().manual_seed(0)
        w = torch.randn(24, 16, generator=generator).to(dtype)
        x = torch.randn(3, 16, generator=generator).to(dtype)
        b = torch.randn(24, generator=generator).to(dtype)
        got = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, 1), b, "none", [], "")
        return torch.allclose(got.float(), F.linear(x, w, b).float(), atol=0.05, rtol=0.02)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
