"""Generation against references that recompute everything: the KV cache, batching, sliding, streaming."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from gptforge.config import ModelConfig
from gptforge.errors import UserError
from gptforge.generation import SamplingConfig, TokenGenerator, generate, generate_ids, generate_text
from gptforge.model import GPT

GREEDY = SamplingConfig(temperature=0.0, stop_at_eot=False)


def make_model(attention: str = "dense", vocab: int = 101, block: int = 24, window: int = 5,
               dtype: torch.dtype = torch.float32, seed: int = 0) -> GPT:
    """A tiny model with large random weights, so greedy decoding does not collapse to one repeated id."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab, block_size=block, n_layer=3, n_head=2, n_embd=16,
                         attention=attention, window=window)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.5)
    return model.to(dtype).eval()


def reference_greedy(model: GPT, prompt: list[int], n: int, keep: int | None = None) -> list[int]:
    """Recompute the whole context each step; past the context keep the last `keep` tokens (the engine's
    documented rule), with keep = block_size meaning the plain "last block_size tokens" crop."""
    block = model.config.block_size
    keep = block // 2 if keep is None else keep
    context, out = list(prompt[-block:]), []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([context]))
            token = int(logits[0, -1].float().argmax())
            out.append(token)
            context.append(token)
            if len(context) > block:
                context = context[-keep:]
    return out


@pytest.mark.parametrize("attention", ["dense", "alternating"])
def test_cached_greedy_equals_recompute_batch1(attention):
    model = make_model(attention)
    prompt = [3, 14, 15, 92, 65]
    got = generate_ids(model, [prompt], GREEDY.replace(max_new_tokens=15))[0]
    assert got == reference_greedy(model, prompt, 15)
    assert len(set(got)) > 3  # the reference is not a degenerate repeat


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("attention", ["dense", "alternating"])
def test_ragged_batch_equals_each_alone(attention, static):
    model = make_model(attention)
    prompts = [[7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [40, 41, 42, 43]]
    got = generate_ids(model, prompts, GREEDY.replace(max_new_tokens=12), static=static)
    for prompt, tokens in zip(prompts, got):
        assert tokens == reference_greedy(model, prompt, 12)


@pytest.mark.parametrize("attention", ["dense", "alternating"])
@pytest.mark.parametrize("keep", [None, 24, 7])
def test_generation_past_the_context(attention, keep):
    model = make_model(attention, block=24)
    prompts = [[5, 6, 7], list(range(30, 50))]  # the second overflows much earlier than the first
    got = generate_ids(model, prompts, GREEDY.replace(max_new_tokens=40), context_keep=keep)
    for prompt, tokens in zip(prompts, got):
        assert len(tokens) == 40
        assert tokens == reference_greedy(model, prompt, 40, keep)


def test_static_cache_path_past_the_context():
    """The fixed-shape decode step (what a CUDA graph captures) slides and masks like the dynamic one."""
    model = make_model("alternating", block=24)
    prompts = [[5, 6, 7], list(range(30, 50))]
    got = generate_ids(model, prompts, GREEDY.replace(max_new_tokens=30), static=True)
    assert got == [reference_greedy(model, p, 30) for p in prompts]


def test_prompt_longer_than_context_is_cut_with_a_warning():
    model = make_model()
    prompt = list(range(1, 40))
    with pytest.warns(UserWarning, match="keeping the last 24"):
        got = generate_ids(model, [prompt], GREEDY.replace(max_new_tokens=5))[0]
    assert got == reference_greedy(model, prompt[-24:], 5)


def test_bf16_cache_matches_bf16_recompute():
    model = make_model("alternating", dtype=torch.bfloat16)
    prompt = [9, 8, 7]
    got = generate_ids(model, [prompt], GREEDY.replace(max_new_tokens=8))[0]
    ref = reference_greedy(model, prompt, 8)
    # bf16 rounding may differ between the cached and full paths; the first tokens must agree
    assert got[:3] == ref[:3]


def test_padded_vocab_ids_never_sampled():
    model = make_model(vocab=70)  # padded to 128 rows
    assert model.config.padded_vocab_size == 128
    with torch.no_grad():  # make the padding rows the most attractive if they were reachable
        model.transformer.wte.weight[70:] = 100.0
    out = generate_ids(model, [[1, 2]] * 4, SamplingConfig(max_new_tokens=30, temperature=2.0, stop_at_eot=False), seed=0)
    assert all(0 <= t < 70 for row in out for t in row)


def test_seeds_reproducible_and_independent_of_batch():
    model = make_model()
    config = SamplingConfig(max_new_tokens=12, temperature=1.0, stop_at_eot=False)
    a = generate_ids(model, [[1, 2, 3]] * 3, config, seed=123)
    b = generate_ids(model, [[1, 2, 3]] * 3, config, seed=123)
    c = generate_ids(model, [[1, 2, 3]] * 3, config, seed=124)
    assert a == b and a != c
    assert len({tuple(r) for r in a}) > 1  # samples of one seed differ from each other
    # each row's sample depends on its own seed only: row 1 alone, given row 1's seed, is the same
    from gptforge.generation.sampling import row_seed
    alone = generate_ids(model, [[1, 2, 3]], config, seed=[row_seed(123, 1)])
    assert alone[0] == a[1]


def test_eot_ends_a_sequence_and_is_not_returned():
    model = make_model()
    first = reference_greedy(model, [1, 2], 6)
    eot = first[3]  # pretend the 4th greedy token is end-of-text
    out = generate_ids(model, [[1, 2]], SamplingConfig(max_new_tokens=6, temperature=0), eot_id=eot)[0]
    assert out == first[:first.index(eot)]


def test_any_of_several_end_ids_ends_a_sequence():
    """A chat reply has several end ids (chat.tokens.reply_end_ids): the first of them to come ends it."""
    model = make_model()
    first = reference_greedy(model, [1, 2], 8)
    ends = {first[5], first[2], 10_000}  # whichever comes first ends it; an id never drawn changes nothing
    out = generate_ids(model, [[1, 2]], SamplingConfig(max_new_tokens=8, temperature=0), eot_id=ends)[0]
    cut = min(first.index(t) for t in ends if t in first)
    assert out == first[:cut]


def test_rows_finishing_early_do_not_disturb_the_others():
    model = make_model()
    configs = [GREEDY.replace(max_new_tokens=n) for n in (2, 15, 1, 9)]
    prompts = [[1], [2, 3], [4, 5, 6], [7]]
    got = generate_ids(model, prompts, configs)
    for prompt, cfg, tokens in zip(prompts, configs, got):
        assert tokens == reference_greedy(model, prompt, cfg.max_new_tokens)


class BytesTokenizer:
    """Ids 0..255 are bytes, 256 is end-of-text: multi-byte characters span several tokens."""
    vocab_size = 257
    eot_id = 256

    def encode(self, text, allowed_special=False):
        return list(text.encode("utf-8"))

    def decode_bytes(self, ids):
        return bytes(i for i in ids if i < 256)

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def test_streaming_equals_non_streaming_and_splits_no_character():
    model = make_model(vocab=257, block=64)
    tok = BytesTokenizer()
    config = SamplingConfig(max_new_tokens=40, temperature=1.0)
    texts = generate_text(model, tok, ["é", "日本"], config, num_samples=2, seed=5)
    pieces = ["", "", "", ""]
    ids = [[], [], [], []]
    for event in generate(model, tok, ["é", "日本"], config, num_samples=2, seed=5):
        pieces[event.index] += event.text
        if event.token != tok.eot_id:
            ids[event.index].append(event.token)
    assert pieces == texts
    assert texts == [tok.decode(i) for i in ids]


def test_stop_strings_cut_the_text_and_are_never_streamed():
    model = make_model(vocab=257, block=64)
    tok = BytesTokenizer()
    free = generate_text(model, tok, "ab", SamplingConfig(max_new_tokens=30, temperature=0, stop_at_eot=False))[0]
    stop = free[5:8]
    assert len(stop) == 3
    events = list(generate(model, tok, "ab", SamplingConfig(max_new_tokens=30, temperature=0, stop=(stop,),
                                                               stop_at_eot=False)))
    streamed = "".join(e.text for e in events)
    assert streamed == free[:free.index(stop)]
    assert events[-1].finish_reason == "stop"
    assert len(events) < 30  # generation ended at the stop string


def test_empty_prompt_starts_from_eot():
    model = make_model(vocab=257, block=64)
    tok = BytesTokenizer()
    text = generate_text(model, tok, "", SamplingConfig(max_new_tokens=6, temperature=0, stop_at_eot=False))[0]
    assert text == tok.decode(reference_greedy(model, [256], 6))


@pytest.mark.parametrize("kwargs, option", [
    (dict(top_p=0.0), "--top-p"), (dict(top_p=1.5), "--top-p"), (dict(temperature=-1.0), "--temperature"),
    (dict(top_k=-1), "--top-k"), (dict(max_new_tokens=0), "--max-new-tokens"),
])
def test_bad_settings_name_the_option(kwargs, option):
    with pytest.raises(UserError, match=option):
        SamplingConfig(**kwargs)


def test_prompt_ids_outside_vocab_rejected():
    with pytest.raises(UserError, match="outside the vocabulary"):
        generate_ids(make_model(), [[1, 500]], GREEDY)


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "gptforge", "sample", *args], capture_output=True, text=True,
                              timeout=120)
    for args, needle in [(["--model", str(tmp_path / "missing"), "hi"], "no such path"),
                         (["--model", "dev-17m", "--top-p", "2", "hi"], "--top-p")]:
        result = run(*args)
        assert result.returncode == 2, result.stderr
        assert needle in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_cache_keeps_keys_in_the_dtype_the_forward_computes():
    """FSDP2 computes in bf16 from fp32 shards, and autocast does the same: the cache must hold what the
    forward produces (bf16 keys), not the dtype the weights are stored in (fp32)."""
    model = make_model("alternating", vocab=50, block=16, window=4, seed=1)  # band layers: the ring path too
    prompts = [[1, 2, 3, 4, 5, 6], [7]]  # ragged: the short row is padded in the batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = generate_ids(model, prompts, GREEDY.replace(max_new_tokens=8))
        expected = [reference_greedy(model, prompt, 8) for prompt in prompts]  # the same autocast, no cache
    assert out == expected
    assert all(len(set(ids)) > 2 for ids in expected)  # not a degenerate repeat


def test_generation_runs_in_eval_mode_and_restores_the_callers_mode():
    """A model left in training mode (a trainer writing samples) must not sample with dropout."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=101, block_size=24, n_layer=2, n_head=2, n_embd=16, dropout=0.5)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.5)
    model.train()
    got = generate_ids(model, [[1, 2, 3]], GREEDY.replace(max_new_tokens=10))[0]
    assert model.training  # the caller's mode is back
    model.eval()
    assert got == reference_greedy(model, [1, 2, 3], 10)  # what the model without dropout does
    model.train()
    engine = TokenGenerator(model, [[1, 2, 3]], [GREEDY.replace(max_new_tokens=10)], [None])
    steps = iter(engine)
    next(steps)
    assert not model.training  # during generation
    assert not torch.is_inference_mode_enabled()  # but the caller's code between steps runs as usual
    steps.close()  # abandoned half-way (a client hung up): the mode still comes back
    assert model.training


def test_ids_the_tokenizer_cannot_decode_are_never_produced():
    """An imported model may have more ids than its tokenizer (nanoGPT's padded 50304 over GPT-2's 50257)."""
    model = make_model(vocab=300, block=64)
    tok = BytesTokenizer()  # 257 ids
    with torch.no_grad():  # make the ids past the tokenizer the most attractive by far
        model.transformer.wte.weight[257:300] = 50.0
    config = SamplingConfig(max_new_tokens=20, temperature=1.0, stop_at_eot=False)
    unrestricted = generate_ids(model, [[1, 2]] * 4, config, seed=0)
    assert any(t >= 257 for row in unrestricted for t in row)  # the test has teeth
    restricted = generate_ids(model, [[1, 2]] * 4, config, seed=0, vocab_size=257)
    assert all(0 <= t < 257 for row in restricted for t in row)
    events = list(generate(model, tok, ["ab"] * 2, config, seed=0))  # the text API limits to the tokenizer
    assert len(events) == 40 and all(0 <= e.token < 257 for e in events)
