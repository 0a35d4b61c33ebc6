"""Chat: the ChatML template (one Jinja source, a Python renderer that matches it byte for byte)."""

from .template import (CHAT_TEMPLATE, IM_END, IM_START, ROLES, ChatFormatError, check_messages,
                       generation_prompt, render_chat)

__all__ = ["CHAT_TEMPLATE", "IM_END", "IM_START", "ROLES", "ChatFormatError", "check_messages",
           "generation_prompt", "render_chat"]
