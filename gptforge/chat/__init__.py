"""Chat: the ChatML template (one Jinja source, a Python renderer that matches it byte for byte), and
`ChatSession`, a multi-turn conversation with a chat model (imported lazily: it needs torch and the
model, the template does not)."""

from .template import (CHAT_TEMPLATE, IM_END, IM_START, ROLES, ChatFormatError, check_messages,
                       generation_prompt, render_chat)

__all__ = ["CHAT_TEMPLATE", "IM_END", "IM_START", "ROLES", "ChatFormatError", "ChatSession", "check_messages",
           "generation_prompt", "render_chat"]


def __getattr__(name: str):
    if name == "ChatSession":
        from .session import ChatSession
        return ChatSession
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
