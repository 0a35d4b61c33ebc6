"""The shared scorer against log-probs computed by hand over the full, unpadded sequence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gptforge.errors import UserError
from gptforge.evals.scoring import Request, best_choice, encode_pair, score_requests
from gptforge.model import GPT


@pytest.fixture
def model(tiny_config):
    torch.manual_seed(0)
    return GPT(tiny_config).eval()


def hand_score(model: GPT, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """Sum of log_softmax over the whole unpadded sequence (left-truncated to block_size + 1 tokens)."""
    whole = (context + continuation)[-(model.config.block_size + 1):]
    with torch.no_grad():
        logits, _ = model(torch.tensor([whole[:-1]]))
    logprobs = F.log_softmax(logits[0].double(), dim=-1)
    n = len(continuation)
    positions = range(len(whole) - 1 - n, len(whole) - 1)
    total = sum(float(logprobs[p, whole[p + 1]]) for p in positions)
    greedy = all(int(logits[0, p].argmax()) == whole[p + 1] for p in positions)
    return total, greedy


def random_requests(n: int, vocab: int, seed: int = 1) -> list[Request]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        c = int(torch.randint(1, 20, (1,), generator=g))
        k = int(torch.randint(1, 6, (1,), generator=g))
        out.append(Request(torch.randint(0, vocab, (c,), generator=g).tolist(),
                           torch.randint(0, vocab, (k,), generator=g).tolist()))
    return out


def test_matches_hand_computation_batched_and_unbatched(model):
    requests = random_requests(9, model.config.vocab_size)
    one = score_requests(model, requests, batch_size=1)
    many = score_requests(model, requests, batch_size=4)
    for request, a, b in zip(requests, one, many):
        expected, greedy = hand_score(model, list(request.context), list(request.continuation))
        assert a.logprob == pytest.approx(expected, abs=1e-4)
        assert b.logprob == pytest.approx(expected, abs=1e-4)
        assert a.greedy == b.greedy == greedy
        assert a.n_tokens == len(request.continuation)


def test_padding_does_not_change_a_score(model):
    short = Request([5, 6, 7], [8, 9])
    long = Request(list(range(1, 29)), [3])
    alone = score_requests(model, [short], batch_size=1)[0]
    padded = score_requests(model, [short, long], batch_size=2)[0]  # short is padded by 26 positions here
    assert padded.logprob == pytest.approx(alone.logprob, abs=1e-5)


def test_long_context_is_truncated_from_the_left_keeping_the_continuation(model):
    block = model.config.block_size
    context = [(7 * i) % 100 for i in range(3 * block)]
    continuation = [11, 12, 13, 14]
    score = score_requests(model, [Request(context, continuation)])[0]
    expected, _ = hand_score(model, context, continuation)
    assert score.n_tokens == 4
    assert score.logprob == pytest.approx(expected, abs=1e-4)
    # Only the last block+1 tokens can matter: changing the far left of the context changes nothing.
    changed = [99] * block + context[block:]
    assert score_requests(model, [Request(changed, continuation)])[0].logprob == pytest.approx(score.logprob, abs=1e-5)


def test_continuation_longer_than_the_window_is_a_user_error(model):
    with pytest.raises(UserError, match="does not fit"):
        score_requests(model, [Request([1], list(range(model.config.block_size + 1)))])


def test_greedy_continuation_is_detected(model):
    context = [1, 2, 3]
    greedy_tokens = []
    seq = list(context)
    for _ in range(3):
        with torch.no_grad():
            nxt = int(model(torch.tensor([seq]))[0][0, -1].argmax())
        greedy_tokens.append(nxt)
        seq.append(nxt)
    wrong = greedy_tokens[:2] + [(greedy_tokens[2] + 1) % model.config.vocab_size]
    right, not_right = score_requests(model, [Request(context, greedy_tokens), Request(context, wrong)])
    assert right.greedy and not not_right.greedy


def test_one_token_choices_sharing_a_context(model):
    context = [4, 8, 15, 16, 23, 42]
    requests = [Request(context, [t]) for t in (10, 20, 30, 40)]
    for request, score in zip(requests, score_requests(model, requests, batch_size=3)):
        assert score.logprob == pytest.approx(hand_score(model, context, list(request.continuation))[0], abs=1e-4)


def test_bf16_model_log_probs_are_fp32_and_close(model):
    request = Request([1, 2, 3, 4, 5], [6, 7])
    reference = score_requests(model, [request])[0].logprob
    half = GPT(model.config).eval()
    half.load_state_dict(model.state_dict())
    half = half.to(torch.bfloat16)
    score = score_requests(half, [request])[0]
    assert isinstance(score.logprob, float)
    assert score.logprob == pytest.approx(reference, abs=0.05)


def test_acc_and_acc_norm_decisions_differ_where_they_should():
    # The longer ending (20 characters) has the lower total log-likelihood but the higher per-character one.
    lls = [-12.0, -10.0]
    lengths = [20, 5]
    assert best_choice(lls) == 1
    assert best_choice(lls, lengths) == 0
    assert best_choice([-1.0, -1.0, -3.0]) == 0  # ties go to the first, as np.argmax


def test_encode_pair_moves_trailing_space_and_conditions_empty_context_on_eot(gpt2_ranks):
    from gptforge.tokenizer import get_tokenizer
    tok = get_tokenizer("gpt2")
    ctx, cont = encode_pair(tok, "Hello ", "world")
    assert ctx == tok.encode("Hello") and cont == tok.encode(" world")
    ctx, cont = encode_pair(tok, "", "Hello")
    assert ctx == [tok.eot_id] and cont == tok.encode("Hello")
