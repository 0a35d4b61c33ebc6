import math

import pytest
import torch
import torch.nn.functional as F

import gptforge.band_attention as band_module
from gptforge.band_attention import band_attention, band_attention_reference, band_mask


def qkv(B: int, H: int, T: int, D: int, dtype=torch.float32, seed: int = 0):
    """q, k, v sliced from one (B, T, 3·H·D) projection, with the strides the model gives them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, 3 * H * D, generator=g, dtype=torch.float64).to(dtype)
    return x, [t.view(B, T, H, D).transpose(1, 2) for t in x.split(H * D, dim=2)]


def forward_backward(fn, x, B, H, T, D, grad):
    x = x.detach().requires_grad_(True)
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in x.split(H * D, dim=2))
    y = fn(q, k, v)
    y.backward(grad)
    return y.detach(), x.grad  # x.grad holds the gradients of q, k and v side by side


# (B, H, T, D, window, block): T not a multiple of the block, window not a multiple of the block, window 1,
# window >= T (plain causal), a head longer than the window, many blocks, and batch > 1.
CASES = [
    (2, 3, 50, 8, 7, None),
    (1, 2, 37, 4, 1, None),
    (2, 2, 40, 8, 40, None),
    (2, 2, 40, 8, 64, None),
    (1, 2, 64, 8, 16, 4),
    (2, 3, 100, 8, 10, 4),
    (1, 1, 33, 4, 5, 3),
    (3, 2, 70, 8, 9, 16),
    (1, 2, 300, 16, 32, None),
]


@pytest.mark.parametrize("B,H,T,D,window,block", CASES)
def test_matches_masked_reference_forward_and_backward_fp64(B, H, T, D, window, block):
    x, _ = qkv(B, H, T, D, torch.float64)
    grad = torch.randn(B, H, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y, g = forward_backward(lambda q, k, v: band_attention(q, k, v, window, block=block), x, B, H, T, D, grad)
    y_ref, g_ref = forward_backward(lambda q, k, v: band_attention_reference(q, k, v, window), x, B, H, T, D, grad)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, None)])
@pytest.mark.parametrize("B,H,T,D,window,block", [CASES[0], CASES[4], CASES[5], CASES[8]])
def test_as_accurate_as_the_reference_in_fp32_and_bf16(dtype, tolerance, B, H, T, D, window, block):
    """Against float64 truth: fp32 agrees to 1e-5; in bf16 the fast path's error is no larger than the
    masked reference's own (the two sum in different orders, so they need not agree bit for bit)."""
    x, _ = qkv(B, H, T, D, dtype)
    grad = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(1)).to(dtype)
    truth = forward_backward(lambda q, k, v: band_attention_reference(q, k, v, window), x.double(), B, H, T, D,
                             grad.double())
    fast = forward_backward(lambda q, k, v: band_attention(q, k, v, window, block=block), x, B, H, T, D, grad)
    ref = forward_backward(lambda q, k, v: band_attention_reference(q, k, v, window), x, B, H, T, D, grad)
    for got, want, ref_got in zip(fast, truth, ref):
        assert got.dtype == dtype
        err = (got.double() - want).abs().max().item()
        if tolerance is not None:
            assert err < tolerance
        else:
            ref_err = (ref_got.double() - want).abs().max().item()
            assert 0 < ref_err < 0.1 and err <= 2 * ref_err


@pytest.mark.parametrize("mask_shape", ["padding", "per_head", "2d"])
def test_extra_mask_is_applied_inside_the_band(mask_shape):
    """A KV cache's left padding (row i's keys before pad[i] hidden, padding queries see themselves), and
    arbitrary masks that keep the diagonal: equal to the reference under band & mask, forward and backward."""
    B, H, T, D, window = 3, 2, 61, 8, 9
    x, _ = qkv(B, H, T, D, torch.float64)
    grad = torch.randn(B, H, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    pos = torch.arange(T)
    diagonal = pos[:, None] == pos[None, :]
    g = torch.Generator().manual_seed(2)
    if mask_shape == "padding":
        pads = torch.tensor([0, 7, 30])[:, None, None, None]
        mask = (pos[None, None, None, :] >= pads) | diagonal  # (B, 1, T, T)
    elif mask_shape == "per_head":
        mask = (torch.rand(B, H, T, T, generator=g) < 0.7) | diagonal
    else:
        mask = (torch.rand(T, T, generator=g) < 0.7) | diagonal
    for block in (4, None):
        y, grads = forward_backward(lambda q, k, v: band_attention(q, k, v, window, attn_mask=mask, block=block),
                                    x, B, H, T, D, grad)
        y_ref, grads_ref = forward_backward(lambda q, k, v: band_attention_reference(q, k, v, window,
                                                                                     attn_mask=mask),
                                            x, B, H, T, D, grad)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(grads, grads_ref, rtol=0, atol=1e-12)
    # the mask does matter here: without it the answer differs
    assert not torch.allclose(y, band_attention_reference(*forward_inputs(x, B, H, T, D), window))


def forward_inputs(x, B, H, T, D):
    return [t.view(B, T, H, D).transpose(1, 2) for t in x.split(H * D, dim=2)]


def test_extra_mask_must_be_boolean():
    _, (q, k, v) = qkv(1, 2, 10, 4)
    with pytest.raises(ValueError, match="boolean"):
        band_attention(q, k, v, 3, attn_mask=torch.zeros(10, 10))


def test_result_is_heads_major_view_of_token_major_memory():
    """The caller's transpose(1, 2).reshape(B, T, C) must be free: the (B, T, H, D) memory is contiguous."""
    _, (q, k, v) = qkv(2, 3, 50, 8)
    y = band_attention(q, k, v, 7)
    assert y.shape == (2, 3, 50, 8) and y.transpose(1, 2).is_contiguous()


def test_short_sequences_and_contiguous_inputs():
    for T in (1, 2, 5, 9):
        _, (q, k, v) = qkv(1, 2, T, 4, torch.float64, seed=T)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        torch.testing.assert_close(band_attention(q, k, v, 3, block=2), band_attention_reference(q, k, v, 3),
                                   rtol=0, atol=1e-12)


def test_window_one_returns_the_values():
    _, (q, k, v) = qkv(2, 2, 29, 4, torch.float64)
    torch.testing.assert_close(band_attention(q, k, v, 1, block=4), v, rtol=0, atol=1e-12)


def test_computes_only_the_band(monkeypatch):
    """Count the score-matrix entries the kernel calls are asked for: O(T·(window+block)) for the fast
    path, T² for the masked square."""
    from gptforge.info import mean_attended_keys

    entries = []
    real_sdpa = F.scaled_dot_product_attention

    def counting_sdpa(q, k, v, *args, **kwargs):
        entries.append(q.shape[:-1].numel() * k.size(-2))
        return real_sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(band_module.F, "scaled_dot_product_attention", counting_sdpa)
    B, H, T, window, block = 1, 2, 1000, 64, 32
    _, (q, k, v) = qkv(B, H, T, 4)
    band_attention(q, k, v, window, block=block)
    # `gptforge info` counts a band layer's attention at the keys the band needs; the kernel computes those
    # plus at most two blocks' worth of masked-out keys per query.
    needed = B * H * T * mean_attended_keys(T, window)
    assert needed <= sum(entries) <= B * H * T * (mean_attended_keys(T, window) + 2 * block)
    entries.clear()
    band_attention_reference(q, k, v, window)
    assert sum(entries) == B * H * T * T


def test_mismatched_lengths_and_bad_window_raise():
    _, (q, k, v) = qkv(1, 2, 10, 4)
    with pytest.raises(ValueError, match="same length"):
        band_attention(q, k[:, :, :5], v[:, :, :5], 3)
    with pytest.raises(ValueError, match="window"):
        band_attention(q, k, v, 0)


def test_dropout_only_when_training():
    _, (q, k, v) = qkv(1, 2, 40, 4)
    torch.testing.assert_close(band_attention(q, k, v, 6, dropout_p=0.5, training=False, block=4),
                               band_attention(q, k, v, 6, block=4), rtol=0, atol=0)


@pytest.mark.parametrize("fn", [band_attention, band_attention_reference])
def test_dropout_keeps_each_weight_with_probability_1_minus_p_scaled(fn):
    """q = 0 makes the band's weights uniform, 1/n_t over n_t = min(t+1, window) keys; with v = 1 the output
    at t is (kept weights)/(n_t·(1-p)): mean 1, variance p / ((1-p)·n_t), at every position (head and
    blocks alike). Same law for the fast path and the reference, though not the same draws."""
    B, H, T, D, window, p = 4, 4, 40, 1, 6, 0.3
    q = torch.zeros(B, H, T, D)
    k = torch.randn(B, H, T, D)
    v = torch.ones(B, H, T, D)
    torch.manual_seed(0)
    kwargs = dict(block=4) if fn is band_attention else {}
    samples = torch.stack([fn(q, k, v, window, dropout_p=p, training=True, **kwargs)[..., 0]
                           for _ in range(200)])  # (200, B, H, T)
    samples = samples.transpose(0, -1).reshape(T, -1)  # every draw of position t in one row
    n_t = torch.clamp(torch.arange(T) + 1, max=window).double()
    mean, var = samples.double().mean(1), samples.double().var(1)
    expected_var = p / ((1 - p) * n_t)
    # 3200 draws per position: the standard error of the mean is sqrt(var/3200) <= 0.012
    assert (mean - 1).abs().max() < 0.06
    assert ((var / expected_var) - 1).abs().max() < 0.2


def test_dropout_backward_uses_the_forward_draws():
    """With the draws fixed, the output is linear in v, so sum(grad_v · v) must equal sum(grad_out · out)
    (Euler's identity); a backward that re-drew the dropout mask would break it."""
    B, H, T, D = 2, 2, 45, 4
    _, (q, k, v) = qkv(B, H, T, D, torch.float64)
    v = v.detach().clone().requires_grad_(True)
    grad = torch.randn(B, H, T, D, dtype=torch.float64)
    torch.manual_seed(3)
    y = band_attention(q, k, v, 7, dropout_p=0.4, training=True, block=4)
    y.backward(grad)
    assert not torch.allclose(y, band_attention(q, k, v, 7, block=4))  # dropout did something
    torch.testing.assert_close((v.grad * v).sum(), (grad * y).sum(), rtol=1e-10, atol=1e-10)


def test_band_mask_convention():
    # query t sees keys t-window+1 .. t (GPT-Neo's local attention), also for queries that follow a cache
    assert band_mask(3, 3, 2).tolist() == [[True, False, False], [True, True, False], [False, True, True]]
    assert band_mask(1, 4, 2).tolist() == [[False, False, True, True]]


def test_block_mask_is_cached_per_shape():
    a = band_module._block_mask(4, 2, 6, torch.device("cpu"))
    assert a is band_module._block_mask(4, 2, 6, torch.device("cpu"))
    assert a.shape == (4, 12) and a.sum().item() == 4 * 6  # every query of a block sees exactly `window` keys
    assert math.isclose(a.float().mean().item(), 6 / 12)


# ---------------------------------------------------------------------------------- the model's band layers

def band_gpt(block_size: int = 64, window: int = 5, dropout: float = 0.0) -> torch.nn.Module:
    from gptforge.config import ModelConfig
    from gptforge.model import GPT

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=61, block_size=block_size, n_layer=2, n_head=2, n_embd=16,
                         attention="alternating", window=window, dropout=dropout)
    return GPT(config)


def test_model_band_layers_take_the_fast_path_and_match_the_masked_model(monkeypatch):
    import gptforge.model as model_module

    model = band_gpt()
    idx = torch.randint(0, 61, (2, 50), generator=torch.Generator().manual_seed(0))
    calls = []

    def recording(q, k, v, window, *args, **kwargs):
        calls.append((q.size(2), window))
        return band_attention(q, k, v, window, *args, block=2, **kwargs)  # many blocks at this small T

    def run(kernel):
        monkeypatch.setattr(model_module, "band_attention", kernel)
        model.zero_grad(set_to_none=True)
        logits, loss = model(idx, idx)
        loss.backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    logits, grads = run(recording)
    assert calls == [(50, 5)]  # layer 1, the only band layer, over the whole sequence
    ref_logits, ref_grads = run(band_attention_reference)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_model_passes_dropout_to_the_band_only_in_training(monkeypatch):
    import gptforge.model as model_module

    model = band_gpt(dropout=0.25)
    seen = []

    def recording(q, k, v, window, dropout_p=0.0, training=False, **kwargs):
        seen.append((dropout_p, training))
        return band_attention(q, k, v, window, dropout_p, training, **kwargs)

    monkeypatch.setattr(model_module, "band_attention", recording)
    idx = torch.randint(0, 61, (1, 20))
    model.train()(idx)
    model.eval()(idx)
    assert seen == [(0.25, True), (0.25, False)]


def test_generation_prefill_of_a_long_prompt_takes_the_fast_path(monkeypatch):
    import gptforge.model as model_module
    from gptforge.generation import SamplingConfig, generate_ids

    model = band_gpt(block_size=48, window=4).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.5)  # large weights: greedy tokens differ when attention differs
    prompt = torch.randint(0, 61, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    lengths = []

    def recording(q, k, v, window, *args, **kwargs):
        lengths.append(q.size(2))
        return band_attention(q, k, v, window, *args, **kwargs)

    config = SamplingConfig(temperature=0.0, stop_at_eot=False, max_new_tokens=8)
    monkeypatch.setattr(model_module, "band_attention", recording)
    got = generate_ids(model, [prompt], config)[0]
    assert 30 in lengths  # the band layer's prefill ran over the whole prompt on the fast path
    monkeypatch.setattr(model_module, "band_attention", band_attention_reference)
    assert got == generate_ids(model, [prompt], config)[0]


def test_generation_ragged_prefill_takes_the_fast_path_with_the_padding_mask(monkeypatch):
    import gptforge.model as model_module
    from gptforge.generation import SamplingConfig, generate_ids

    model = band_gpt(block_size=48, window=4).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.5)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (30, 11, 23)]
    masks = []

    def recording(q, k, v, window, *args, **kwargs):
        masks.append(kwargs.get("attn_mask"))
        return band_attention(q, k, v, window, *args, **kwargs)

    config = SamplingConfig(temperature=0.0, stop_at_eot=False, max_new_tokens=6)
    monkeypatch.setattr(model_module, "band_attention", recording)
    got = generate_ids(model, prompts, config)
    assert masks and masks[0] is not None and masks[0].shape[-1] == 30  # the padded prompt's mask
    alone = [generate_ids(model, [prompt], config)[0] for prompt in prompts]  # no padding at all
    assert got == alone
