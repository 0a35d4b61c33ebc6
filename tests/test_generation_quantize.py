"""Weight-only int8/int4 for generation: the formats against values computed by hand, each kernel's product
against its own reference (dequantized weight times the bf16 input, in fp64), what prepare_for_decoding(model,
quantize=...) keeps exact, and fidelity on a small trained model (perplexity, greedy agreement)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import fixture_text

from gptforge.config import ModelConfig
from gptforge.generation import SamplingConfig, generate_ids, prepare_for_decoding
from gptforge.generation.quantize import (QuantizedLinear, dequantize_int4, dequantize_int8, quantize_int4,
                                          quantize_int8)
from gptforge.model import GPT

KINDS = ["int8", "int4"]


def test_int8_round_trip_by_hand():
    """Scales are the row's largest |w| / 127 (both rows' scales are powers of two, exact in bf16)."""
    w = torch.tensor([[1.984375, -0.5, 0.01],  # scale 1.984375 / 127 = 2^-6
                      [0.9921875, 0.3, -0.9921875]])  # scale 2^-7
    q, scale = quantize_int8(w)
    assert scale.dtype == torch.bfloat16 and scale.tolist() == [2**-6, 2**-7]
    # 0.01 / 2^-6 = 0.64 -> 1; -0.5 / 2^-6 = -32; 0.3 / 2^-7 = 38.4 -> 38
    assert q.dtype == torch.int8 and q.tolist() == [[127, -32, 1], [127, 38, -127]]
    assert dequantize_int8(q, scale).tolist() == [[1.984375, -0.5, 0.015625], [0.9921875, 0.296875, -0.9921875]]


def test_int4_round_trip_by_hand():
    """Per group: scale (max - min) / 15, zero = min + 8 scale, q = round((w - zero) / scale) + 8 in 0..15."""
    w = torch.tensor([[-1.5, 0.2, 0.5, 6.0, 1.0, 1.0, 1.0, 1.0]])
    q, scale, zero = quantize_int4(w, group=4)
    # group 1: scale 7.5 / 15 = 0.5, zero -1.5 + 4 = 2.5; (0.2 - 2.5) / 0.5 = -4.6 -> -5, + 8 = 3
    # group 2 (constant): scale ~0 (clamped), zero = 1.0, every q = 8
    assert q.tolist() == [[0, 3, 4, 15, 8, 8, 8, 8]]
    assert scale[0, 0].item() == 0.5 and zero.tolist() == [[2.5, 1.0]]
    assert dequantize_int4(q, scale, zero).tolist() == [[-1.5, 0.0, 0.5, 6.0, 1.0, 1.0, 1.0, 1.0]]
    with pytest.raises(ValueError, match="multiple"):
        quantize_int4(torch.ones(2, 6), group=4)


@pytest.mark.parametrize("kind", KINDS)
def test_quantizing_in_row_blocks_equals_one_block_and_leaves_the_weight_alone(kind, monkeypatch):
    """Start-up quantizes QUANTIZE_ROWS rows at a time, into a buffer reused by every block: the result equals
    the whole matrix in one block, for fp32 and bf16 weights, and the weight itself is not touched."""
    import gptforge.generation.quantize as quantize

    quantize_fn = quantize_int8 if kind == "int8" else quantize_int4
    torch.manual_seed(0)
    for weight in (torch.randn(37, 64) * 0.02, (torch.randn(37, 64) * 0.02).bfloat16()):
        original = weight.clone()
        monkeypatch.setattr(quantize, "QUANTIZE_ROWS", 1_000)
        whole = quantize_fn(weight)
        monkeypatch.setattr(quantize, "QUANTIZE_ROWS", 5)  # 8 blocks, the last of 2 rows
        blocks = quantize_fn(weight)
        assert all(torch.equal(a, b) for a, b in zip(whole, blocks))
        assert torch.equal(weight, original)


@pytest.mark.parametrize("kind", KINDS)
# (out, in); 50 x 40: int4 pads rows and inputs; 40 and 72 inputs: int8 pads to 16s (unpadded, torch's kernel
# crashed at 15 x 40 and gave garbage at 1 x 72 on an AVX-512 Zen 4)
@pytest.mark.parametrize("shape", [(48, 64), (50, 40), (48, 72)])
def test_quantized_linear_is_exact_to_its_own_reference(kind, shape):
    """The product equals dequantize(W) @ bf16(x) + b up to the bf16 rounding of the product's result, and the
    dequantized weight is within half a step of the original."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(shape[1], shape[0])
    module = QuantizedLinear(linear, kind)
    x = torch.randn(5, 3, shape[1])
    with torch.inference_mode():
        y = module(x)
    w = module.dequantized_weight()
    assert w.shape == linear.weight.shape and y.shape == (5, 3, shape[0]) and y.dtype == torch.float32
    product = x.bfloat16().double() @ w.double().t()
    assert ((y.double() - linear.bias.double()) - product).abs().max() <= 2**-8 * product.abs().max() + 1e-6
    step = w.abs().max() / 127 if kind == "int8" else (linear.weight.max() - linear.weight.min()) / 15
    assert (w - linear.weight).abs().max() <= step / 2 * 1.02  # bf16 scales: a hair over half a step


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_head_covers_the_real_vocabulary(kind):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=101, block_size=16, n_layer=1, n_head=2, n_embd=32)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepare_for_decoding(model, quantize=kind)
    head = model.lm_head
    assert isinstance(head, QuantizedLinear) and head.rows == 101 < model.config.padded_vocab_size
    assert head.weight is model.transformer.wte.weight  # still tied: the lookup reads the exact matrix
    assert all(isinstance(m, QuantizedLinear) for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.inference_mode():
        logits, _ = model(torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, 101)
    prepare_for_decoding(model, quantize=kind)  # twice is once
    prepare_for_decoding(model)  # and prepacking leaves quantized layers alone
    assert model.lm_head is head


def test_bad_quantize_values_are_refused():
    model = GPT(ModelConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=32))
    with pytest.raises(ValueError, match="int3"):
        prepare_for_decoding(model, quantize="int3")


# ---- fidelity on a trained model -------------------------------------------------------------------------

BLOCK = 64


@pytest.fixture(scope="module")
def trained():
    """A 2-layer, 64-wide char model trained for 300 steps on the text fixture's Shakespeare (~10 s on one
    core), and its held-out tail (the last tenth of that text)."""
    text = fixture_text().split("Written for the tests")[0]
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    cut = len(ids) * 9 // 10
    train_ids, held_out = ids[:cut], ids[cut:]
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=len(chars), block_size=BLOCK, n_layer=2, n_head=4, n_embd=64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        starts = torch.randint(0, len(train_ids) - BLOCK - 1, (16,), generator=g)
        x = torch.stack([train_ids[s:s + BLOCK] for s in starts])
        y = torch.stack([train_ids[s + 1:s + BLOCK + 1] for s in starts])
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval(), held_out


def held_out_loss(model: GPT, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Mean next-token loss over non-overlapping windows of the held-out text, and the argmax predictions."""
    n = (len(ids) - 1) // BLOCK
    x = ids[: n * BLOCK].view(n, BLOCK)
    y = ids[1: n * BLOCK + 1].view(n, BLOCK)
    with torch.inference_mode():
        logits, loss = model(x, y)
    return float(loss), logits.argmax(-1)


# measured: int8 perplexity -0.01%, next-token agreement 99.0%, greedy tokens equal 97.2%;
#           int4 +0.51%, 90.5%, 59.0% (a continuation drifts apart after its first differing near-tie)
@pytest.mark.parametrize("kind, ppl_tolerance, min_agreement, min_greedy", [("int8", 0.01, 0.97, 0.9),
                                                                             ("int4", 0.05, 0.85, 0.45)])
def test_quantized_trained_model_keeps_its_perplexity_and_greedy_choices(trained, kind, ppl_tolerance,
                                                                          min_agreement, min_greedy):
    """Held-out perplexity within 1% (int8) / 5% (int4) of the unquantized model's; next-token argmax
    agreement on every held-out position; greedy continuations of 12 fixed prompts, 24 tokens each,
    compared token by token."""
    import copy

    model, held_out = trained
    loss, predictions = held_out_loss(model, held_out)
    quantized = prepare_for_decoding(copy.deepcopy(model), quantize=kind)
    q_loss, q_predictions = held_out_loss(quantized, held_out)
    assert loss < 2.6  # it did learn (a uniform guess over the ~80 characters is ~4.4)
    ratio = math.exp(q_loss) / math.exp(loss)
    agreement = float((predictions == q_predictions).float().mean())
    prompts = [held_out[i:i + 16].tolist() for i in range(0, 16 * 12, 16)]
    greedy = SamplingConfig(max_new_tokens=24, temperature=0.0, stop_at_eot=False)
    exact, approximate = generate_ids(model, prompts, greedy), generate_ids(quantized, prompts, greedy)
    same_tokens = sum(a == b for e, q in zip(exact, approximate) for a, b in zip(e, q)) / (24 * len(prompts))
    print(f"{kind}: perplexity {math.exp(loss):.3f} -> {math.exp(q_loss):.3f} ({ratio - 1:+.2%}), next-token "
          f"agreement {agreement:.1%}, greedy tokens equal {same_tokens:.1%}")
    assert abs(ratio - 1) <= ppl_tolerance
    assert agreement >= min_agreement
    assert same_tokens >= min_greedy


def _adversarial_weights() -> list[torch.Tensor]:
    """Rows that stress the quantizers' arithmetic: exact .5 ties (round half to even), zero rows (+0 and -0),
    all-negative rows, tiny and subnormal values, huge values, constant rows; fp32 and bf16, over several
    row blocks (QUANTIZE_ROWS) with a short last one, and a weight whose rows are strided."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1100, 64, generator=g) * 0.02
    half = torch.arange(64) - 32 + 0.5
    w[0], w[1], w[2] = 0.0, -0.0, -torch.rand(64, generator=g)
    w[3], w[4], w[5] = torch.randn(64, generator=g) * 1e-30, 1e-40, torch.randn(64, generator=g) * 1e30
    w[6], w[7] = half * 2**-7, half * 2**-6  # int8: scale 2^-7 / 2^-6 (the 127 set below): every q a tie
    w[6, 0], w[7, 0] = 127 * 2**-7, -127 * 2**-6
    w[8], w[9], w[10, ::2] = 5.0, -5.0, 1e-38
    w[11] = (torch.arange(64) % 32) * 2**-5  # int4: groups spanning 0..31/32 (scale 2^-5 * 31/15, not exact)
    w[12] = (torch.arange(64) % 16) * 2**-4  # int4: min 0, max 15/16 -> scale 2^-4, zero 0.5: ties at k/16
    w[13:400] = torch.randint(-8, 8, (387, 64), generator=g).float() * 2**-5 + 2**-6  # ties and near-ties
    return [w, w.bfloat16(), w[:, :32].contiguous(), w.t().contiguous().t()]  # (the last: column-major storage)


def _reference_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).bfloat16()
    return torch.clamp(torch.round(w / scale.float()[:, None]), -127, 127).to(torch.int8), scale


def _reference_int4(w: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w = w.float().reshape(w.shape[0], -1, group)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=1e-12).bfloat16()
    zero = (low + 8 * scale.float()).bfloat16()
    q = torch.round((w - zero.float()[..., None]) / scale.float()[..., None]) + 8
    return q.clamp(0, 15).to(torch.int32).reshape(w.shape[0], -1), scale, zero


@pytest.mark.parametrize("rows", [1_000, 256])
def test_quantizers_are_bit_identical_to_the_plain_formulas(rows, monkeypatch):
    """The quantizers (blocks of rows, a reused fp32 buffer, the abs-max as max(max, -min), an fp32 weight read
    in place) give exactly the bits of the formulas written plainly, on adversarial rows; and a QuantizedLinear's
    buffers (int4 packed a block of rows at a time, its zero rows appended to the last block) are exactly the
    whole matrix's, padded and packed at once."""
    import gptforge.generation.quantize as quantize

    monkeypatch.setattr(quantize, "QUANTIZE_ROWS", rows)
    for w in _adversarial_weights():
        original = w.clone()
        for got, want in ((quantize_int8(w), _reference_int8(w)), (quantize_int4(w), _reference_int4(w))):
            assert all(a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.is_floating_point() else a,
                                                          b.view(torch.uint8) if b.is_floating_point() else b)
                       for a, b in zip(got, want))
        assert torch.equal(w, original)
        for n in (w.shape[0], w.shape[0] - 3):  # the int4 head case: 3 + 1 zero rows up to a multiple of 16
            linear = torch.nn.Linear(w.shape[1], n, bias=False, dtype=w.dtype)
            linear.weight.data = w[:n].clone()
            q8, q4 = QuantizedLinear(linear, "int8"), QuantizedLinear(linear, "int4")
            q, scale = _reference_int8(w[:n])
            assert torch.equal(q8.qweight, q) and torch.equal(q8.scale.view(torch.int16), scale.view(torch.int16))
            q, scale, zero = _reference_int4(torch.nn.functional.pad(w[:n], (0, 0, 0, -n % 16)))
            assert torch.equal(q4.qweight, torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
            scale_zero = torch.stack([scale, zero], dim=-1).transpose(0, 1)
            assert torch.equal(q4.scale_zero.view(torch.int16), scale_zero.view(torch.int16))
