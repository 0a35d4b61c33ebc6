"""Weight-only quantization for generation on a CPU: linear weights stored as int8 or int4, products by
torch's own weight-only kernels (`torch.ops.aten._weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`).

Decoding one token reads every weight once, so its speed is bounded by the bytes read: int8 halves bf16's,
int4 quarters it. Layer norms, attention, the KV cache and the token embedding lookup stay in the model's
own dtype (exact); only nn.Linear products change, the tied output head through a quantized copy of the
embedding matrix (the lookup keeps reading the exact one).

Formats (what `dequantize_*` computes, exactly what the kernels read):
  int8  W[n, k] = q[n, k] * scale[n]               symmetric, one scale per output row, q in -127..127
  int4  W[n, k] = (q[n, k] - 8) * scale[n, g] + zero[n, g]   per group g of INT4_GROUP inputs of row n,
        q in 0..15; zero = min + 8 * scale, so the group's min..max maps onto the 16 levels
Scales and zeros are stored in bfloat16, the kernels' activation dtype, and the integers are computed from
the bf16-rounded scales, so dequantize(quantize(W)) is what the product multiplies by. Activations are cast
to bf16 for the product (the kernels have no fast fp32 path: 7-15x slower measured) and the result back to
the input's dtype, with the bias added in that dtype.

Measured (benchmarks/quantized_decode.py has the commands; 2-core AMD EPYC, AVX2, shared and loaded):
the int8 kernel with bf16 activations is the fastest int8 candidate at batch 1 and 16; dequantizing int8
blocks of 512 rows into an fp32 or bf16 matmul is 1.5-3x slower at batch 1 (faster only for the fp32 case
at batch 16 on some shapes). int4 groups of 32 and 128 run within noise of each other, so groups of 32
(better fidelity) are kept. Both kernels give a row the same bits whatever else is in the batch (checked
for 1..16 rows): a quantized model keeps the batch-invariance rule.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

QUANTIZE_CHOICES = ("int8", "int4")
#: what a QuantizedLinear of each kind holds (besides the model's own parameters): see quantized_layout
QUANTIZED_BUFFERS = {"int8": ("qweight", "scale"), "int4": ("qweight", "scale_zero")}
INT4_GROUP = 32  # inputs sharing one int4 scale and zero; the kernel takes 32, 64, 128 or 256
INT4_ROWS = 16  # the int4 packer needs the output rows in multiples of this (zero rows pad the rest)
# The int8 kernel's vectorized loop reads the inputs 16 at a time: on an AVX-512 CPU (Zen 4) an input width
# that is not a multiple of 16 gave garbage (40 x 72) or a segmentation fault (15 x 40). Zero inputs pad it.
INT8_INPUTS = 16
COMPUTE_DTYPE = torch.bfloat16
QUANTIZE_ROWS = 1024  # rows quantized at a time (see _row_blocks)
INT4_PACK_ROWS = 256  # int4 blocks are a multiple of this: of every row block the packer packs on its own


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> q (N, K) int8 in -127..127, scale (N,) bf16: the row's largest |w| maps to 127."""
    q = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(weight.shape[0], dtype=COMPUTE_DTYPE)
    scratch = None
    for rows, w in _row_blocks(weight):
        if scratch is None:  # the first block is the largest
            scratch = torch.empty(w.numel(), dtype=torch.float32)
        w, x = _in_fp32(w, scratch)
        # max(max, -min) is the largest |w| exactly (negation is exact), and reads w without a |w| temporary
        largest = torch.maximum(w.amax(dim=1), w.amin(dim=1).neg_())
        block_scale = (largest / 127).clamp(min=1e-12).to(COMPUTE_DTYPE)
        scale[rows] = block_scale
        q[rows] = torch.div(w, block_scale.float()[:, None], out=x).round_().clamp_(-127, 127)
    return q, scale


def _row_blocks(weight: torch.Tensor, rows: int | None = None,
                multiple: int = 1) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows, block): the weight QUANTIZE_ROWS rows at a time (rounded up to a multiple of `multiple`), views
    of it, zero rows appended up to `rows` when that is more than it has (int4's padding, without copying the
    rest). Every step is per row, so the result is the same as in one go, and each block's temporaries stay in
    the CPU's cache instead of each being a fresh whole-matrix allocation (GPT-2's 50,257-row head, int8:
    0.25 -> 0.07 s for 2048-row blocks instead of one, on the 2-core Zen 4); of 256 to 4096 rows, 1024 was the
    best or within noise of it for GPT-2 on 1 and 2 threads. Start-up is what waits."""
    weight = weight.detach()
    n = weight.shape[0]
    rows = n if rows is None else rows
    step = -(-QUANTIZE_ROWS // multiple) * multiple
    for start in range(0, rows, step):
        end = min(start + step, rows)
        block = weight[start:end]
        if end > n:
            block = F.pad(block, (0, 0, 0, end - max(start, n)))
        yield slice(start, end), block


def _in_fp32(block: torch.Tensor, scratch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(block in fp32, x): x a view of the flat fp32 `scratch` (reused by every block) shaped like `block`,
    for the quantizer's steps to write. An fp32 block is read where it is, the first step writing x out of
    place (one pass less than copying it first; the weight is left alone); another dtype is converted into x
    and the steps work in place (an op mixing bf16 and fp32 operands takes a slower, casting path)."""
    x = scratch[: block.numel()].view(block.shape)
    return (block if block.dtype == torch.float32 else x.copy_(block)), x


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fp32 weight an int8 product multiplies by."""
    return q.float() * scale.float()[:, None]


def quantize_int4(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float with K a multiple of `group` -> q (N, K) int32 in 0..15, scale and zero (N, K / group) bf16."""
    n, k = weight.shape
    q = torch.empty(n, k, dtype=torch.int32)
    scale = torch.empty(n, k // group, dtype=COMPUTE_DTYPE)
    zero = torch.empty(n, k // group, dtype=COMPUTE_DTYPE)
    for rows, _, block_scale, block_zero in _int4_blocks(weight, group, q=q):
        scale[rows], zero[rows] = block_scale, block_zero
    return q, scale, zero


def _int4_blocks(weight: torch.Tensor, group: int, rows: int | None = None, q: torch.Tensor | None = None,
                 multiple: int = 1) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """quantize_int4 a block of rows at a time (_row_blocks(weight, rows, multiple)): (rows, levels, scale, zero)
    for each, the levels written into q[rows], or without q into one int32 buffer reused by every block (read
    each before the next)."""
    n, k = weight.shape
    if k % group:
        raise ValueError(f"int4 groups of {group} need the input width to be a multiple of it, got {k}")
    scratch = buffer = None
    for block_rows, w in _row_blocks(weight, rows, multiple):
        if scratch is None:  # the first block is the largest
            scratch = torch.empty(w.numel(), dtype=torch.float32)
        m = w.shape[0]
        w, x = _in_fp32(w.reshape(m, k // group, group), scratch)  # (a view unless the weight's rows are strided)
        low, high = w.amin(dim=-1), w.amax(dim=-1)
        block_scale = ((high - low) / 15).clamp(min=1e-12).to(COMPUTE_DTYPE)
        block_zero = (low + 8 * block_scale.float()).to(COMPUTE_DTYPE)
        torch.sub(w, block_zero.float()[..., None], out=x)  # (w may be x: then in place)
        x.div_(block_scale.float()[..., None]).round_().add_(8).clamp_(0, 15)
        if q is None:
            buffer = torch.empty(m, k, dtype=torch.int32) if buffer is None or len(buffer) < m else buffer
            levels = buffer[:m]
        else:
            levels = q[block_rows]
        yield block_rows, levels.copy_(x.view(m, k)), block_scale, block_zero


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The fp32 weight an int4 product multiplies by."""
    group = q.shape[1] // scale.shape[1]
    return (q.float() - 8) * scale.float().repeat_interleave(group, 1) + zero.float().repeat_interleave(group, 1)


class QuantizedLinear(nn.Linear):
    """`linear`'s product with its weight quantized (`kind`: int8 or int4; `rows`: only the first `rows`
    output rows, an OutputHead's real vocabulary). Its parameters stay as they were (state_dict, ties and
    saving are unchanged; the tied embedding lookup stays exact); the quantized copy is a snapshot taken
    here, so quantize after loading the weights. Inference only: the product has no gradient."""

    def __init__(self, linear: nn.Linear, kind: str, rows: int | None = None,
                 stored: dict[str, torch.Tensor] | None = None) -> None:
        """`stored`: the quantized buffers an earlier QuantizedLinear of the same weight had (its
        `quantized_buffers()`, e.g. read back from disk), used instead of quantizing again; a ValueError if
        they do not have the shapes and dtypes this layer needs."""
        nn.Module.__init__(self)
        if kind not in QUANTIZE_CHOICES:
            raise ValueError(f"quantize: {kind!r} is not one of {', '.join(QUANTIZE_CHOICES)}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameter objects
        self.kind = kind
        self.rows = linear.out_features if rows is None else rows
        # zero inputs up to the multiple the kernel needs (the activations get the same zero columns in
        # forward), and for int4 zero rows up to a multiple of INT4_ROWS: any layer width quantizes
        self.pad_in = -self.in_features % (INT8_INPUTS if kind == "int8" else INT4_GROUP)
        pad_rows = 0 if kind == "int8" else -self.rows % INT4_ROWS
        if stored is not None:
            layout = quantized_layout(kind, self.rows + pad_rows, self.in_features + self.pad_in)
            found = {name: (tuple(t.shape), t.dtype) for name, t in stored.items()}
            if found != layout:
                raise ValueError(f"quantize: stored {kind} buffers {found} do not fit this layer ({layout})")
            for name, tensor in stored.items():
                self.register_buffer(name, tensor, persistent=False)
            return
        # the weight as it is where no padding is needed: F.pad would copy it whole, and the quantizers
        # already read it in blocks converted to fp32 (GPT-2's head: a 154 MB copy, 65 ms of start-up);
        # int4's zero rows are appended to the last block only
        weight = self.weight.detach()[: self.rows]
        if self.pad_in:
            weight = F.pad(weight, (0, self.pad_in))
        if kind == "int8":
            q, scale = quantize_int8(weight)
            self.register_buffer("qweight", q, persistent=False)
            self.register_buffer("scale", scale, persistent=False)
            return
        # packed a block of rows at a time: the packer packs every 64 rows (32 on AVX2) on their own, into
        # their own bytes, so blocks of INT4_PACK_ROWS give the bytes of the whole matrix packed at once,
        # without a whole-matrix int32 copy of the levels (GPT-2's head: 154 MB)
        n, k = self.rows + pad_rows, weight.shape[1]
        packed = torch.empty(n, k // 2, dtype=torch.uint8)
        scale_zero = torch.empty(k // INT4_GROUP, n, 2, dtype=COMPUTE_DTYPE)  # (K / group, N, 2)
        for rows, q, scale, zero in _int4_blocks(weight, INT4_GROUP, n, multiple=INT4_PACK_ROWS):
            packed[rows] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            scale_zero[:, rows, 0], scale_zero[:, rows, 1] = scale.t(), zero.t()
        self.register_buffer("qweight", packed, persistent=False)
        self.register_buffer("scale_zero", scale_zero, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1]).to(COMPUTE_DTYPE)
        if self.pad_in:
            h = F.pad(h, (0, self.pad_in))
        if self.kind == "int8":
            y = torch.ops.aten._weight_int8pack_mm(h, self.qweight, self.scale)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(h, self.qweight, INT4_GROUP, self.scale_zero)
            y = y[:, : self.rows]
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias[: self.rows].to(x.dtype)
        return y.reshape(*shape[:-1], self.rows)

    def quantized_buffers(self) -> dict[str, torch.Tensor]:
        """What the product reads besides the activations (and the bias): `stored` for another QuantizedLinear
        of the same weight."""
        return {name: getattr(self, name) for name in QUANTIZED_BUFFERS[self.kind]}

    def dequantized_weight(self) -> torch.Tensor:
        """The (rows, in) fp32 weight this product multiplies by (for tests and error reports)."""
        if self.kind == "int8":
            return dequantize_int8(self.qweight, self.scale)[:, : self.in_features]
        n_pad = self.qweight.shape[0]
        k_pad = self.in_features + self.pad_in
        q = unpack_int4(self.qweight, n_pad, k_pad)
        scale, zero = self.scale_zero[..., 0].t(), self.scale_zero[..., 1].t()
        return dequantize_int4(q, scale, zero)[: self.rows, : self.in_features]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.rows}, kind={self.kind}"


def quantized_layout(kind: str, n: int, k: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The buffers a QuantizedLinear of `kind` holds for an (n, k) weight, padding included: name -> (shape,
    dtype)."""
    if kind == "int8":
        shapes = [((n, k), torch.int8), ((n,), COMPUTE_DTYPE)]
    else:
        shapes = [((n, k // 2), torch.uint8), ((k // INT4_GROUP, n, 2), COMPUTE_DTYPE)]
    return dict(zip(QUANTIZED_BUFFERS[kind], shapes))


def unpack_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The (n, k) int32 levels back from the CPU kernel's packed layout, read through the kernel itself:
    multiplying by identity rows with scale 1 and zero 8 returns q exactly (levels are small integers)."""
    eye = torch.eye(k, dtype=COMPUTE_DTYPE)
    ones = torch.ones(k // INT4_GROUP, n, 1, dtype=COMPUTE_DTYPE)
    scale_zero = torch.cat([ones, ones * 8], dim=-1)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed, INT4_GROUP, scale_zero).t().round().int()


def quantize_model(model: nn.Module, kind: str, stored: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Swap every CPU nn.Linear of `model` (the tied output head included, on its real vocabulary) for a
    QuantizedLinear of `kind`, in place; already quantized ones are left alone. `stored`: every layer's
    quantized buffers as `quantized_state` gave them for the same weights, used instead of quantizing (a
    KeyError or ValueError, before any layer is swapped, if they do not fit). Returns `model`."""
    if kind not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize: {kind!r} is not one of {', '.join(QUANTIZE_CHOICES)}")
    todo = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or isinstance(module, QuantizedLinear):
            continue
        if module.weight.device.type != "cpu":
            raise ValueError(f"quantize: {name} is on {module.weight.device}; weight-only int8/int4 runs on CPU")
        # an OutputHead projects onto its real vocabulary (a PrepackedLinear of one knows it as `rows`)
        todo.append((name, module, getattr(module, "rows", getattr(module, "vocab_size", None))))
    if stored is not None:
        names = QUANTIZED_BUFFERS[kind]
        unused = set(stored) - {f"{name}.{buffer}" for name, *_ in todo for buffer in names}
        if unused:
            raise KeyError(f"quantize: stored buffers of no layer to quantize: {sorted(unused)[:3]}")
        # every layer is built before any is swapped: a misfit leaves the model as it was
        built = [QuantizedLinear(module, kind, rows, {b: stored[f"{name}.{b}"] for b in names})
                 for name, module, rows in todo]
    else:
        built = [QuantizedLinear(module, kind, rows) for _, module, rows in todo]
    for (name, *_), quantized in zip(todo, built):
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, quantized)
    return model


def quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every QuantizedLinear's buffers by `<module name>.<buffer>`: what quantize_model takes as `stored`."""
    return {f"{name}.{buffer}": tensor for name, module in model.named_modules()
            if isinstance(module, QuantizedLinear) for buffer, tensor in module.quantized_buffers().items()}
