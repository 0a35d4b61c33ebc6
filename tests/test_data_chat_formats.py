"""Conversation records in the four formats people have, and the faults a record can have, each named."""

from __future__ import annotations

import pytest

from gptforge.data.chat_formats import BadRecord, detect_format, to_messages

U, A, S = "user", "assistant", "system"


def m(role, content):
    return {"role": role, "content": content}


@pytest.mark.parametrize("record, fmt, expected", [
    ({"messages": [m(S, "sys"), m(U, "q"), m(A, "a")]}, "messages", [m(S, "sys"), m(U, "q"), m(A, "a")]),
    ({"conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "q"},
                        {"from": "gpt", "value": "a"}]}, "sharegpt", [m(S, "sys"), m(U, "q"), m(A, "a")]),
    ({"instruction": "Sum", "input": "1 2", "output": "3"}, "alpaca", [m(U, "Sum\n\n1 2"), m(A, "3")]),
    ({"instruction": "Hi", "input": "", "output": "Hello", "system": "s"}, "alpaca", [m(S, "s"), m(U, "Hi"),
                                                                                      m(A, "Hello")]),
    ({"prompt": "q", "completion": "a"}, "prompt_completion", [m(U, "q"), m(A, "a")]),
])
def test_formats_detected_and_converted(record, fmt, expected):
    assert detect_format(record) == fmt
    assert to_messages(record, fmt) == expected


@pytest.mark.parametrize("record, fmt, reason", [
    ({"messages": [m(S, "only")]}, "messages", "only a system message"),
    ({"messages": []}, "messages", "no messages"),
    ({"messages": [m("bot", "x"), m(A, "y")]}, "messages", "unknown role 'bot'"),
    ({"messages": [m(U, "q"), m(A, "")]}, "messages", r"message 1 \(assistant\) is empty"),
    ({"messages": [m(U, "q"), m(A, ["parts"])]}, "messages", "content is list, not a string"),
    ({"messages": [{"role": "user"}]}, "messages", "no 'role' and 'content'"),
    ({"messages": [m(U, "q"), m(U, "again"), m(A, "a")]}, "messages", "'user' where 'assistant' was expected"),
    ({"messages": [m(U, "q"), m(A, "a"), m(U, "dangling")]}, "messages", "no assistant reply"),
    ({"messages": [m(A, "a")]}, "messages", "'assistant' where 'user' was expected"),
    ({"conversations": [{"from": "bard", "value": "x"}]}, "sharegpt", "from 'bard'"),
    # a value of the wrong type where text belongs: a bad record, never a TypeError (unhashable) or a crash
    ({"conversations": [{"from": ["human"], "value": "q"}]}, "sharegpt", "turn 0 'from' is list, not a string"),
    ({"conversations": [{"from": {"x": 1}, "value": "q"}]}, "sharegpt", "turn 0 'from' is dict, not a string"),
    ({"conversations": [{"from": "human", "value": 7}]}, "sharegpt", "turn 0 value is int"),
    ({"messages": [{"role": ["user"], "content": "q"}, m(A, "a")]}, "messages", "message 0 role is list"),
    ({"messages": [{"role": {"r": 1}, "content": "q"}, m(A, "a")]}, "messages", "message 0 role is dict"),
    ({"instruction": ["a"], "output": "b"}, "alpaca", "'instruction' is list"),
    ({"instruction": "a", "input": {"k": 1}, "output": "b"}, "alpaca", "'input' is dict"),
    ({"instruction": "a", "output": ["b"]}, "alpaca", "'output' is list"),
    ({"instruction": "a", "output": "b", "system": ["s"]}, "alpaca", "'system' is list"),
    ({"prompt": {"p": 1}, "completion": "b"}, "prompt_completion", "'prompt' is dict"),
    ({"prompt": "a", "completion": None}, "prompt_completion", "'completion' is NoneType"),
    ({"text": "x"}, "messages", "no 'messages' field"),
    (["not", "a", "dict"], "messages", "a list, not an object"),
])
def test_bad_records_say_why(record, fmt, reason):
    with pytest.raises(BadRecord, match=reason):
        to_messages(record, fmt)
