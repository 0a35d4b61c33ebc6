"""The ChatML chat format, stored once as Jinja and rendered identically by Python.

    <|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n

Why ChatML: it is the format llama.cpp falls back to when a GGUF has no template, the one most chat data
already uses, and its two markers are single special tokens, so a turn boundary is never split by BPE.

`CHAT_TEMPLATE` is the Jinja source a run stores in its tokenizer directory and exports write to Hugging
Face (`chat_template.jinja`, `tokenizer_config.json`) and GGUF (`tokenizer.chat_template`); transformers'
`apply_chat_template` and llama.cpp render it. `render_chat` is gptforge's own renderer: it must produce
byte-identical text (tests render the same conversations both ways), so training, `chat`, `serve` and
every exported model see exactly the same prompt.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ROLES = ("system", "user", "assistant")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatFormatError(ValueError):
    """A conversation that cannot be rendered: unknown role, non-string content, no messages."""


def check_messages(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, str]]:
    """The messages as plain {"role", "content"} dicts, or ChatFormatError saying which one is wrong."""
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatFormatError(f"message {i} is not an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ChatFormatError(f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ChatFormatError(f"message {i} ({role}) has content of type {type(content).__name__}; "
                                  "expected a string")
        checked.append({"role": role, "content": content})
    return checked


def render_message(role: str, content: str) -> str:
    return f"{IM_START}{role}\n{content}{IM_END}\n"


def generation_prompt() -> str:
    """What follows the conversation so the model writes the assistant's next turn."""
    return f"{IM_START}assistant\n"


def render_chat(messages: Iterable[Mapping[str, Any]], add_generation_prompt: bool = False) -> str:
    """The conversation as ChatML text, exactly as `CHAT_TEMPLATE` renders it (encode it with
    `allowed_special` naming the two markers, so they become their special tokens)."""
    text = "".join(render_message(m["role"], m["content"]) for m in check_messages(messages))
    return text + (generation_prompt() if add_generation_prompt else "")
