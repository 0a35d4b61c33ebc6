"""The fused chunked loss (GPT.forward(..., return_logits=False)) against the plain path: full logits,
F.cross_entropy on their fp32 upcast, then autograd."""

import pytest
import torch
import torch.nn.functional as F

from gptforge import fused_loss
from gptforge.config import ModelConfig
from gptforge.fused_loss import chunk_rows, linear_cross_entropy
from gptforge.model import GPT

VOCAB = 101  # not a multiple of 64: the tied weight has 27 padding rows


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=2, n_embd=16))


def _batch(ignore: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, VOCAB, (3, 16), generator=g)
    targets = torch.randint(0, VOCAB, (3, 16), generator=g)
    if ignore:
        targets[0, :5] = -100
        targets[2, 9] = -100
    return idx, targets


def _loss_and_grads(model: GPT, fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _assert_grads_close(got: dict, want: dict, rel: float) -> None:
    """Each gradient within `rel` of the reference, relative to the reference's largest entry."""
    assert got.keys() == want.keys()
    for name, reference in want.items():
        err = (got[name] - reference).abs().max() / reference.abs().max()
        assert err <= rel, f"{name}: relative error {err:.2e} > {rel:.0e}"


@pytest.fixture(params=[None, 4 * VOCAB * 7], ids=["one-chunk", "7-row-chunks"])
def chunk_bytes(request, monkeypatch):
    """The default budget (all 48 rows in one chunk) and 7-row chunks (7 chunks, the last one short)."""
    if request.param is not None:
        monkeypatch.setattr(fused_loss, "CHUNK_BYTES", request.param)
    return request.param


def test_chunk_rows_respect_the_budget_and_split_evenly():
    assert chunk_rows(2048, 50257) == 512  # 667 fit in 128 MB -> 4 chunks of 512, not 667+667+667+47
    assert chunk_rows(48, VOCAB, chunk_bytes=4 * VOCAB * 7) == 7
    assert chunk_rows(10, 50257, chunk_bytes=1) == 1  # a budget below one row still makes progress
    assert chunk_rows(5, 50257) == 5


def test_fp32_loss_and_all_gradients_equal_the_full_logits_path(chunk_bytes):
    model = _model()
    idx, targets = _batch()
    want_loss, want = _loss_and_grads(model, lambda: model(idx, targets)[1])
    logits, got_loss = model(idx, targets, return_logits=False)
    assert logits is None
    model.zero_grad(set_to_none=True)
    got_loss.backward()
    got = {name: p.grad.clone() for name, p in model.named_parameters()}
    assert got_loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    _assert_grads_close(got, want, rel=1e-5)
    wte_grad = got["transformer.wte.weight"]
    assert wte_grad.shape[0] == 128
    assert torch.count_nonzero(wte_grad[VOCAB:]) == 0  # padding rows: exactly zero


def test_ignored_rows_get_exactly_zero_hidden_gradient(chunk_bytes):
    torch.manual_seed(0)
    h = torch.randn(20, 8, requires_grad=True)
    weight = torch.randn(64, 8, requires_grad=True)
    targets = torch.randint(0, 50, (20,))
    targets[[0, 7, 8, 19]] = -100
    loss = linear_cross_entropy(h, weight, targets, vocab_size=50, chunk_bytes=4 * 50 * 3)
    loss.backward()
    assert torch.count_nonzero(h.grad[[0, 7, 8, 19]]) == 0
    assert torch.count_nonzero(weight.grad[50:]) == 0
    reference = F.cross_entropy(h.detach() @ weight.detach()[:50].T, targets)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)


def test_custom_ignore_index_and_upstream_gradient_scale(chunk_bytes):
    model = _model()
    idx, targets = _batch()
    targets = torch.where(targets == -100, -1, targets)
    want_loss, want = _loss_and_grads(model, lambda: 3.0 * model(idx, targets, ignore_index=-1)[1])
    got_loss, got = _loss_and_grads(model, lambda: 3.0 * model(idx, targets, -1, return_logits=False)[1])
    assert got_loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    _assert_grads_close(got, want, rel=1e-5)


def test_bf16_autocast_is_close_to_the_fp32_reference(chunk_bytes):
    model = _model()
    idx, targets = _batch()
    ref_loss, ref = _loss_and_grads(model, lambda: model(idx, targets)[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain_loss, plain = _loss_and_grads(model, lambda: model(idx, targets)[1])
        got_loss, got = _loss_and_grads(model, lambda: model(idx, targets, return_logits=False)[1])
    assert got_loss.dtype == torch.float32
    # fp32 log-sum-exp over bf16 logits: the loss is as close as the plain autocast path's
    assert got_loss.item() == pytest.approx(plain_loss.item(), rel=1e-5)
    assert got_loss.item() == pytest.approx(ref_loss.item(), rel=1e-3)
    # bf16 matmuls (8-bit mantissa): ~1e-2 of each gradient's scale, as for the plain autocast path
    _assert_grads_close(plain, ref, rel=3e-2)
    _assert_grads_close(got, ref, rel=3e-2)
    assert all(g.dtype == torch.float32 for g in got.values())  # grads in the parameters' dtype
    assert torch.count_nonzero(got["transformer.wte.weight"][VOCAB:]) == 0


def test_bf16_weights_without_autocast_return_bf16_grads():
    """FSDP2's bf16 compute copies: no autocast, the inputs are bf16 themselves."""
    torch.manual_seed(0)
    h = torch.randn(12, 8, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(64, 8, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 50, (12,))
    loss = linear_cross_entropy(h, weight, targets, vocab_size=50)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == weight.grad.dtype == torch.bfloat16
    h32, w32 = h.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    F.cross_entropy(h32 @ w32[:50].T, targets).backward()
    assert loss.item() == pytest.approx(F.cross_entropy(h32 @ w32[:50].T, targets).item(), rel=1e-3)
    assert torch.allclose(h.grad.float(), h32.grad, rtol=0, atol=2e-2 * h32.grad.abs().max().item())
    assert torch.allclose(weight.grad.float(), w32.grad, rtol=0, atol=2e-2 * w32.grad.abs().max().item())


def test_no_grad_loss_equals_the_reference(chunk_bytes):
    model = _model().eval()
    idx, targets = _batch()
    with torch.no_grad():
        _, want = model(idx, targets)
        logits, got = model(idx, targets, return_logits=False)
    assert logits is None and not got.requires_grad
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_gradient_accumulation_over_two_micro_batches_equals_the_sum(chunk_bytes):
    model = _model()
    idx, targets = _batch()
    halves = [(idx[:2], targets[:2]), (idx[2:], targets[2:])]

    def accumulate(**kwargs) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        for x, y in halves:
            (model(x, y, **kwargs)[1] / 2).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    _assert_grads_close(accumulate(return_logits=False), accumulate(), rel=1e-5)


def test_return_logits_false_needs_targets():
    with pytest.raises(ValueError, match="needs targets"):
        _model()(torch.zeros(1, 4, dtype=torch.long), return_logits=False)


def test_second_backward_through_the_same_graph_is_refused():
    """backward scales the stored gradients in place, so a retained graph must not silently reuse them."""
    model = _model()
    idx, targets = _batch()
    _, loss = model(idx, targets, return_logits=False)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()
