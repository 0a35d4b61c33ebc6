"""`gptforge serve` through the official openai client (max_retries=0) against a live server on 127.0.0.1:
the protocol's shapes, text equal to ChatSession / generate on the same tiny model, seeds, n, stop,
logprobs, auth, error bodies, continuous batching under 16 concurrent streams, and a client that leaves."""

from __future__ import annotations

import json
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the serve tests need fastapi: pip install -e '.[dev]'")
openai = pytest.importorskip("openai", reason="the serve tests need the openai client: pip install -e '.[dev]'")
httpx = pytest.importorskip("httpx", reason="the serve tests need httpx: pip install -e '.[dev]'")

import torch  # noqa: E402
from chat_models import chat_tokenizer, random_chat_model  # noqa: E402
from serve_helpers import serving  # noqa: E402

from gptforge.chat import ChatSession  # noqa: E402
from gptforge.chat.tokens import encode_chat_prompt  # noqa: E402
from gptforge.config import ModelConfig  # noqa: E402
from gptforge.generation import SamplingConfig, generate_text  # noqa: E402
from gptforge.model import GPT  # noqa: E402
from gptforge.serve import create_app  # noqa: E402
from gptforge.serve.app import ServeSettings  # noqa: E402

NAME = "tiny-chat"
USER = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer("bpe")


@pytest.fixture(scope="module")
def model(tok):
    # replies end (greedily) at one of these positions: some requests stop, longer ones hit max_tokens
    return random_chat_model(tok, end_at=list(range(70, 256, 37)), block_size=256)


@pytest.fixture(scope="module")
def server(model, tok):
    app = create_app(model, tok, name=NAME, settings=ServeSettings(max_rows=8, max_body_bytes=200_000))
    with serving(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def greedy_session(model, tok, max_tokens, system=None):
    return ChatSession(model, tok, SamplingConfig(temperature=0, max_new_tokens=max_tokens), system=system)


# ---- chat --------------------------------------------------------------------------------------------------

def test_greedy_chat_is_chat_sessions_reply(client, model, tok):
    session = greedy_session(model, tok, 200, system="Be brief.")
    expected = session.ask("hello there")
    r = client.chat.completions.create(model=NAME, temperature=0, max_tokens=200,
                                       messages=[{"role": "system", "content": "Be brief."}, *USER])
    choice = r.choices[0]
    assert choice.message.content == expected and choice.message.role == "assistant"
    assert choice.finish_reason == session.last.finish_reason == "stop"
    prompt = encode_chat_prompt(tok, [{"role": "system", "content": "Be brief."}, *USER])
    # the end-of-turn token is generated (and counted) but not part of the text
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == session.last.generated_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.object == "chat.completion" and r.model == NAME and r.id.startswith("chatcmpl-")
    # a second turn: the whole conversation is the prompt, as in the session
    second = session.ask("and the fox?")
    r2 = client.chat.completions.create(model=NAME, temperature=0, max_tokens=200, messages=session.messages[:-1])
    assert r2.choices[0].message.content == second


def test_max_tokens_and_max_completion_tokens_end_with_length(client, model, tok):
    expected = greedy_session(model, tok, 5).ask("hello there")
    for field in ("max_tokens", "max_completion_tokens"):
        r = client.chat.completions.create(model=NAME, temperature=0, messages=USER, **{field: 5})
        assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 5


def test_streamed_chat_has_role_first_finish_last_usage_and_done(server, client, model, tok):
    whole = client.chat.completions.create(model=NAME, temperature=0, max_tokens=200, messages=USER)
    chunks = list(client.chat.completions.create(model=NAME, temperature=0, max_tokens=200, messages=USER,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    # on the wire: data: lines, ending with [DONE]; no usage chunk unless asked
    with httpx.stream("POST", server[0] + "/v1/chat/completions", timeout=30,
                      json={"messages": USER, "temperature": 0, "max_tokens": 3, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(line[6:]) for line in lines[:-1])


def test_ignore_eos_generates_max_tokens(client, model, tok):
    """vLLM's extension (benchmarks use it): the end-of-turn token does not end the reply."""
    r = client.chat.completions.create(model=NAME, temperature=0, max_tokens=150, messages=USER,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 150
    assert r.choices[0].message.content.startswith(greedy_session(model, tok, 150).ask("hello there"))


def test_stop_strings_cut_the_reply_and_are_not_included(client, model, tok):
    full = greedy_session(model, tok, 200).ask("hello there")
    stop = full[3:5]
    assert stop and stop in full
    for value in (stop, [stop, "never-appears"]):
        r = client.chat.completions.create(model=NAME, temperature=0, max_tokens=200, messages=USER, stop=value)
        assert r.choices[0].message.content == full[: full.index(stop)]
        assert r.choices[0].finish_reason == "stop"


def test_n_choices_with_a_seed_replay_and_differ_between_seeds(client):
    def ask(seed, n=3):
        r = client.chat.completions.create(model=NAME, temperature=1.0, max_tokens=20, messages=USER, n=n, seed=seed)
        assert [c.index for c in r.choices] == list(range(n))
        return [c.message.content for c in r.choices]

    first = ask(7)
    assert ask(7) == first
    assert len(set(first)) > 1  # three draws, not one copied three times
    assert ask(8) != first
    assert ask(7, n=1) == first[:1]  # choice 0 draws from the same seed whatever n is


def test_streamed_n_choices_equal_the_non_streamed_ones(client):
    request = dict(model=NAME, temperature=1.0, max_tokens=15, messages=USER, n=3, seed=11)
    whole = client.chat.completions.create(**request)
    texts, reasons = ["", "", ""], [None] * 3
    for chunk in client.chat.completions.create(stream=True, **request):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            reasons[c.index] = c.finish_reason or reasons[c.index]
    assert texts == [c.message.content for c in whole.choices]
    assert reasons == [c.finish_reason for c in whole.choices]


def test_a_reply_ends_where_the_model_opens_a_new_message_as_in_chat_sessions(tok):
    """A model that writes <|im_start|> has ended its reply: the server stops there, as ChatSession does,
    instead of streaming the marker as text (chat.tokens.reply_end_ids is the one rule)."""
    from gptforge.chat.template import IM_START
    prompt = encode_chat_prompt(tok, USER)
    opener = random_chat_model(tok, end_at=[len(prompt) + 3], marker=IM_START, block_size=64)
    expected = greedy_session(opener, tok, 12).ask("hello there")
    with serving(create_app(opener, tok, name=NAME)) as url:
        r = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60).chat.completions.create(
            model=NAME, temperature=0, max_tokens=12, messages=USER)
    assert r.choices[0].message.content == expected and IM_START not in expected
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 5


def test_n_greedy_choices_are_all_the_greedy_reply(client, model, tok):
    expected = greedy_session(model, tok, 200).ask("hello there")
    r = client.chat.completions.create(model=NAME, temperature=0, max_tokens=200, messages=USER, n=3)
    assert [c.message.content for c in r.choices] == [expected] * 3
    single = client.chat.completions.create(model=NAME, temperature=0, max_tokens=200, messages=USER)
    assert r.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt once, not once per choice
    assert r.usage.completion_tokens == 3 * single.usage.completion_tokens


def test_chat_logprobs_are_the_models_log_softmax(client, model, tok):
    r = client.chat.completions.create(model=NAME, temperature=0, max_tokens=4, messages=USER, logprobs=True,
                                       top_logprobs=3)
    prompt = encode_chat_prompt(tok, USER)
    content = r.choices[0].logprobs.content
    ids = list(prompt)
    with torch.no_grad():
        for entry in content:
            logprobs = torch.log_softmax(model(torch.tensor([ids]))[0][0, -1].float(), -1)
            best = int(logprobs.argmax())
            assert entry.token == tok.decode([best]) and entry.logprob == pytest.approx(float(logprobs[best]), abs=1e-4)
            assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
            assert bytes(entry.bytes) == tok.decode_bytes([best])
            ids.append(best)
    assert "".join(e.token for e in content) == r.choices[0].message.content


@pytest.mark.parametrize("kind", ["chat", "base"])
def test_the_end_token_has_its_logprobs_entry_like_every_counted_token(kind):
    """lm-evaluation-harness's local-completions scores a text with echo, logprobs 1 and max_tokens 1 and drops
    the LAST entry as the generated token's: when that token is an end token (<|im_end|> of a chat model,
    <|endoftext|> of a base model) it must be listed (as OpenAI, vLLM and llama.cpp list it, under its
    marker text), or the real last token of the text is dropped. Chat logprobs likewise: one entry per
    token counted in usage.completion_tokens, the end token's last."""
    from chat_models import scripted_model

    from gptforge.tokenizer import CharTokenizer

    tok = chat_tokenizer("char") if kind == "chat" else CharTokenizer.train(["hello world, the quick brown fox"])
    end = tok.special_tokens["<|im_end|>"] if kind == "chat" else tok.eot_id
    marker = "<|im_end|>" if kind == "chat" else "<|endoftext|>"
    text = "the quick brown fox"
    ids = tok.encode(text)
    chat_prompt = encode_chat_prompt(tok, USER) if kind == "chat" else []
    # greedy: after the echoed text comes the end token; a chat reply is "ab" then the end token
    script = {len(ids) - 1: end}
    if kind == "chat":
        a, b = tok.encode("ab")
        script.update({len(chat_prompt) - 1: a, len(chat_prompt): b, len(chat_prompt) + 1: end})
    model = scripted_model(tok.vocab_size, script, block_size=64, default=tok.encode("x")[0])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids]))[0][0, :, : tok.vocab_size].float(), -1)
    with serving(create_app(model, tok, name=NAME)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
        request = dict(model=NAME, prompt=ids, echo=True, logprobs=1, max_tokens=1, temperature=0)
        for r in (client.completions.create(**request),
                  _streamed_completion(client.completions.create(stream=True, stream_options={"include_usage": True},
                                                                 **request))):
            lp = r.choices[0].logprobs
            assert r.choices[0].text == text and r.choices[0].finish_reason == "stop"
            assert lp.tokens == [tok.decode([t]) for t in ids] + [marker]
            assert lp.token_logprobs[1:] == pytest.approx([float(logprobs[i, t]) for i, t in
                                                           enumerate(ids[1:] + [end])], abs=1e-5)
            assert lp.text_offset[-1] == len(text)
            # what lm-eval sums: every entry but the last (the generated token's) scores the text
            assert len(lp.tokens) - len(ids) == 1 == r.usage.completion_tokens
        if kind == "chat":
            chat = dict(model=NAME, messages=USER, temperature=0, max_tokens=10, logprobs=True, top_logprobs=2)
            whole = client.chat.completions.create(**chat)
            entries = whole.choices[0].logprobs.content
            assert whole.choices[0].message.content == "ab" and whole.choices[0].finish_reason == "stop"
            assert [e.token for e in entries] == ["a", "b", marker] and bytes(entries[-1].bytes) == marker.encode()
            assert len(entries) == whole.usage.completion_tokens == 3
            with torch.no_grad():
                last = torch.log_softmax(model(torch.tensor([chat_prompt + [a, b]]))[0][0, -1, : tok.vocab_size], -1)
            assert entries[-1].logprob == pytest.approx(float(last[end]), abs=1e-5)
            chunks = client.chat.completions.create(stream=True, **chat)
            streamed = [e.token for chunk in chunks for c in chunk.choices if c.logprobs for e in c.logprobs.content]
            assert streamed == ["a", "b", marker]


def _streamed_completion(chunks):
    """A streamed completion (one choice) put back together: its text, logprobs and usage."""
    from types import SimpleNamespace

    text, fields, reason, usage = "", {"tokens": [], "token_logprobs": [], "text_offset": []}, None, None
    for chunk in chunks:
        usage = chunk.usage or usage
        for c in chunk.choices:
            text += c.text
            reason = c.finish_reason or reason
            for f in fields:
                fields[f] += getattr(c.logprobs, f) if c.logprobs else []
    return SimpleNamespace(choices=[SimpleNamespace(text=text, finish_reason=reason,
                                                    logprobs=SimpleNamespace(**fields))], usage=usage)


def _a_reply_to_cut(client, request):
    """(its logprobs entries, k, stop): a seeded reply with a stop string of two ASCII tokens starting at
    token k (after an ASCII token, so no character straddles the cut), found nowhere earlier."""
    for seed in range(20):
        whole = client.chat.completions.create(seed=seed, **request).choices[0]
        entries = whole.logprobs.content
        for k in range(2, len(entries) - 1):
            if all(e.bytes and max(e.bytes) < 128 for e in entries[k - 1:k + 2]):
                stop = entries[k].token + entries[k + 1].token
                before = bytes(b for e in entries[:k] for b in e.bytes).decode("utf-8", "replace")
                if whole.message.content.find(stop) == len(before):
                    return seed, entries, k, stop
    pytest.fail("no seeded reply had a place to cut")


def test_chat_logprobs_end_where_a_stop_string_cuts_the_content(client):
    """The tokens of the stop string (and any after it) are not in the content, nor in its logprobs,
    streamed or not."""
    def key(entries):
        return [(e.token, round(e.logprob, 5), [t.token for t in e.top_logprobs]) for e in entries]

    request = dict(model=NAME, messages=USER, temperature=0.7, max_tokens=30, logprobs=True, top_logprobs=2)
    seed, entries, k, stop = _a_reply_to_cut(client, request)
    cut = client.chat.completions.create(seed=seed, stop=stop, **request).choices[0]
    assert cut.finish_reason == "stop" and key(cut.logprobs.content) == key(entries[:k])
    chunks = client.chat.completions.create(seed=seed, stop=stop, stream=True, **request)
    streamed = [e for chunk in chunks for c in chunk.choices if c.logprobs for e in c.logprobs.content]
    assert key(streamed) == key(entries[:k])


def test_frequency_penalty_is_openais_rule(client, model, tok):
    """Greedy with frequency_penalty f: each step's logits minus f x the count of each token in the reply."""
    ids = encode_chat_prompt(tok, USER)
    reply = []
    with torch.no_grad():
        for _ in range(12):
            logits = model(torch.tensor([ids + reply]))[0][0, -1, : tok.vocab_size].float()
            for t in set(reply):
                logits[t] -= 1.5 * reply.count(t) + 0.5
            reply.append(int(logits.argmax()))
    expected = tok.decode(reply[: reply.index(tok.special_tokens["<|im_end|>"])] if tok.special_tokens["<|im_end|>"]
                          in reply else reply)
    r = client.chat.completions.create(model=NAME, temperature=0, max_tokens=12, messages=USER,
                                       frequency_penalty=1.5, presence_penalty=0.5)
    assert r.choices[0].message.content == expected
    plain = client.chat.completions.create(model=NAME, temperature=0, max_tokens=12, messages=USER)
    assert plain.choices[0].message.content != expected  # the penalty changed something


# ---- completions -----------------------------------------------------------------------------------------

def test_completions_greedy_equal_generate_text(client, model, tok):
    expected = generate_text(model, tok, "the quick", SamplingConfig(temperature=0, max_new_tokens=12))[0]
    r = client.completions.create(model=NAME, prompt="the quick", temperature=0, max_tokens=12)
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "length"
    assert r.object == "text_completion" and r.usage.prompt_tokens == len(tok.encode("the quick"))
    chunks = list(client.completions.create(model=NAME, prompt="the quick", temperature=0, max_tokens=12,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == 12


def test_completions_of_several_prompts_and_token_ids(client, model, tok):
    prompts = ["the quick", "lazy dog"]
    expected = generate_text(model, tok, prompts, SamplingConfig(temperature=0, max_new_tokens=6))
    r = client.completions.create(model=NAME, prompt=prompts, temperature=0, max_tokens=6)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == expected
    r = client.completions.create(model=NAME, prompt=[tok.encode(p) for p in prompts], temperature=0, max_tokens=6)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == expected


def test_echo_logprobs_score_the_prompt_as_the_model_does(client, model, tok):
    """What lm-evaluation-harness's local-completions reads: prompt-token log-probs with echo."""
    ids = tok.encode("the quick brown fox")
    r = client.completions.create(model=NAME, prompt=ids, temperature=0, max_tokens=1, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids]))[0][0, :, : tok.vocab_size].float(), -1)
    expected = [float(logprobs[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(ids) + 1
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(expected, abs=1e-4)
    assert r.choices[0].text.startswith("the quick brown fox")
    # max_tokens 0 with echo: only the prompt, scored
    r0 = client.completions.create(model=NAME, prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert r0.choices[0].logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert r0.choices[0].text == "the quick brown fox" and r0.usage.completion_tokens == 0


@pytest.mark.parametrize("echo", [False, True])
def test_streamed_completion_logprobs_equal_the_non_streamed_ones(client, tok, echo):
    """Chunk by chunk, the tokens, their logprobs and their offsets in the text (running across chunks, the
    echoed prompt's first) add up to the non-streamed response's."""
    request = dict(model=NAME, prompt="the quick", temperature=0.8, seed=3, max_tokens=10, n=2, logprobs=2, echo=echo)
    whole = client.completions.create(**request)
    fields = ("tokens", "token_logprobs", "text_offset")
    streamed = {c: {f: [] for f in fields} for c in range(2)}
    texts = ["", ""]
    for chunk in client.completions.create(stream=True, **request):
        for c in chunk.choices:
            texts[c.index] += c.text
            for f in fields:
                streamed[c.index][f] += getattr(c.logprobs, f) if c.logprobs else []
    for c in whole.choices:
        assert texts[c.index] == c.text
        assert streamed[c.index]["tokens"] == c.logprobs.tokens
        assert streamed[c.index]["text_offset"] == c.logprobs.text_offset
        assert streamed[c.index]["token_logprobs"] == c.logprobs.token_logprobs  # the same rows, computed alike
        assert len(c.logprobs.tokens) == 10 + (len(tok.encode("the quick")) if echo else 0)


# ---- models, health, auth --------------------------------------------------------------------------------

def test_models_lists_the_served_model(client, server):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).owned_by == "gptforge"
    assert httpx.get(server[0] + "/health", timeout=10).json() == {"status": "ok"}
    created = client.models.list().data[0].created
    time.sleep(1.1)
    assert client.models.retrieve(NAME).created == client.models.list().data[0].created == created <= time.time()


def test_api_key_is_required_on_v1_but_not_on_health(model, tok):
    app = create_app(model, tok, name=NAME, settings=ServeSettings(api_key="s3cret"))
    with serving(app) as url:
        for key in ("wrong", "s3cre"):
            bad = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)
            with pytest.raises(openai.AuthenticationError) as e:
                bad.models.list()
            assert e.value.body["code"] == "invalid_api_key"
        assert httpx.post(url + "/v1/chat/completions", json={"messages": USER}, timeout=10).status_code == 401
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0, timeout=30)
        assert good.chat.completions.create(model=NAME, messages=USER, max_tokens=2).usage.completion_tokens <= 2
        assert httpx.get(url + "/health", timeout=10).status_code == 200


def test_a_key_beyond_ascii_is_compared_as_utf8_bytes(model, tok):
    key = "clé-ü"
    app = create_app(model, tok, name=NAME, settings=ServeSettings(api_key=key))
    with serving(app) as url:
        def status(header: bytes) -> int:
            return httpx.get(url + "/v1/models", headers={"Authorization": header}, timeout=10).status_code

        assert status(b"Bearer " + key.encode()) == 200
        assert status(b"Bearer " + key.encode("latin-1")) == 401  # other bytes, however a server might decode them
        assert status(b"Bearer " + key.encode()[:-1]) == 401


def test_health_is_503_while_the_model_loads(model, tok):
    go = threading.Event()

    def loader():
        assert go.wait(30)
        return model, tok

    app = create_app(name=NAME, loader=loader)
    with serving(app) as url:
        assert httpx.get(url + "/health", timeout=10).status_code == 503
        r = httpx.post(url + "/v1/chat/completions", json={"messages": USER}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
        go.set()
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.get(url + "/health", timeout=10).json() == {"status": "ok"}


# ---- errors ----------------------------------------------------------------------------------------------

def _error(excinfo, status):
    assert excinfo.value.status_code == status
    body = excinfo.value.body
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    return body


def test_unknown_model_is_404_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=USER)
    assert _error(e, 404)["code"] == "model_not_found"


def test_prompt_past_the_context_says_by_how_much(client, tok):
    text = "hello world " * 200
    prompt = encode_chat_prompt(tok, [{"role": "user", "content": text}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": text}])
    body = _error(e, 400)
    assert body["code"] == "context_length_exceeded" and f"by {len(prompt) - 256 + 1} tokens" in body["message"]


@pytest.mark.parametrize("fields, param", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -5}, "max_tokens"), ({"max_tokens": 10 ** 9}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"), ({"n": 10 ** 6}, "n"), ({"n": 0}, "n"),
    ({"temperature": -1}, "temperature"), ({"temperature": 3}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"stop": ""}, "stop"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"presence_penalty": 5}, "presence_penalty"),
    ({"top_logprobs": 3}, "top_logprobs"), ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
])
def test_bad_fields_are_400_naming_the_field(client, fields, param):
    body = {"model": NAME, "messages": USER, **fields}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**body)
    assert _error(e, 400)["param"].startswith(param)


PROMPT_TYPES = "prompt: must be a string, a list of strings, a list of token ids or a list of lists of token ids"


@pytest.mark.parametrize("path, fields, message", [
    ("/v1/chat/completions", {"stop": ["a", "b", "c", "d", "e"]}, "stop: at most 4 stop sequences, got 5"),
    ("/v1/chat/completions", {"stop": 5}, "stop: must be a string or a list of at most 4 strings"),
    ("/v1/chat/completions", {"stop": ["a", 1]}, "stop: must be a string or a list of at most 4 strings"),
    ("/v1/completions", {"prompt": {"a": 1}}, PROMPT_TYPES),
    ("/v1/completions", {"prompt": [1.5]}, PROMPT_TYPES),
    ("/v1/completions", {"prompt": [[1, 2], "a"]}, PROMPT_TYPES),
    ("/v1/completions", {"prompt": [True]}, PROMPT_TYPES),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]},
     'messages.0.content: must be a string or a list of text parts ({"type": "text", "text": "..."})'),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content: part 0 is of type 'image_url': only text parts"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
     'messages.0.content: part 0 has no "text" string'),
])
def test_a_field_of_several_types_says_what_it_takes(server, path, fields, message):
    """A union-typed field's error says what the field takes (pydantic alone reported each type in turn:
    five stop strings were 'stop.str: Input should be a valid string')."""
    body = {"messages": USER, "prompt": "hi", "max_tokens": 2, **fields}
    r = httpx.post(server[0] + path, json=body, timeout=30)
    error = r.json()["error"]
    assert r.status_code == 400 and error["message"].startswith(message), error
    assert error["param"] == message.split(":")[0]
    assert not any(t in error["message"] for t in (".str", "list[", "Input should")), error


@pytest.mark.parametrize("fields", [
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]},
    {"tool_choice": "required"},
])
def test_fields_not_supported_yet_are_refused_by_name(client, fields):
    """Ignoring them answered free text to a client that asked for JSON (LangChain's JSON mode then failed on
    its own side): the official client raises BadRequestError naming the field."""
    field = next(iter(fields))
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=USER, max_tokens=2, **fields)
    body = _error(e, 400)
    assert body["param"] == field and body["message"].startswith(field) and "not supported" in body["message"]


def test_the_off_values_of_unsupported_fields_are_fine(client):
    r = client.chat.completions.create(model=NAME, messages=USER, max_tokens=2, response_format={"type": "text"},
                                       tools=[], tool_choice="none", logit_bias={})
    assert r.choices[0].finish_reason in ("stop", "length")
    assert client.completions.create(model=NAME, prompt="hi", max_tokens=2, logit_bias={}).choices


def test_chat_on_a_base_model_says_to_run_sft():
    from gptforge.tokenizer import CharTokenizer

    tok = CharTokenizer.train(["hello world, the quick brown fox"])
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=1, n_embd=16)).eval()
    app = create_app(model, tok, name="base")
    with serving(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="base", messages=USER)
        assert "gptforge sft" in _error(e, 400)["message"]
        expected = generate_text(model, tok, "hello", SamplingConfig(temperature=0, max_new_tokens=5))[0]
        r = client.completions.create(model="base", prompt="hello", temperature=0, max_tokens=5)
        assert r.choices[0].text == expected


def test_unknown_fields_are_ignored(server):
    r = httpx.post(server[0] + "/v1/chat/completions", timeout=30,
                   json={"messages": USER, "max_tokens": 2, "user": "me", "tools_whatever": {"a": 1}, "logit_bias": {}})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_full_queue_is_429(model, tok):
    from gptforge.serve.batcher import Job

    app = create_app(model, tok, name=NAME, settings=ServeSettings(max_rows=1, max_queued=1))
    gate, busy = threading.Event(), threading.Event()

    def hold(event):  # runs in the generation loop: holds it (and the one row) until the gate opens
        busy.set()
        gate.wait(30)

    config = SamplingConfig(max_new_tokens=3)
    held = Job([1, 2, 3], [config], [None], hold)
    queued = Job([1, 2, 3], [config], [None], lambda event: None)
    with serving(app) as url:
        try:
            app.state.batcher.submit([held])
            assert busy.wait(30)
            app.state.batcher.submit([queued])  # waits: the queue (1) is now full
            r = httpx.post(url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 1}, timeout=30)
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
            queued.cancel()  # a waiting client that leaves frees its place in the queue
            app.state.batcher.submit([Job([1, 2], [config], [None], lambda event: None)])
        finally:
            held.cancel(), queued.cancel()
            gate.set()


def test_more_prompts_than_the_queue_holds_is_400_not_429(model, tok):
    """Each prompt is one queued job: a request with more prompts than --max-queued could never be queued, so
    it is a 400 saying so, not a 429 that retrying never fixes."""
    app = create_app(model, tok, name=NAME, settings=ServeSettings(max_queued=2))
    with serving(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=NAME, prompt=["a", "b", "c"], max_tokens=2)
        body = _error(e, 400)
        assert body["param"] == "prompt" and "3 prompts" in body["message"] and "2" in body["message"]
        assert len(client.completions.create(model=NAME, prompt=["a", "b"], max_tokens=2).choices) == 2


# ---- continuous batching ---------------------------------------------------------------------------------

def test_a_client_that_disconnects_stops_its_row(model, tok):
    slow = random_chat_model(tok, end_at=[1023], block_size=1024, n_embd=256)  # ~1 ms a token: 1000 take a while
    app = create_app(slow, tok, name=NAME)
    batcher = None
    with serving(app) as url:
        batcher = app.state.batcher
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=30,
                          json={"messages": USER, "max_tokens": 1000, "temperature": 0, "stream": True}) as r:
            lines = r.iter_lines()
            for _ in range(5):
                next(lines)
        # the response is closed: within a step or so the row leaves and the count stops growing
        _assert_generation_stops(batcher)


def test_the_batch_going_empty_is_not_an_error(monkeypatch, model, tok):
    """The last rows finishing leaves an empty batch: a normal state, not an exception that the loop's error
    path swallows (and answers by rebuilding its cache)."""
    from gptforge.serve.batcher import Batcher, Job

    errors = []
    step = Batcher._step

    def spied(self, admitted):
        try:
            return step(self, admitted)
        except BaseException as e:
            errors.append(e)
            raise

    monkeypatch.setattr(Batcher, "_step", spied)
    batcher = Batcher(model, tok.decode_bytes, tok.vocab_size)

    def run(seeds):  # one job of len(seeds) rows, to its end
        finished, done = [], threading.Event()

        def deliver(event):
            if getattr(event, "finish_reason", None):
                finished.append(event)
                if len(finished) == len(seeds):
                    done.set()

        batcher.submit([Job([1, 2, 3], [SamplingConfig(max_new_tokens=3)] * len(seeds), seeds, deliver)])
        assert done.wait(30)

    try:
        run([1, 2])
        run([None])  # the batch went empty between the two
    finally:
        batcher.close()  # joins the loop: every step has run
    assert errors == []


def _hold_the_loop(app, seconds=None):
    """Submit a one-row job whose first event holds the generation loop (`seconds`, or until the returned
    gate opens): requests sent meanwhile wait for it. Returns (gate, job)."""
    from gptforge.serve.batcher import Job

    gate, busy = threading.Event(), threading.Event()

    def hold(event):
        if not busy.is_set():
            busy.set()
            gate.wait(seconds if seconds is not None else 30)

    job = Job([1, 2, 3], [SamplingConfig(max_new_tokens=3, temperature=0)], [None], hold)
    app.state.batcher.submit([job])
    assert busy.wait(30)
    return gate, job


def _post_and_leave(url, body, until):
    """POST `body` on a raw connection, wait until `until()` holds, then close the connection unanswered."""
    import socket

    data = json.dumps(body).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(data) + data)
        deadline = time.monotonic() + 30
        while not until():
            assert time.monotonic() < deadline
            time.sleep(0.005)


def test_a_non_streamed_reply_waiting_over_a_second_is_answered_whole(model, tok):
    """Queued behind a full batch for 1.5 s, a non-streamed request still gets its whole reply (the wait is
    no reason to give up on it)."""
    app = create_app(model, tok, name=NAME, settings=ServeSettings(max_rows=1))
    with serving(app) as url:
        _hold_the_loop(app, seconds=1.5)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        r = client.chat.completions.create(model=NAME, temperature=0, max_tokens=200, messages=USER)
    assert r.choices[0].message.content == greedy_session(model, tok, 200).ask("hello there")
    assert r.choices[0].finish_reason == "stop"


def _assert_generation_stops(batcher) -> None:
    """The row of a client that left is gone within a step or so, and the generated-token count stops growing
    well before the request's 1000 tokens."""
    deadline = time.monotonic() + 10
    while batcher.rows:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    stopped_at = batcher.generated_tokens
    time.sleep(0.3)
    assert batcher.generated_tokens == stopped_at < 500


def test_a_non_streamed_client_that_disconnects_stops_its_row(tok):
    slow = random_chat_model(tok, end_at=[1023], block_size=1024, n_embd=256)  # ~1 ms a token: 1000 take a while
    app = create_app(slow, tok, name=NAME)
    with serving(app) as url:
        batcher = app.state.batcher
        _post_and_leave(url, {"messages": USER, "max_tokens": 1000, "temperature": 0},
                        until=lambda: batcher.generated_tokens > 0)
        _assert_generation_stops(batcher)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_while_queued_gives_up_its_place(model, tok, stream):
    """A client gone before its request got a row: the request leaves the queue and is never prefilled."""
    app = create_app(model, tok, name=NAME, settings=ServeSettings(max_rows=1))
    with serving(app) as url:
        batcher = app.state.batcher
        gate, _ = _hold_the_loop(app)
        try:
            _post_and_leave(url, {"messages": USER, "max_tokens": 50, "stream": stream},
                            until=lambda: batcher.queued == 1)
            deadline = time.monotonic() + 10
            while batcher.queued:
                assert time.monotonic() < deadline
                time.sleep(0.005)
        finally:
            gate.set()
        deadline = time.monotonic() + 10
        while batcher.rows:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        time.sleep(0.2)
        assert batcher.generated_tokens == 3  # the held job's, nothing of the one that left


def test_sixteen_concurrent_streams_each_get_their_own_reply(server, client, model, tok):
    """Greedy and seeded requests of different lengths, interleaved in one batch (8 rows, so some wait and
    join mid-way): each reply is exactly what the same request gets alone."""
    requests = []
    for i in range(16):
        messages = [{"role": "user", "content": f"hello {i} " + "fox " * (i % 5)}]
        if i % 2:
            requests.append(dict(messages=messages, temperature=0.9, top_p=0.9, seed=i, max_tokens=10 + i))
        else:
            requests.append(dict(messages=messages, temperature=0, max_tokens=10 + 3 * i))
    alone = [client.chat.completions.create(model=NAME, **r).choices[0].message.content for r in requests]
    results: list = [None] * 16
    steps_before = server[1].state.batcher.steps

    def stream(i):
        chunks = client.chat.completions.create(model=NAME, stream=True, **requests[i])
        results[i] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == alone
    tokens = sum(min(r["max_tokens"], 200) for r in requests)
    # batched: far fewer decode steps than tokens (one request at a time would take one step per token)
    assert server[1].state.batcher.steps - steps_before < tokens / 3


# ---- the command -----------------------------------------------------------------------------------------

def test_the_serve_command_serves_a_checkpoint(tmp_path, model, tok):
    import os
    import subprocess
    import sys

    from chat_models import save_chat_checkpoint
    from serve_helpers import free_port

    checkpoint = save_chat_checkpoint(tmp_path / "ckpt", model, tok)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # 127.0.0.2 is this machine too, but not the default address: the warning about --api-key must show
    proc = subprocess.Popen([sys.executable, "-m", "gptforge", "serve", "--model", checkpoint, "--host", "127.0.0.2",
                             "--port", str(port)], stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = f"http://127.0.0.2:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
        assert client.models.list().data[0].id == "ckpt"
        r = client.chat.completions.create(model="ckpt", messages=USER, temperature=0, max_tokens=200)
        assert r.choices[0].message.content == greedy_session(model, tok, 200).ask("hello there")
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert "without --api-key" in err


def test_the_serve_command_refuses_bad_input_in_one_line(tmp_path):
    import socket
    import subprocess
    import sys

    def serve(*args):
        return subprocess.run([sys.executable, "-m", "gptforge", "serve", *args], capture_output=True, text=True,
                              timeout=120, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})

    missing = serve("--model", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "nothing" in missing.stderr and "Traceback" not in missing.stderr
    assert serve("--model", "dev-17m", "--port", "70000").returncode == 2
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = serve("--model", "dev-17m", "--port", str(taken.getsockname()[1]))
    assert busy.returncode == 2 and "--port" in busy.stderr.splitlines()[-1] and "Traceback" not in busy.stderr


@pytest.mark.parametrize("fault", ["tokenizer larger than the model", "weights not safetensors"])
def test_the_serve_command_exits_2_when_the_model_fails_to_load(tmp_path, tok, fault):
    """Loading happens once the server is up; when it fails (in the loader, or setting up what it loaded)
    the command stops serving and ends with the one-line error and exit 2 instead of answering 503 forever."""
    import subprocess
    import sys

    from chat_models import save_chat_checkpoint
    from serve_helpers import free_port

    vocab = tok.vocab_size - 5 if fault.startswith("tokenizer") else tok.vocab_size
    model = GPT(ModelConfig(vocab_size=vocab, block_size=32, n_layer=1, n_head=1, n_embd=16))
    checkpoint = save_chat_checkpoint(tmp_path / "ckpt", model, tok)
    if fault.startswith("weights"):
        (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"not a safetensors file")
    try:
        r = subprocess.run([sys.executable, "-m", "gptforge", "serve", "--model", checkpoint, "--port",
                            str(free_port())], capture_output=True, text=True, timeout=60,
                           env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired:
        pytest.fail("gptforge serve kept running after its model failed to load")
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("serving ") and len(lines) == 2 and lines[1].startswith("gptforge serve: error: ")
    assert ("tokenizer" if fault.startswith("tokenizer") else "model.safetensors") in lines[1]
