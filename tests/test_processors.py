"""Logits processors and the sampler against values worked out by hand on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from gptforge.generation import processors as P
from gptforge.generation.sampling import Sampler, SamplingConfig

INF = float("inf")


def test_temperature_divides():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    assert torch.equal(P.apply_temperature(logits, 0.5), torch.tensor([[4.0, -2.0, 1.0]]))
    per_row = P.apply_temperature(torch.tensor([[2.0, 4.0], [2.0, 4.0]]), torch.tensor([[2.0], [0.5]]))
    assert torch.equal(per_row, torch.tensor([[1.0, 2.0], [4.0, 8.0]]))


def test_top_k_keeps_k_largest_and_ties():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 3.0]])
    assert torch.equal(P.apply_top_k(logits, 2), torch.tensor([[-INF, 5.0, -INF, 4.0, -INF]]))
    assert torch.equal(P.apply_top_k(logits, 3), torch.tensor([[-INF, 5.0, 3.0, 4.0, 3.0]]))  # tie at 3 kept
    assert torch.equal(P.apply_top_k(logits, 0), logits)
    rows = torch.tensor([[1.0, 5.0, 3.0], [9.0, 7.0, 8.0]])
    per_row = P.apply_top_k(rows, torch.tensor([[1], [2]]))
    assert torch.equal(per_row, torch.tensor([[-INF, 5.0, -INF], [9.0, -INF, 8.0]]))


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    logits = probs.log()
    # sorted: 0.5, 0.3, 0.15, 0.05; mass above each: 0, 0.5, 0.8, 0.95
    keep = lambda p: torch.isfinite(P.apply_top_p(logits, p))[0].tolist()
    assert keep(0.5) == [True, False, False, False]   # 0.5 already reaches 0.5
    assert keep(0.6) == [True, False, True, False]
    assert keep(0.85) == [True, False, True, True]
    assert keep(0.1) == [True, False, False, False]   # the top token always survives
    assert keep(1.0) == [True, True, True, True]
    per_row = P.apply_top_p(torch.cat([logits, logits]), torch.tensor([[0.6], [0.85]]))
    assert torch.isfinite(per_row).sum(dim=1).tolist() == [2, 3]


def test_min_p_relative_to_top_probability():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    out = P.apply_min_p(probs.log(), 0.4)  # threshold 0.4 * 0.5 = 0.2
    assert torch.isfinite(out)[0].tolist() == [True, False, True, False]
    out = P.apply_min_p(probs.log(), 0.25)  # threshold 0.125
    assert torch.isfinite(out)[0].tolist() == [True, False, True, True]


def test_repetition_penalty_is_sign_aware():
    logits = torch.tensor([[2.0, -2.0, 1.0, -0.5]])
    seen = torch.tensor([[True, True, False, False]])
    out = P.apply_repetition_penalty(logits, seen, 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -4.0, 1.0, -0.5]]))


def test_banned_ngrams_reference_and_incremental_index_agree():
    history = [1, 2, 3, 1, 2, 4, 1, 2]
    # trigrams starting with (1, 2): (1,2,3) and (1,2,4) -> next token after "1 2" may not be 3 or 4
    assert P.banned_ngram_tokens(history, 3) == {3, 4}
    assert P.banned_ngram_tokens(history, 2) == {3, 4}  # bigrams (2,3), (2,4)
    assert P.banned_ngram_tokens(history, 1) == {1, 2, 3, 4}
    assert P.banned_ngram_tokens([5, 6], 4) == set()
    index = P.NgramIndex(3)
    for i, token in enumerate(history):
        index.append(token)
        assert index.banned() == P.banned_ngram_tokens(history[:i + 1], 3)
    logits = torch.zeros(2, 6)
    out = P.apply_banned_tokens(logits, [{3, 4}, set()])
    assert torch.isinf(out).nonzero().tolist() == [[0, 3], [0, 4]]


def test_sampler_order_penalty_then_temperature_then_filters():
    # Greedy with a repetition penalty: token 0 (seen) drops from 3.0 to 1.5, so token 1 (2.0) wins.
    logits = torch.tensor([[3.0, 2.0, -1.0]])
    cfg = SamplingConfig(temperature=0.0, repetition_penalty=2.0)
    sampler = Sampler([cfg], [None], [[0]], vocab_size=3, device=torch.device("cpu"))
    assert sampler.choose(logits).tolist() == [1]
    # No-repeat bigram: history 1, 2, 1 -> after "1", token 2 is banned.
    cfg = SamplingConfig(temperature=0.0, no_repeat_ngram=2)
    sampler = Sampler([cfg], [None], [[1, 2, 1]], vocab_size=3, device=torch.device("cpu"))
    assert sampler.choose(torch.tensor([[0.0, 1.0, 9.0]])).tolist() == [1]


def test_sampler_frequencies_follow_filtered_distribution():
    # top_k=2 over probabilities 0.5, 0.3, 0.2 renormalises to 0.625 / 0.375 and never picks token 2.
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log().repeat(4000, 1)
    cfg = SamplingConfig(temperature=1.0, top_k=2)
    sampler = Sampler([cfg] * 4000, [None] * 4000, [[0]] * 4000, vocab_size=3, device=torch.device("cpu"))
    torch.manual_seed(0)
    counts = torch.bincount(sampler.choose(logits), minlength=3).tolist()
    assert counts[2] == 0
    assert abs(counts[0] / 4000 - 0.625) < 0.03  # ~4 standard deviations


def test_mixed_greedy_and_sampled_rows():
    logits = torch.tensor([[0.0, 1.0, 0.5]] * 2)
    configs = [SamplingConfig(temperature=0.0), SamplingConfig(temperature=1.0, top_k=1)]
    sampler = Sampler(configs, [1, 2], [[0], [0]], vocab_size=3, device=torch.device("cpu"))
    assert sampler.choose(logits).tolist() == [1, 1]


@pytest.mark.parametrize("value", [math.nan, -0.5])
def test_temperature_rejects_nan_and_negative(value):
    from gptforge.errors import UserError
    with pytest.raises(UserError, match="--temperature"):
        SamplingConfig(temperature=value)
