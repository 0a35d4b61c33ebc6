"""Structured output from `gptforge serve` through the official openai client: response_format json_object
and json_schema (every reply parses and validates), streaming equal to the non-streamed reply, logit_bias
as OpenAI defines it, free rows unchanged by constrained neighbours, bad schemas one 400 each."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="the serve tests need fastapi: pip install -e '.[dev]'")
openai = pytest.importorskip("openai", reason="the serve tests need the openai client: pip install -e '.[dev]'")
jsonschema = pytest.importorskip("jsonschema", reason="these tests validate with jsonschema: pip install -e '.[dev]'")

from chat_models import chat_tokenizer, random_chat_model  # noqa: E402
from serve_helpers import serving  # noqa: E402
from test_generation_constrained import SCHEMA  # noqa: E402

from gptforge.generation import SamplingConfig, generate_text  # noqa: E402
from gptforge.serve import create_app  # noqa: E402
from gptforge.serve.app import ServeSettings  # noqa: E402

NAME = "tiny-chat"
USER = [{"role": "user", "content": "Give me a user record."}]
FORMAT = {"type": "json_schema", "json_schema": {"name": "user", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer("bpe")


@pytest.fixture(scope="module")
def model(tok):
    # a model that wants to end its reply at once (<|im_end|> from position 0): only the grammar keeps it going
    return random_chat_model(tok, end_at=list(range(0, 512)), block_size=512)


@pytest.fixture(scope="module")
def server(model, tok):
    app = create_app(model, tok, name=NAME, settings=ServeSettings(max_rows=16, max_queued=64))
    with serving(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


def _many(fn, n=50, workers=8):
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, range(n)))


def test_fifty_json_schema_replies_validate(client):
    def ask(i):
        return client.chat.completions.create(model=NAME, messages=USER, response_format=FORMAT, seed=i,
                                              temperature=1.0, max_tokens=300).choices[0]
    for choice in _many(ask):
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_fifty_json_object_replies_parse_or_say_length(client):
    def ask(i):
        return client.chat.completions.create(model=NAME, messages=USER, response_format={"type": "json_object"},
                                              seed=i, temperature=1.0, max_tokens=150).choices[0]
    choices = _many(ask)
    assert sum(c.finish_reason == "stop" for c in choices) >= 10
    for choice in choices:
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
        else:  # cut mid-JSON by max_tokens: "length", as OpenAI reports it
            assert choice.finish_reason == "length"


def test_completions_take_the_same_response_format(client):
    def ask(i):
        return client.completions.create(model=NAME, prompt="record:", max_tokens=300, seed=i,
                                         extra_body={"response_format": FORMAT}).choices[0]
    for choice in _many(ask, n=10):
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.text), SCHEMA)


@pytest.mark.parametrize("format", [FORMAT, {"type": "json_object"}])
def test_streamed_reply_equals_the_non_streamed_one_at_temperature_0(client, format):
    args = dict(model=NAME, messages=USER, response_format=format, temperature=0, max_tokens=300)
    whole = client.chat.completions.create(**args).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **args))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.finish_reason
    if whole.finish_reason == "stop":
        json.loads(streamed)


def test_max_tokens_mid_json_is_length(client):
    choice = client.chat.completions.create(model=NAME, messages=USER, response_format=FORMAT, max_tokens=3).choices[0]
    assert choice.finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(choice.message.content)


def test_text_format_is_free_text(client, model, tok):
    free = client.chat.completions.create(model=NAME, messages=USER, temperature=0, max_tokens=20)
    text = client.chat.completions.create(model=NAME, messages=USER, temperature=0, max_tokens=20,
                                          response_format={"type": "text"})
    assert text.choices[0].message.content == free.choices[0].message.content


def test_free_requests_are_unchanged_by_constrained_neighbours(client):
    """The batch-invariance rule: a seeded free request draws the same tokens alone and beside JSON rows."""
    def free(i):
        return client.completions.create(model=NAME, prompt=f"story {i}:", max_tokens=40, seed=100 + i,
                                         temperature=1.0, extra_body={"ignore_eos": True}).choices[0].text
    alone = [free(i) for i in range(8)]

    def mixed(i):
        if i % 2:
            return free(i // 2)
        return client.chat.completions.create(model=NAME, messages=USER, response_format=FORMAT, seed=i,
                                              max_tokens=300, logit_bias={"5": -100, "9": 30}).choices[0]
    results = _many(mixed, n=16, workers=16)  # 16 concurrent clients, half of them constrained
    assert results[1::2] == alone


def test_logit_bias_is_openais(client, model, tok):
    prompt = tok.encode("hello")
    config = SamplingConfig(temperature=0, max_new_tokens=6, stop_at_eot=False)
    plain = generate_text(model, tok, "hello", config)[0]
    first = tok.encode(plain)[0]
    bias = {str(first): -100, "7": 2.5}
    served = client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0, logit_bias=bias,
                                       extra_body={"ignore_eos": True}).choices[0].text
    expected = generate_text(model, tok, "hello", config.replace(logit_bias={first: -100, 7: 2.5}))[0]
    assert served == expected and served != plain
    assert not tok.encode(served)[:1] == [first]


def _error(excinfo):
    assert excinfo.value.status_code == 400
    return excinfo.value.body


@pytest.mark.parametrize("format, message", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}, "Invalid type"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}},
     "Unimplemented keys"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "$defs": {"n": {"type": "object", "properties": {"c": {"$ref": "#/$defs/n"}}}}, "$ref": "#/$defs/n"}}},
     "recursive"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": list(range(60000))}}}, "larger than"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "needs"),
    ({"type": "xml"}, "must be one of"),
])
def test_bad_schemas_are_one_400_naming_the_problem(client, format, message):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=USER, response_format=format, max_tokens=5)
    body = _error(e)
    assert body["param"] == "response_format" and message in body["message"], body
    assert body["message"].startswith("response_format")


@pytest.mark.parametrize("bias, message", [({"abc": 1}, "not a token id"), ({"999999": 1}, "not a token id"),
                                           ({"1": 300}, "[-100, 100]")])
def test_bad_logit_bias_is_a_400(client, bias, message):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=USER, logit_bias=bias, max_tokens=2)
    body = _error(e)
    assert body["param"] == "logit_bias" and message in body["message"], body


def test_the_server_keeps_serving_after_bad_requests(client):
    r = client.chat.completions.create(model=NAME, messages=USER, response_format=FORMAT, max_tokens=300, seed=1)
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


def test_langchain_structured_output(server):
    """LangChain's with_structured_output, as a user would call it against `gptforge serve` (optional: only
    where langchain-openai is installed)."""
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(base_url=server + "/v1", api_key="unused", model=NAME, temperature=0,
                                      max_tokens=300, max_retries=0)
    schema = {**SCHEMA, "title": "User", "description": "a user record"}
    for method in ("json_mode", "json_schema"):
        result = llm.with_structured_output(schema, method=method).invoke("Give me a user record.")
        assert isinstance(result, dict)
        if method == "json_schema":
            jsonschema.validate(result, SCHEMA)
