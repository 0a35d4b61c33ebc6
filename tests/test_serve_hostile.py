"""Hostile and malformed requests: every one gets a 4xx with OpenAI's error body, none a 5xx, and the server
keeps answering correctly afterwards (bad JSON, wrong types, huge bodies, huge numbers, unknown roles,
invalid UTF-8, prompts past the context, deep nesting, slow and vanishing clients)."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the serve tests need fastapi: pip install -e '.[dev]'")
httpx = pytest.importorskip("httpx", reason="the serve tests need httpx: pip install -e '.[dev]'")

from chat_models import chat_tokenizer, random_chat_model  # noqa: E402
from serve_helpers import serving  # noqa: E402

from gptforge.chat import ChatSession  # noqa: E402
from gptforge.generation import SamplingConfig  # noqa: E402
from gptforge.serve import create_app  # noqa: E402
from gptforge.serve.app import ServeSettings  # noqa: E402

USER = [{"role": "user", "content": "hello"}]
BODY_LIMIT = 100_000
CHAT_FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop",
               "seed", "stream", "stream_options", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty"]
COMPLETION_FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream",
                     "logprobs", "echo", "presence_penalty", "frequency_penalty"]
WRONG_VALUES = ["text", [1, "a"], {"a": 1}, 1.5, -(10 ** 30)]
VALID = {(f, repr(v)) for f, v in [("stop", "text"), ("prompt", "text"), ("seed", -(10 ** 30)), ("temperature", 1.5),
                                    ("presence_penalty", 1.5), ("frequency_penalty", 1.5),
                                    ("stream_options", {"a": 1})]}  # these pairs are fine requests


def hostile_requests():
    """(name, path, raw body bytes) for every case; the caller sends each and expects a 4xx."""
    chat, comp = "/v1/chat/completions", "/v1/completions"
    cases = []

    def add(name, path, body):
        cases.append((name, path, body if isinstance(body, bytes) else json.dumps(body).encode()))

    for i, raw in enumerate([b"", b"{", b"}", b"[]", b"null", b"1", b'"text"', b"true", b'{"messages": [}',
                             b"{'messages': []}", b'{"messages": [{"role": "user", "content": "hi"}]} trailing',
                             b"\x00\x01\x02", b'{"messages": NaN}', b'{"a":' * 50, b"[" * 50_000 + b"]" * 50_000,
                             b'{"x":' * 20_000 + b"1" + b"}" * 20_000]):
        add(f"bad json {i}", chat, raw)
        add(f"bad json {i}", comp, raw)
    for field in CHAT_FIELDS:
        for value in WRONG_VALUES:
            if (field, repr(value)) in VALID:
                continue
            add(f"chat {field}={value!r}", chat, {"messages": USER, field: value})
    for field in COMPLETION_FIELDS:
        for value in WRONG_VALUES:
            if (field, repr(value)) in VALID:
                continue
            add(f"completion {field}={value!r}", comp, {"prompt": "hi", field: value})
    for value in [0, -1, -(10 ** 9), 10 ** 6, 10 ** 30, True]:
        add(f"max_tokens {value}", chat, {"messages": USER, "max_tokens": value})
        add(f"max_tokens {value}", comp, {"prompt": "hi", "max_tokens": value} if value != 0 else
            {"prompt": "hi", "max_tokens": -3})
        add(f"n {value}", chat, {"messages": USER, "n": value if value != 10 ** 30 else 10 ** 6})
    for role in ["robot", "", None, 5, "SYSTEM", "tool", "function"]:
        add(f"role {role!r}", chat, {"messages": [{"role": role, "content": "hi"}]})
    for content in [5, {"text": "hi"}, [{"type": "image_url", "image_url": {"url": "x"}}], [{"type": "text"}], [1]]:
        add(f"content {content!r}", chat, {"messages": [{"role": "user", "content": content}]})
    for messages in [[], "hi", [[]], [None], [{"content": "hi"}], [{"role": "user", "content": "x"}] * 600]:
        add(f"messages {str(messages)[:20]}", chat, {"messages": messages})
    for prompt in [[], [[]], [-1], [10 ** 30], [[1, 2], "a"], [1.5], [None], {"a": 1}]:
        add(f"prompt {str(prompt)[:20]}", comp, {"prompt": prompt})
    long_text = "hello world " * 100
    add("chat past the context", chat, {"messages": [{"role": "user", "content": long_text}]})
    add("completion past the context", comp, {"prompt": long_text})
    add("completion ids past the context", comp, {"prompt": [1] * 300})
    add("model unknown", chat, {"model": "gpt-4", "messages": USER})
    add("model unknown", comp, {"model": "gpt-4", "prompt": "hi"})
    for raw in [b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', b'{"prompt": "\xc3\x28"}',
                b'\xef\xbb\xbf\xff{"prompt": "a"}', b'{"prompt": "\xed\xa0\x80"}']:
        add("invalid utf-8", chat, raw)
        add("invalid utf-8", comp, raw)
    for digits in (4301, 100_000):  # past Python's limit on int("..."): json.loads raises a plain ValueError
        add(f"integer of {digits} digits", chat, b'{"messages": [{"role": "user", "content": "hi"}], "seed": '
            + b"9" * digits + b"}")
        add(f"integer of {digits} digits", comp, b'{"prompt": "hi", "max_tokens": ' + b"9" * digits + b"}")
    add("lone surrogate", chat, b'{"messages": [{"role": "user", "content": "\\ud800"}]}')
    add("lone surrogate", comp, b'{"prompt": "\\udfff abc"}')
    add("huge body", chat, json.dumps({"messages": [{"role": "user", "content": "a" * (2 * BODY_LIMIT)}]}).encode())
    add("huge body", comp, b'{"prompt": "' + b"a" * (5 * BODY_LIMIT) + b'"}')
    for extra in [{"top_logprobs": 30, "logprobs": True}, {"top_logprobs": 2}, {"logprobs": 50}, {"stop": [""]},
                  {"stop": ["a"] * 5}, {"temperature": 1e308}, {"stream_options": {"include_usage": "yes"}}]:
        add(f"chat {extra}", chat, {"messages": USER, **extra})
    add("echo with max_tokens 0 without logprobs is fine, -1 is not", comp,
        {"prompt": "hi", "echo": True, "max_tokens": -1})
    add("n x prompts over the limit", comp, {"prompt": ["a"] * 40, "n": 4})
    return cases


@pytest.fixture(scope="module")
def served():
    tok = chat_tokenizer("bpe")
    model = random_chat_model(tok, end_at=list(range(40, 128, 11)), block_size=128)
    app = create_app(model, tok, name="tiny", settings=ServeSettings(max_body_bytes=BODY_LIMIT, request_timeout_s=1.0,
                                                                     max_messages=500))
    with serving(app) as url:
        yield url, model, tok


def test_two_hundred_hostile_requests_get_4xx_and_the_server_keeps_answering(served):
    url, model, tok = served
    cases = hostile_requests()
    assert len(cases) >= 200
    statuses = {}
    with httpx.Client(base_url=url, timeout=30) as http:
        for name, path, body in cases:
            r = http.post(path, content=body, headers={"content-type": "application/json"})
            statuses[(name, path)] = r.status_code
            assert 400 <= r.status_code < 500, (name, path, r.status_code, r.text[:300])
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], (name, error)
        for method, path in [("GET", "/v1/chat/completions"), ("DELETE", "/v1/models"), ("GET", "/v1/nothing"),
                             ("PUT", "/health"), ("GET", "/v1/models/other")]:
            r = http.request(method, path)
            assert 400 <= r.status_code < 500 and "error" in r.json(), (method, path, r.status_code)
        # still answering, and answering right
        r = http.post("/v1/chat/completions", json={"messages": USER, "temperature": 0, "max_tokens": 50})
        expected = ChatSession(model, tok, SamplingConfig(temperature=0, max_new_tokens=50)).ask("hello")
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == expected
    assert sum(1 for s in statuses.values() if s >= 500) == 0


def _raw(url, data: bytes, read: bool = True) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(data)
        if not read:
            return b""
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)


def test_slow_and_vanishing_clients_do_not_stall_the_server(served):
    url, _, _ = served
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
    answers = []
    # three clients that promise 500 bytes and send 10: each gets 408 after the body timeout (1 s here)
    threads = [threading.Thread(target=lambda: answers.append(_raw(url, head + b"Content-Length: 500\r\n\r\n"
                                                                   + b'{"messages"')))
               for _ in range(3)]
    for t in threads:
        t.start()
    # meanwhile: clients that send half a request and vanish, and one lying about its length
    for _ in range(3):
        _raw(url, head + b"Content-Length: 50\r\n\r\n{", read=False)
    lie = _raw(url, head + b"Content-Length: 999999999\r\n\r\n{}")
    assert b" 413 " in lie.split(b"\r\n")[0]
    r = httpx.post(url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 3}, timeout=30)
    assert r.status_code == 200  # answered while the slow ones are still waiting
    for t in threads:
        t.join(20)
    assert len(answers) == 3 and all(b" 408 " in a.split(b"\r\n")[0] for a in answers), answers


def _held(url, pieces: list[bytes], gap: float) -> tuple[float, bytes]:
    """Send `pieces` on a raw connection, one every `gap` s, until the server closes it: (seconds from the
    connection to its close, what the server sent)."""
    host, port = url.removeprefix("http://").split(":")
    got = b""
    with socket.create_connection((host, int(port)), timeout=10) as s:
        start = time.monotonic()
        try:
            for piece in [*pieces, None]:
                if piece is not None:
                    s.sendall(piece)
                s.settimeout(gap if piece is not None else 10)
                try:
                    chunk = s.recv(65536)
                except TimeoutError:
                    continue
                got += chunk
                while chunk:
                    chunk = s.recv(65536)
                    got += chunk
                break
        except (BrokenPipeError, ConnectionResetError):
            pass
        return time.monotonic() - start, got


def test_one_deadline_for_the_whole_request_head_included(served):
    """Slowloris: a header line every 0.4 s (15 of them) used to hold a connection for as long as the client
    liked; the head now has the request's deadline (1 s here) and gets 408. A head and a body that each take
    0.6 s are one request of 1.2 s: 408 too. A connection that says nothing is closed. A kept-alive
    connection's next request has its own clock."""
    url, _, _ = served
    slack = 1.5  # a loaded 2-core machine
    head = [b"POST /v1/chat/completions HTTP/1.1\r\n"] + [b"X-Slow-%d: 1\r\n" % i for i in range(15)]
    held, answer = _held(url, head, 0.4)
    assert held < 1.0 + slack and answer.startswith(b"HTTP/1.1 408 "), (held, answer[:200])
    assert b"1 s" in answer
    body = json.dumps({"messages": USER, "max_tokens": 1}).encode()
    pieces = [b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n", b"Content-Type: application/json\r\n",
              b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body), body[:10], body[10:20], body[20:]]
    held, answer = _held(url, pieces, 0.3)
    assert held < 1.0 + slack and answer.startswith(b"HTTP/1.1 408 "), (held, answer[:200])
    held, answer = _held(url, [], 0)
    assert held < 1.0 + slack and answer == b""
    ask = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        for _ in range(2):
            s.sendall(ask)
            reply = b""
            while not reply.endswith(b'{"status":"ok"}'):
                reply += s.recv(65536)
            assert reply.startswith(b"HTTP/1.1 200 ")
            time.sleep(1.3)  # past the deadline since the connection opened, within uvicorn's keep-alive (5 s)


CHAT_OPTIONAL = [f for f in CHAT_FIELDS if f != "messages"] + ["ignore_eos"]
COMPLETION_OPTIONAL = [f for f in COMPLETION_FIELDS if f != "prompt"] + ["stream_options", "ignore_eos"]


@pytest.mark.parametrize("path, base, fields", [
    ("/v1/chat/completions", {"messages": USER}, CHAT_OPTIONAL),
    ("/v1/completions", {"prompt": "hello"}, COMPLETION_OPTIONAL),
])
def test_null_is_the_default_for_every_optional_field(served, path, base, fields):
    """OpenAI's spec makes these fields nullable and clients (LangChain) send null: null means the default,
    so each answer equals the one to the same request without the field."""
    url, _, _ = served
    base = {**base, "temperature": 0, "max_tokens": 5, "seed": 3}  # deterministic whichever one is null

    def answer(body):
        r = httpx.post(url + path, json=body, timeout=30)
        assert r.status_code == 200, (body, r.text[:300])
        return [(c.get("message", {}).get("content"), c.get("text"), c["finish_reason"], c["logprobs"])
                for c in r.json()["choices"]]

    for field in fields:
        without = {k: v for k, v in base.items() if k != field}
        assert answer({**without, field: None}) == answer(without), field
    assert answer({**base, **{f: None for f in fields}})  # all of them null at once
    r = httpx.post(url + path, json={**base, "stream": True, "stream_options": {"include_usage": None}}, timeout=30)
    assert r.status_code == 200 and "usage" not in r.text
