"""prepare_for_decoding: faster products for the same weights, outputs equal to float rounding, nothing saved
changes; oneDNN's prepacked path where it runs (x86, this project's machines), column-major re-laying elsewhere."""

from __future__ import annotations

import pytest
import torch
from test_generate import GREEDY, make_model

from gptforge.generation import generate_ids, layout, prepare_for_decoding
from gptforge.generation.layout import PrepackedLinear
from gptforge.model import GPT
from gptforge.weights import read_weights, save_weights

PROMPTS = [[3, 14, 15], [9, 2, 6, 5, 3, 5]]
DTYPES = [torch.float32, torch.bfloat16]


def onednn(dtype: torch.dtype) -> bool:
    return layout._onednn_works(dtype)


def linears(model: GPT) -> list[torch.nn.Linear]:
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_prepared_model_keeps_its_weights_and_agrees(dtype, tmp_path):
    if not onednn(dtype):
        pytest.skip(f"oneDNN's prepacked linear does not run for {dtype} here (the fallback is tested below)")
    model = make_model("alternating", dtype=dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    idx = torch.tensor([[1, 2, 3, 4, 5], [7, 7, 8, 9, 1]])
    with torch.inference_mode():
        logits = model(idx)[0]
    expected = generate_ids(model, PROMPTS, GREEDY.replace(max_new_tokens=12))
    prepare_for_decoding(model)
    assert all(isinstance(m, PrepackedLinear) for m in linears(model))  # the head too
    assert len(linears(model)) == 3 * 4 + 1 and all(m.packed.is_mkldnn for m in linears(model))
    assert model.lm_head.packed.shape == (model.config.vocab_size, 16)  # the real vocabulary only
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.inference_mode():
        got = model(idx)[0]
    assert got.shape == logits.shape == (2, 5, model.config.vocab_size)
    tolerance = 1e-4 if dtype == torch.float32 else 0.1  # (weights ~N(0, 0.5): logits in the tens)
    assert (got.float() - logits.float()).abs().max() < tolerance
    if dtype == torch.float32:
        assert generate_ids(model, PROMPTS, GREEDY.replace(max_new_tokens=12)) == expected
    save_weights(model, tmp_path / "m.safetensors")
    _, saved = read_weights(tmp_path / "m.safetensors")
    assert all(torch.equal(saved[k], before[k]) for k in saved)
    prepare_for_decoding(model)  # twice is once
    assert all(isinstance(m, PrepackedLinear) and not isinstance(m.weight, PrepackedLinear) for m in linears(model))


def test_reorders_made_side_by_side_equal_one_by_one(monkeypatch):
    # prepare_for_decoding reorders on one thread per core; each copy must still be its own weight's.
    if not onednn(torch.float32):
        pytest.skip("oneDNN's prepacked linear does not run here")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    model = make_model("alternating", dtype=torch.float32)
    prepare_for_decoding(model)
    generator = torch.Generator().manual_seed(0)
    for module in linears(model):
        x = torch.randn(3, module.in_features, generator=generator)
        alone = layout.reorder(module, module.rows)
        with torch.inference_mode():
            got = torch.ops.mkldnn._linear_pointwise(x, module.packed, module.bias, "none", [], "")
            want = torch.ops.mkldnn._linear_pointwise(x, alone, module.bias, "none", [], "")
        assert got.shape == (3, module.rows) and torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prepacked_rows_do_not_depend_on_their_batch(dtype):
    """A served row's logits are the same alone or among 15 others (torch's fp32 F.linear changes kernels
    with the batch size, so there they differ in the last bits)."""
    if not onednn(dtype):
        pytest.skip(f"oneDNN's prepacked linear does not run for {dtype} here")
    model = prepare_for_decoding(make_model(dtype=dtype, vocab=300))
    torch.manual_seed(1)
    x = torch.randn(16, 1, 16).to(dtype)
    with torch.inference_mode():
        together = model.head(model.transformer.h[0](x))
        alone = torch.cat([model.head(model.transformer.h[0](x[r:r + 1])) for r in range(16)])
    assert torch.equal(together, alone)


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantized_rows_do_not_depend_on_their_batch(kind, dtype):
    """The int8/int4 kernels keep the rule too: a row's logits are the same alone, among 15 others, or as the
    first of 1..16 rows, and so are its greedy tokens."""
    model = prepare_for_decoding(make_model(dtype=dtype, vocab=300), quantize=kind)
    torch.manual_seed(1)
    x = torch.randn(16, 1, 16).to(dtype)
    with torch.inference_mode():
        together = model.head(model.transformer.h[0](x))
        alone = torch.cat([model.head(model.transformer.h[0](x[r:r + 1])) for r in range(16)])
        firsts = [model.head(model.transformer.h[0](x[:n]))[0] for n in range(1, 17)]
    assert torch.equal(together, alone) and all(torch.equal(f, together[0]) for f in firsts)
    prompts = [[3, 14, 15, 9], [2, 6, 5, 3], [5, 8, 9, 7], [9, 3, 2, 3]]
    config = GREEDY.replace(max_new_tokens=8)
    assert generate_ids(model, prompts, config) == [generate_ids(model, [p], config)[0] for p in prompts]


def test_prepared_model_still_takes_gradients():
    """With autograd recording, the plain product runs: gradients reach the (shared) parameters."""
    model = make_model()
    prepare_for_decoding(model)
    _, loss = model(torch.tensor([[1, 2, 3, 4]]), torch.tensor([[2, 3, 4, 5]]))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_without_onednn_fp32_weights_are_relaid_column_major(monkeypatch, tmp_path):
    monkeypatch.setattr(layout, "_onednn_works", lambda dtype: False)
    model = make_model("alternating")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = generate_ids(model, PROMPTS, GREEDY.replace(max_new_tokens=12))
    prepare_for_decoding(model)
    assert not any(isinstance(m, PrepackedLinear) for m in linears(model))
    assert not model.transformer.h[0].attn.c_attn.weight.is_contiguous()  # the layout did change
    assert model.lm_head.weight is model.transformer.wte.weight
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert generate_ids(model, PROMPTS, GREEDY.replace(max_new_tokens=12)) == expected
    bf16 = prepare_for_decoding(make_model().to(torch.bfloat16))
    assert bf16.transformer.h[0].attn.c_attn.weight.is_contiguous()  # bf16 kernels prefer row-major


def test_onednn_probe_says_no_off_x86(monkeypatch):
    layout._onednn_works.cache_clear()
    monkeypatch.setattr(layout.platform, "machine", lambda: "aarch64")
    try:
        assert not layout._onednn_works(torch.float32)
    finally:
        layout._onednn_works.cache_clear()


def test_cuda_and_other_dtypes_are_left_alone():
    model = make_model().to(torch.float64)
    prepare_for_decoding(model)
    assert not any(isinstance(m, PrepackedLinear) for m in linears(model))
    assert model.transformer.h[0].attn.c_attn.weight.is_contiguous()
