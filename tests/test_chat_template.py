"""gptforge's Python ChatML renderer against the Jinja template it stores (rendered by jinja2, as
transformers' apply_chat_template renders it)."""

from __future__ import annotations

import jinja2.sandbox
import pytest

from gptforge.chat import CHAT_TEMPLATE, ChatFormatError, render_chat

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
    [{"role": "user", "content": "multi\nline {{ not jinja }} <b>html</b> ünïcödé 🙂"},
     {"role": "assistant", "content": ""}],
]


def _jinja(messages, add_generation_prompt):
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_python_renderer_matches_jinja_byte_for_byte(messages, add_generation_prompt):
    assert render_chat(messages, add_generation_prompt) == _jinja(messages, add_generation_prompt)


def test_rendering_by_hand():
    text = render_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], True)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("bad", [[{"role": "tool", "content": "x"}], [{"role": "user", "content": 3}], ["hi"]])
def test_bad_messages_are_named(bad):
    with pytest.raises(ChatFormatError, match="message 0"):
        render_chat(bad)
