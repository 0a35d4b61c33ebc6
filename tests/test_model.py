import math

import pytest
import torch
import torch.nn.functional as F

import gptforge.model
from gptforge.config import ModelConfig, get_preset
from gptforge.model import GPT, CausalSelfAttention, band_mask


def test_parameter_counts_match_published_sizes():
    assert GPT(get_preset("gpt2")).num_parameters() == 124_439_808
    assert GPT(get_preset("dev-17m")).num_parameters() == 17_867_008


def test_gpt3_small_count_by_hand():
    d, L, V, T = 768, 12, 50257, 2048
    per_layer = 12 * d * d + 10 * d  # 4d^2 attention + 8d^2 MLP; biases d+4d+d (no q/k/v bias); LayerNorms 4d
    expected = V * d + T * d + L * per_layer + 2 * d
    assert GPT(get_preset("gpt3-small")).num_parameters() == expected


def test_logits_match_transformers_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=100, block_size=32, n_layer=2, n_head=2, n_embd=16)
    ours = GPT(config).eval()
    hf_config = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                                        attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    state = {}
    for name, tensor in ours.state_dict().items():
        if name == "lm_head.weight":
            continue
        if name == "transformer.wte.weight":
            tensor = tensor[:100]
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            tensor = tensor.t()  # HF GPT-2 uses Conv1D (in, out)
        state[name] = tensor
    hf.load_state_dict(state, strict=False)
    idx = torch.randint(0, 100, (2, 20))
    with torch.no_grad():
        assert torch.allclose(ours(idx)[0], hf(idx).logits, atol=1e-5)


def _attention(config: ModelConfig, layer: int) -> CausalSelfAttention:
    torch.manual_seed(1)
    return CausalSelfAttention(config, layer).eval()


def test_band_layer_ignores_tokens_before_window_and_dense_does_not():
    config = ModelConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=16,
                         attention="alternating", window=4)
    band, dense = _attention(config, 1), _attention(config, 0)
    assert band.window == 4 and dense.window is None
    x = torch.randn(1, 20, 16)
    t = 15
    perturbed = x.clone()
    perturbed[:, : t - config.window + 1] += torch.randn(1, t - config.window + 1, 16)  # positions <= t-window
    with torch.no_grad():
        assert torch.allclose(band(x)[:, t], band(perturbed)[:, t], atol=1e-6)
        assert not torch.allclose(dense(x)[:, t], dense(perturbed)[:, t], atol=1e-4)
        # the band does see the oldest token inside the window
        inside = x.clone()
        inside[:, t - config.window + 1] += 1.0
        assert not torch.allclose(band(x)[:, t], band(inside)[:, t], atol=1e-4)


@pytest.mark.parametrize("attention", ["dense", "alternating"])
@pytest.mark.parametrize("norm", ["pre", "post"])
def test_no_output_depends_on_a_future_token(attention, norm):
    config = ModelConfig(vocab_size=50, block_size=32, n_layer=3, n_head=2, n_embd=16,
                         attention=attention, window=5, norm=norm)
    torch.manual_seed(0)
    model = GPT(config).eval()
    idx = torch.randint(0, 50, (2, 24))
    changed = idx.clone()
    changed[:, 12:] = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        a, b = model(idx)[0], model(changed)[0]
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-4)


def test_band_mask_by_hand():
    expected = torch.tensor([[1, 0, 0, 0],
                             [1, 1, 0, 0],
                             [0, 1, 1, 0],
                             [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(band_mask(4, 4, 2), expected)
    assert torch.equal(band_mask(2, 4, 2), expected[2:])  # queries at the end of a longer key range


def test_initialisation_scales_only_residual_projections():
    config = ModelConfig(vocab_size=1000, block_size=64, n_layer=8, n_head=4, n_embd=256)
    torch.manual_seed(0)
    model = GPT(config)
    block = model.transformer.h[0]
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    for projection in (block.attn.c_proj, block.mlp.c_proj):
        assert projection.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    for layer in (block.attn.c_attn, block.mlp.c_fc):
        assert layer.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.wpe.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.wte.weight[: config.vocab_size].std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(block.attn.c_attn.bias) == 0
    assert torch.equal(block.ln_1.weight, torch.ones(256))


def test_padded_vocab_is_never_in_the_logits(tiny_config):
    model = GPT(tiny_config)
    assert model.config.padded_vocab_size == 128
    assert model.transformer.wte.weight.shape[0] == 128
    logits, _ = model(torch.randint(0, 101, (1, 8)))
    assert logits.shape[-1] == 101
    assert model.lm_head.weight is model.transformer.wte.weight


def test_loss_ignores_the_ignore_index(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config).eval()
    idx = torch.randint(0, 101, (2, 10))
    targets = torch.randint(0, 101, (2, 10))
    targets[0, :4] = -100
    logits, loss = model(idx, targets)
    keep = targets != -100
    manual = -torch.log_softmax(logits, -1)[keep].gather(-1, targets[keep][:, None]).mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)
    _, loss_custom = model(idx, torch.where(keep, targets, -1), ignore_index=-1)
    assert loss_custom.item() == pytest.approx(manual.item(), rel=1e-5)


def test_post_ln_has_no_final_norm_and_dropout_only_in_training():
    config = ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16, norm="post", dropout=0.5)
    model = GPT(config)
    assert not any(name.startswith("transformer.ln_f") for name, _ in model.named_parameters())
    idx = torch.randint(0, 50, (1, 8))
    model.train()
    torch.manual_seed(0)
    a = model(idx)[0]
    b = model(idx)[0]
    assert not torch.allclose(a, b)
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])


def test_sequence_longer_than_context_is_refused(tiny_config):
    with pytest.raises(ValueError, match="exceeds the model's context"):
        GPT(tiny_config)(torch.zeros(1, 33, dtype=torch.long))


def test_loss_matches_cross_entropy_in_bf16_autocast(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config)
    idx, targets = torch.randint(0, 101, (2, 16)), torch.randint(0, 101, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, targets)
    assert loss.dtype == torch.float32
    expected = F.cross_entropy(logits.float().reshape(-1, 101), targets.reshape(-1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_fresh_model_has_zero_vocabulary_padding_rows():
    """The padded rows are never used; they start (and, untrained, stay) at zero. The tied lm_head is the
    same tensor, so initialising it after the embedding must not refill them."""
    model = GPT(ModelConfig(vocab_size=70, block_size=16, n_layer=1, n_head=2, n_embd=16))
    assert model.config.padded_vocab_size == 128
    assert torch.count_nonzero(model.transformer.wte.weight[70:]) == 0
    assert torch.count_nonzero(model.transformer.wte.weight[:70]) == 70 * 16


@pytest.mark.parametrize("attention", ["dense", "alternating"])
def test_forward_with_a_kv_cache_equals_the_whole_sequence(attention):
    """The cache is an argument of forward: a prompt, then one token at a time, gives the logits the
    whole sequence gives at the same positions (band layers keep only a ring of `window` slots)."""
    from gptforge.generation import KVCache

    config = ModelConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=16, attention=attention,
                         window=3)
    torch.manual_seed(0)
    model = GPT(config).eval()
    idx = torch.randint(0, 50, (2, 12))
    cache = KVCache(config, pads=[0, 0], capacity=12)
    with torch.no_grad():
        full, _ = model(idx)
        steps = [model(idx[:, :5], kv_cache=cache)[0]]  # prefill of 5
        steps += [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(5, 12)]  # then one at a time
    assert cache.length == 12
    if attention == "alternating":
        assert cache.keys[1].size(2) == 3  # the band layer's ring
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_cpu_training_attention_runs_in_fp32_under_bf16_autocast(tiny_config, monkeypatch):
    """On CPU the flash-attention backward is several times slower in bf16 than in fp32 for short sequences,
    so under autocast training computes their attention in fp32; without autograd (scoring, generation) it
    keeps autocast's dtype, and so do sequences longer than CPU_FP32_ATTENTION_MAX (T x head width).
    The loss stays the bf16 path's loss to bf16 precision."""
    seen = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real_sdpa(q, k, v, **kwargs)

    torch.manual_seed(0)
    model = GPT(tiny_config)
    x = torch.randint(0, tiny_config.vocab_size, (2, 16))
    with torch.no_grad():
        _, fp32_loss = model(x, x)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(x, x, return_logits=False)
    loss.backward()
    assert seen and set(seen) == {(torch.float32,) * 3}
    assert model.lm_head.weight.grad is not None
    assert abs(loss.item() - fp32_loss.item()) < 0.02 * fp32_loss.item()
    seen.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert seen and set(seen) == {(torch.bfloat16,) * 3}
    # T x head width is 16 x 8 here: at the limit still fp32, one below it the sequence counts as long
    for limit, dtype in ((16 * 8, torch.float32), (16 * 8 - 1, torch.bfloat16)):
        monkeypatch.setattr(gptforge.model, "CPU_FP32_ATTENTION_MAX", limit)
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x, x, return_logits=False)[1].backward()
        assert seen and set(seen) == {(dtype,) * 3}


def _tied_and_untied_copy(config: ModelConfig) -> tuple[GPT, GPT]:
    """A GPT and a copy with the same weights whose head is its own Parameter: the tied matrix's gradient
    must equal the copy's two gradients added up."""
    tied = GPT(config)
    untied = GPT(config)
    untied.load_state_dict(tied.state_dict())
    untied.lm_head.weight = torch.nn.Parameter(tied.lm_head.weight.detach().clone())
    return tied, untied


@pytest.mark.parametrize("fused", [True, False])
def test_tied_embedding_gradient_is_sparse_rows_added_into_the_heads(tiny_config, monkeypatch, fused):
    """On CPU the tied embedding's gradient comes as sparse rows, summed by autograd into the head's dense
    gradient: the parameter's gradient is dense and equals an untied copy's two gradients added up. An untied
    embedding keeps the dense gradient (an optimizer could not take a sparse one alone)."""
    modes = []
    real_embedding = F.embedding

    def spy(idx, weight, *args, **kwargs):
        if weight.size(0) == tiny_config.padded_vocab_size:  # token embeddings (not positions)
            modes.append(kwargs.get("sparse", False))
        return real_embedding(idx, weight, *args, **kwargs)

    monkeypatch.setattr(F, "embedding", spy)
    torch.manual_seed(0)
    tied, untied = _tied_and_untied_copy(tiny_config)
    x = torch.randint(0, tiny_config.vocab_size, (3, 17))
    x[:, :4] = 7  # repeated ids: their rows add up in the sparse gradient too
    for model in (tied, untied):
        _, loss = model(x[:, :-1], x[:, 1:], return_logits=not fused)
        loss.backward()
    assert modes == [True, False]
    grad = tied.transformer.wte.weight.grad
    assert not grad.is_sparse and not untied.transformer.wte.weight.grad.is_sparse
    expected = untied.transformer.wte.weight.grad + untied.lm_head.weight.grad
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)
    assert grad[7].abs().sum() > 0
    modes.clear()
    with torch.no_grad():
        tied(x)
    assert modes == [False]


def test_training_path_adds_the_embedding_rows_into_the_fused_losss_gradient_in_place(tiny_config, monkeypatch):
    """forward(return_logits=False) sums the tied matrix's two gradients itself: the parameter's gradient is
    the very tensor the fused loss handed back (no V x C copy), equal to an untied copy's two gradients, also
    through torch.autograd.grad and when two backward passes accumulate."""
    from gptforge import fused_loss

    handed = []
    real_backward = fused_loss._FusedLinearCrossEntropy.backward

    def spy(ctx, grad_loss):
        grads = real_backward(ctx, grad_loss)
        handed.append(grads[1].data_ptr())
        return grads

    monkeypatch.setattr(fused_loss._FusedLinearCrossEntropy, "backward", staticmethod(spy))
    torch.manual_seed(0)
    tied, untied = _tied_and_untied_copy(tiny_config)
    batches = [torch.randint(0, tiny_config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(s))
               for s in (1, 2)]
    batches[0][:, :3] = 5  # repeated ids
    wte = tied.transformer.wte.weight

    def loss_of(model, x):
        return model(x[:, :-1], x[:, 1:], return_logits=False)[1]

    loss_of(tied, batches[0]).backward()
    assert handed and wte.grad.data_ptr() == handed[-1]  # no copy: the fused loss's own tensor
    loss_of(tied, batches[1]).backward()  # accumulates into .grad
    for x in batches:
        loss_of(untied, x).backward()
    expected = untied.transformer.wte.weight.grad + untied.lm_head.weight.grad
    torch.testing.assert_close(wte.grad, expected, rtol=1e-5, atol=1e-7)
    assert wte.grad[5].abs().sum() > 0

    (by_grad,) = torch.autograd.grad(loss_of(tied, batches[0]), [wte])
    untied.zero_grad(set_to_none=True)
    loss_of(untied, batches[0]).backward()
    torch.testing.assert_close(by_grad, untied.transformer.wte.weight.grad + untied.lm_head.weight.grad,
                               rtol=1e-5, atol=1e-7)


def test_compiled_training_forward_matches_eager(monkeypatch, tmp_path):
    """torch.compile on a CPU (what `train.compile = true` runs) through the fused loss: the same loss and
    the same tied gradient as eager, which there takes the sparse, summed-in-place path instead."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=100, block_size=16, n_layer=1, n_head=2, n_embd=32))
    x = torch.randint(0, 100, (2, 17))
    _, eager = model(x[:, :-1], x[:, 1:], return_logits=False)
    eager.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    try:
        _, compiled = torch.compile(model)(x[:, :-1], x[:, 1:], return_logits=False)
        compiled.backward()
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)
