"""Chat markers as special tokens, and conversations as token ids with a per-token loss mask.

`add_chat_tokens` gives any gptforge tokenizer `<|im_start|>` and `<|im_end|>` (the next free ids: 50257 and
50258 for GPT-2, which fall inside the model's padded embedding rows) and the ChatML template, which
`Tokenizer.save` writes once as `chat_template.jinja` beside the vocabulary.

`encode_chat` turns messages into ids piece by piece: the markers become their special ids only where the
renderer puts them, and everything a user or an assistant wrote is encoded as ordinary text, so a message
that contains the text "<|im_end|>" cannot end a turn. The text between two markers is encoded in one piece
(role header and content together), exactly as a tokenizer that splits the rendered text at the special
tokens does (transformers' `apply_chat_template`, llama.cpp): training, `gptforge chat` and exported models
see the same ids for the same conversation.

The loss mask marks the ids an assistant wrote: its content and its `<|im_end|>` (a model that is never
scored on its end-of-turn token never learns to stop). System and user content, role headers, the markers
that open a turn and the newline after `<|im_end|>` are context only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UserError
from .template import CHAT_TEMPLATE, IM_END, IM_START, check_messages

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

CHAT_TOKENS = (IM_START, IM_END)


def has_chat_tokens(tokenizer: "Tokenizer") -> bool:
    """Whether `tokenizer` already has both chat markers as special tokens."""
    return all(t in tokenizer.special_tokens for t in CHAT_TOKENS)


def add_chat_tokens(tokenizer: "Tokenizer") -> "Tokenizer":
    """Give `tokenizer` the two chat markers (kept where it has them) and the ChatML template; returns it.

    Raises UserError when the tokenizer cannot take them: a vocabulary that already spells a marker as an
    ordinary token would encode the same text two ways, so the chat format would be ambiguous.
    """
    for token in CHAT_TOKENS:
        if token in tokenizer.special_tokens or tokenizer.kind == "char":  # one character per id: never whole
            continue
        ordinary = tokenizer.encode(token)
        if len(ordinary) == 1:
            raise UserError(f"this {tokenizer.kind} tokenizer has {token!r} as an ordinary token (id {ordinary[0]}), "
                            "so it cannot also be the chat marker; train the base model with a tokenizer without it")
    tokenizer.add_special_tokens(CHAT_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def chat_token_ids(tokenizer: "Tokenizer") -> tuple[int, int]:
    """(id of <|im_start|>, id of <|im_end|>), or a UserError saying the tokenizer has no chat markers."""
    specials = tokenizer.special_tokens
    if not has_chat_tokens(tokenizer):
        raise UserError(f"this {tokenizer.kind} tokenizer has no chat markers {IM_START} / {IM_END}; fine-tune "
                        "the model with `gptforge sft` first (it adds them)")
    return specials[IM_START], specials[IM_END]


def reply_end_ids(tokenizer: "Tokenizer") -> frozenset[int]:
    """The ids that end an assistant's reply, none of them part of it: `<|im_end|>` (end of turn, what SFT
    trains), `<|endoftext|>`, and `<|im_start|>`.

    Why `<|im_start|>` stops rather than being banned from sampling: it is never a trained target, and a model
    that writes it is opening the next message, so its reply is over (it skipped the `<|im_end|>` before it);
    banning it would make the model go on writing a reply it had ended. Left in, it would be printed as
    text and stored as assistant content, which the next turn would then render as a marker. `ChatSession`
    and `chat_replies` both stop on exactly these ids."""
    start, end = chat_token_ids(tokenizer)
    return frozenset((start, end, tokenizer.eot_id))


def _content_start(head: list[int], ids: list[int]) -> int:
    """Index in `ids` (the encoding of header + content) of the first id that carries content.

    Usually the header's own ids `head` are a prefix; where BPE merges the header's newline with leading
    whitespace of the content, the merged token is the first content token (it holds content bytes)."""
    if ids[: len(head)] == head:
        return len(head)
    k = 0
    while k < min(len(head), len(ids)) and ids[k] == head[k]:
        k += 1
    return k


def encode_chats(tokenizer: "Tokenizer", conversations: Iterable[Iterable[Mapping[str, Any]]],
                 add_generation_prompt: bool = False) -> list[tuple[list[int], np.ndarray]]:
    """`encode_chat` of many conversations (the per-message work shared: markers, cached headers)."""
    start, end = chat_token_ids(tokenizer)
    newline = tokenizer.encode("\n")
    checked = [check_messages(messages) for messages in conversations]
    # one message at a time: messages are short, and a threaded batch encoder spends more on its threads
    bodies = (tokenizer.encode(f"{m['role']}\n{m['content']}") for c in checked for m in c)
    headers: dict[str, list[int]] = {}
    out = []
    for messages in checked:
        ids: list[int] = []
        mask: list[int] = []
        for message in messages:
            body = next(bodies)
            trained = message["role"] == "assistant"
            if trained:
                head = headers.get("assistant") or headers.setdefault("assistant", tokenizer.encode("assistant\n"))
                first = _content_start(head, body)
            else:
                first = len(body)
            ids += [start, *body, end, *newline]
            mask += [0] * (1 + first) + [1] * (len(body) - first) + [int(trained)] + [0] * len(newline)
        if add_generation_prompt:
            header = tokenizer.encode("assistant\n")
            ids += [start, *header]
            mask += [0] * (1 + len(header))
        out.append((ids, np.asarray(mask, dtype=np.uint8)))
    return out


def encode_chat(tokenizer: "Tokenizer", messages: Iterable[Mapping[str, Any]],
                add_generation_prompt: bool = False) -> tuple[list[int], np.ndarray]:
    """(ids, mask) of a conversation in ChatML; mask[i] = 1 where ids[i] is trained on (see module doc).

    With `add_generation_prompt` the ids end with `<|im_start|>assistant\n`, ready for the model's reply.
    """
    return encode_chats(tokenizer, [messages], add_generation_prompt)[0]


def encode_chat_prompt(tokenizer: "Tokenizer", messages: Iterable[Mapping[str, Any]]) -> list[int]:
    """The ids a model continues to write the assistant's next turn (generation stops at `<|im_end|>`)."""
    return encode_chat(tokenizer, messages, add_generation_prompt=True)[0]
