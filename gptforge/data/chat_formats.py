"""Conversations out of the record formats chat data comes in, each record checked and its faults named.

Formats (one record = one conversation):
  messages           {"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}  (OpenAI, HF)
  sharegpt           {"conversations": [{"from": "system|human|gpt", "value": "..."}, ...]}
  alpaca             {"instruction": "...", "input": "..." (optional), "output": "...", "system": optional}
  prompt_completion  {"prompt": "...", "completion": "...", "system": optional}

`detect_format` names the format from a record's keys; a source takes the format of its first record that
has one (or the one the user forces). A record that does not make a usable conversation raises
`BadRecord` with the reason; the caller counts it, reports it with its line number and skips it.

What is usable: an optional system message first, then user and assistant strictly alternating, starting
with the user and ending with the assistant (so every user turn has the reply it is trained towards), every
content a non-empty string. Why strict: a conversation that breaks these rules is almost always a
conversion bug in the dataset, and guessing a repair (merging two user turns, dropping a dangling one)
would train on something nobody wrote.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant"}


class BadRecord(ValueError):
    """A record that is not a usable conversation; the message says why (without the location)."""


Messages = list[dict[str, str]]


def detect_format(record: Any) -> str | None:
    """The format a record's keys say it is in, or None."""
    if not isinstance(record, Mapping):
        return None
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    return None


def _need(record: Mapping[str, Any], key: str, fmt: str) -> Any:
    if key not in record:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise BadRecord(f"no {key!r} field for the {fmt} format (keys: {keys})")
    return record[key]


def _text(value: Any, what: str, optional: bool = False) -> str:
    """`value` if it is a string (None too when `optional`: as ""), else BadRecord. Every field a reader
    uses goes through here first, so a list, dict or number where text belongs is a bad record, counted and
    skipped, never a TypeError that aborts the whole prepare."""
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise BadRecord(f"{what} is {type(value).__name__}, not a string")
    return value


def _from_messages(record: Mapping[str, Any]) -> Messages:
    turns = _need(record, "messages", "messages")
    if not isinstance(turns, list):
        raise BadRecord(f"'messages' is {type(turns).__name__}, not a list")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or "role" not in turn or "content" not in turn:
            raise BadRecord(f"message {i} has no 'role' and 'content'")
        out.append({"role": _text(turn["role"], f"message {i} role"),
                    "content": _text(turn["content"], f"message {i} content")})
    return out


def _from_sharegpt(record: Mapping[str, Any]) -> Messages:
    turns = _need(record, "conversations", "sharegpt")
    if not isinstance(turns, list):
        raise BadRecord(f"'conversations' is {type(turns).__name__}, not a list")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            raise BadRecord(f"turn {i} has no 'from' and 'value'")
        speaker = _text(turn["from"], f"turn {i} 'from'")  # a list or dict would not even hash for the lookup
        if speaker not in SHAREGPT_ROLES:
            raise BadRecord(f"turn {i} is from {speaker!r}; expected human, gpt or system")
        out.append({"role": SHAREGPT_ROLES[speaker], "content": _text(turn["value"], f"turn {i} value")})
    return out


def _system(record: Mapping[str, Any]) -> Messages:
    system = _text(record.get("system"), "'system'", optional=True)
    return [{"role": "system", "content": system}] if system else []


def _from_alpaca(record: Mapping[str, Any]) -> Messages:
    instruction = _text(_need(record, "instruction", "alpaca"), "'instruction'")
    extra = _text(record.get("input"), "'input'", optional=True)
    output = _text(_need(record, "output", "alpaca"), "'output'")
    # Alpaca's own prompt puts the input after the instruction as its own paragraph
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return _system(record) + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _from_prompt_completion(record: Mapping[str, Any]) -> Messages:
    prompt = _text(_need(record, "prompt", "prompt_completion"), "'prompt'")
    completion = _text(_need(record, "completion", "prompt_completion"), "'completion'")
    return _system(record) + [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


_CONVERTERS: dict[str, Callable[[Mapping[str, Any]], Messages]] = {
    "messages": _from_messages, "sharegpt": _from_sharegpt, "alpaca": _from_alpaca,
    "prompt_completion": _from_prompt_completion}


def check_conversation(messages: Messages) -> Messages:
    """`messages` if they form a usable conversation (see the module doc), else BadRecord saying why."""
    if not messages:
        raise BadRecord("no messages")
    for i, m in enumerate(messages):
        if m["role"] not in ("system", "user", "assistant"):
            raise BadRecord(f"message {i} has unknown role {m['role']!r}; expected system, user or assistant")
        if not m["content"].strip():
            raise BadRecord(f"message {i} ({m['role']}) is empty")
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if not body:
        raise BadRecord("only a system message, no user or assistant turn")
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            index = i + len(messages) - len(body)
            raise BadRecord(f"message {index} is {m['role']!r} where {expected!r} was expected (after an optional "
                            "system message, turns alternate user / assistant)")
    if body[-1]["role"] != "assistant":
        raise BadRecord("the last user message has no assistant reply")
    return messages


def to_messages(record: Any, fmt: str) -> Messages:
    """The checked conversation in `record` read as format `fmt`, or BadRecord."""
    if not isinstance(record, Mapping):
        raise BadRecord(f"a {type(record).__name__}, not an object")
    return check_conversation(_CONVERTERS[fmt](record))
