"""A conversation with a chat model: the state `gptforge chat` (and later the HTTP server) drive.

    session = ChatSession(model, tokenizer, SamplingConfig(temperature=0.7), system="Be brief.", seed=0)
    for piece in session.send("What does json.dumps do?"):
        print(piece, end="", flush=True)
    session.undo(); session.reset(); session.save("talk.jsonl"); session.load(messages)

Each turn re-renders the *whole* conversation with the model's own template (ChatML), so the model sees
every earlier exchange exactly as it was trained on them (a chat that forgets earlier turns is a common
bug elsewhere). The ids are `gptforge.chat.tokens.encode_chat`'s, the ones SFT trains on: the markers
become their special ids only where the template puts them, never from text a user typed. Messages are
encoded one by one (the markers split the text anyway), which is what lets old exchanges be dropped.

A reply ends at `<|im_end|>` (end of turn), `<|endoftext|>` or `<|im_start|>` (the model opening the next
message; `gptforge.chat.tokens.reply_end_ids` says why it stops rather than being banned); none is printed.
Pieces are released through an incremental UTF-8 decoder, so a byte-level token that ends inside a character
never shows up as a broken character. A reply stopped early (Ctrl-C in the CLI: the consumer closes the
iterator, or the exception passes through it) keeps what was shown, so the conversation stays well formed.

Past the context: the positions are learned and absolute, and sliding a window over a rendered chat would
cut a turn (or the system message) in half. Instead, before each turn, the oldest exchanges are dropped
from what the model sees (the system message is always kept; the full conversation stays in `messages`)
until the prompt leaves room for the reply, and `notify` is told once per conversation.

Seeds: with `seed` set, turn n of a conversation samples from a seed derived from (seed, n), so the same
inputs replay the same conversation; `/reset` starts the count again. An undone turn that is asked
again draws a fresh sample (its turn number has moved on).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .template import CHAT_TEMPLATE, IM_END, IM_START, ChatFormatError, check_messages
from .tokens import encode_chat, encode_chat_prompt, has_chat_tokens, reply_end_ids

if TYPE_CHECKING:
    from ..generation import SamplingConfig
    from ..model import GPT
    from ..tokenizer import Tokenizer


def chat_template(tokenizer: "Tokenizer") -> str | None:
    """The Jinja chat template saved with the model's tokenizer, or None for a base model.

    The markers alone do not make a chat model: `gptforge tokenizer train --special-token '<|im_start|>'`
    gives a base model's tokenizer them too, and that model was never taught to answer. A chat model is
    one whose tokenizer was saved with its template (`gptforge sft`, or an export/import of such a model).
    """
    return tokenizer.chat_template or None


def require_chat_model(tokenizer: "Tokenizer | None", what: str) -> str:
    """The tokenizer's chat template, or a UserError telling how to get a chat model."""
    template = chat_template(tokenizer) if tokenizer is not None else None
    if template is None or not has_chat_tokens(tokenizer):
        why = ("its tokenizer has the chat markers but no chat template" if tokenizer is not None and
               has_chat_tokens(tokenizer) else f"no chat template, no {IM_START}/{IM_END} tokens")
        raise UserError(f"{what} is a base model ({why}): fine-tune it into a chat model first with "
                        "`gptforge sft --model RUN`")
    if template != CHAT_TEMPLATE:
        raise UserError(f"{what} has a chat template other than gptforge's ChatML one; gptforge renders ChatML only")
    return template


def _message_ids(tokenizer: "Tokenizer", role: str, content: str) -> list[int]:
    return encode_chat(tokenizer, [{"role": role, "content": content}])[0]


@dataclass
class ReplyStats:
    """How the last reply went: sizes, finish reason ("stop", "length", "interrupted") and timing."""

    prompt_tokens: int = 0
    reply_tokens: int = 0  # tokens of the reply's text
    generated_tokens: int = 0  # tokens the model produced: the reply's and the end marker that stopped it
    finish_reason: str | None = None
    first_token_s: float | None = None  # from the call to the first token (prefill included)
    total_s: float = 0.0

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed after the first token (the prefill is in first_token_s), the end marker counted: it
        costs a step like any other token."""
        if self.first_token_s is None or self.generated_tokens < 2 or self.total_s <= self.first_token_s:
            return None
        return (self.generated_tokens - 1) / (self.total_s - self.first_token_s)


class ChatSession:
    """A multi-turn conversation with a chat model; see the module docstring."""

    def __init__(self, model: "GPT", tokenizer: "Tokenizer", config: "SamplingConfig | None" = None, *,
                 system: str | None = None, seed: int | None = None,
                 notify: Callable[[str], None] | None = None) -> None:
        from ..generation import SamplingConfig

        require_chat_model(tokenizer, "the model")
        if tokenizer.vocab_size > model.config.vocab_size:
            raise UserError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
                            f"{model.config.vocab_size}; use the tokenizer the model was trained with")
        self.model = model
        self.tokenizer = tokenizer
        self.config = config if config is not None else SamplingConfig()
        self.seed = seed
        self.notify = notify
        self.end_ids = reply_end_ids(tokenizer)
        self.system: str | None = None
        self._turns: list[dict[str, str]] = []  # user/assistant messages, alternating, user first
        self._first = 0  # index into _turns of the first exchange the model still sees
        self._sent = 0  # turns asked in this conversation (the seed's counter)
        self._told = False
        self._longest_token: int | None = None  # bytes of the tokenizer's longest token (_least_tokens)
        self.last = ReplyStats()
        self.set_system(system)

    # ---- the conversation -----------------------------------------------------------------------------

    @property
    def messages(self) -> list[dict[str, str]]:
        """The whole conversation (dropped exchanges included), system message first if there is one."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [dict(m) for m in self._turns]

    @property
    def visible_messages(self) -> list[dict[str, str]]:
        """What the model sees next turn: the system message and the exchanges not yet dropped."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [dict(m) for m in self._turns[self._first:]]

    def set_system(self, text: str | None) -> None:
        """Set (or with None/"" remove) the system message; it applies from the next reply on."""
        if text is not None and not isinstance(text, str):
            raise UserError(f"the system message must be text, got {type(text).__name__}")
        self.system = text or None

    def load(self, messages: list[Mapping[str, Any]]) -> None:
        """Continue the conversation `messages` (a leading system message, then complete user/assistant
        exchanges: what `messages` returns or /save wrote), replacing the current one. A malformed message
        is a UserError (it comes from a user's file), saying which one."""
        try:
            checked = check_messages(messages)
        except ChatFormatError as e:
            raise UserError(f"cannot load the conversation: {e}") from None
        system = checked[0]["content"] if checked and checked[0]["role"] == "system" else None
        turns = checked[1:] if system is not None else checked
        for i, m in enumerate(turns):
            if m["role"] != ("user", "assistant")[i % 2]:
                raise UserError(f"message {i + (system is not None)} has role {m['role']!r}; after an optional "
                                "system message a conversation alternates user and assistant, user first")
        if len(turns) % 2:
            raise UserError("the conversation ends with a user message; give it to send() instead")
        self.reset()
        self.set_system(system)
        self._turns = [dict(m) for m in turns]

    def reset(self) -> None:
        """Start a new conversation (the system message stays)."""
        self._turns.clear()
        self._first = 0
        self._sent = 0
        self._told = False

    def undo(self) -> bool:
        """Drop the last exchange (the last user message and its reply); False if there was none."""
        if not self._turns:
            return False
        del self._turns[-2:]
        self._first = min(self._first, len(self._turns))
        return True

    def save(self, path: str | Path) -> Path:
        """Write the conversation as one `{"messages": [...]}` JSON line, the format `prepare --chat` reads.

        A new file in an existing folder only: a transcript never replaces a file, and a mistyped folder is
        reported rather than created (gptforge.outputs.TRANSCRIPT)."""
        from ..atomic import write_text
        from ..outputs import TRANSCRIPT, check_output

        path = Path(path)
        check_output(path, TRANSCRIPT, option="/save")
        write_text(path, json.dumps({"messages": self.messages}, ensure_ascii=False) + "\n")
        return path

    # ---- replies ----------------------------------------------------------------------------------------

    def prompt_ids(self, user_text: str | None = None) -> list[int]:
        """The ids the model would be given for the next reply (after `user_text`, if given), without
        dropping anything; `send` fits them to the context first."""
        turns = self._turns[self._first:] + ([{"role": "user", "content": user_text}] if user_text is not None else [])
        head = [{"role": "system", "content": self.system}] if self.system else []
        return encode_chat_prompt(self.tokenizer, head + turns)

    def send(self, text: str) -> Iterator[str]:
        """Stream the reply to the user's `text` as printable pieces.

        The exchange joins the conversation when the iterator ends, is closed or is interrupted (then with
        the part of the reply that was shown); an iterator never started changes nothing (not even which old
        exchanges are dropped to fit the context, nor the seed's turn count). A message too long for the
        context raises UserError here, before anything changes.
        """
        if not isinstance(text, str):
            raise UserError(f"a message must be text, got {type(text).__name__}")
        prompt, budget, first = self._fit(text)  # checked now; nothing is changed until the reply starts
        return self._stream(text, prompt, budget, first)

    def ask(self, text: str) -> str:
        """`send` collected into the whole reply."""
        return "".join(self.send(text))

    def _fit(self, text: str) -> tuple[list[int], int, int]:
        """Prompt ids for the next reply, its token budget, and the index of the first exchange the model
        sees (older ones dropped as needed). Changes nothing: `_stream` commits the drop when it starts.

        Room kept for the reply: max_new_tokens, but at most half the context, so a long max_new_tokens does
        not make a short context drop everything; the reply may then use all the context that is left.
        """
        block = self.model.config.block_size
        room = min(self.config.max_new_tokens, max(1, block // 2))
        least = self._least_tokens(text)
        if least + room > block:  # refused before encoding: a 5 MB message took ~1 GB and 15 s to encode
            raise UserError(f"the message is too long: it takes at least {least:,} tokens, and the model's context "
                            f"of {block} tokens must keep {room} for the reply; shorten it")
        head = _message_ids(self.tokenizer, "system", self.system) if self.system else []
        turns = self._turns + [{"role": "user", "content": text}]
        parts = [_message_ids(self.tokenizer, m["role"], m["content"]) for m in turns]
        tail = encode_chat_prompt(self.tokenizer, [])  # <|im_start|>assistant\n
        first = self._first
        while True:
            size = len(head) + sum(len(p) for p in parts[first:]) + len(tail)
            if size + room <= block or first >= len(parts) - 1:
                break
            first += 2  # one exchange: a user message and its reply
        if size + room > block:
            what = "with the system message " if self.system else ""
            raise UserError(f"the message is too long: {what}it takes {size} tokens, and the model's context of "
                            f"{block} tokens must keep {room} for the reply; shorten it"
                            + (" or the system message (/system)" if self.system else ""))
        prompt = head + [t for p in parts[first:] for t in p] + tail
        return prompt, min(self.config.max_new_tokens, block - len(prompt)), first

    def _least_tokens(self, text: str) -> int:
        """A floor on the tokens `text` takes, without encoding it: one token stands for at most the bytes
        of the tokenizer's longest one, and a character is at least one byte. Texts no longer than the
        context (in characters) skip it; the longest token is looked up once, when first needed."""
        if len(text) <= self.model.config.block_size:
            return 0
        if self._longest_token is None:
            decode = self.tokenizer.decode_bytes
            self._longest_token = max(1, max(len(decode([i])) for i in range(self.tokenizer.vocab_size)))
        return len(text) // self._longest_token

    def _drop_before(self, first: int) -> None:
        """Leave the exchanges before `first` out of what the model sees from now on; tell the user once."""
        if first <= self._first:
            return
        self._first = first
        if not self._told:
            self._told = True
            if self.notify is not None:
                self.notify(f"the conversation outgrew the model's context of {self.model.config.block_size} "
                            "tokens: the oldest exchanges are left out from now on (the system message is kept; "
                            "/save still saves everything)")

    def _stream(self, text: str, prompt: list[int], budget: int, first: int) -> Iterator[str]:
        from ..generation import TokenGenerator
        from ..generation.sampling import row_seed
        from ..generation.text import TextStream

        self._drop_before(first)  # a generator's body runs at its first next(): never for one not started
        config = self.config.replace(max_new_tokens=budget, stop_at_eot=True)
        seed = None if self.seed is None else row_seed(self.seed, self._sent)
        self._sent += 1
        stats = self.last = ReplyStats(prompt_tokens=len(prompt))
        engine = TokenGenerator(self.model, [prompt], [config], [seed], eot_id=self.end_ids,  # it stops at each
                                tokenizer=self.tokenizer)  # (a JSON grammar is described in its tokens)
        stream = TextStream(self.tokenizer.decode_bytes, config.stop)
        shown = ""
        start = time.perf_counter()
        try:
            for events in engine:
                for e in events:
                    if stats.first_token_s is None:
                        stats.first_token_s = time.perf_counter() - start
                    stats.generated_tokens += 1
                    reason = e.finish_reason
                    if e.token in self.end_ids:  # the engine has ended the row (reason "stop"); not text
                        piece = ""
                    else:
                        stats.reply_tokens += 1
                        piece = stream.push(e.token)
                        if stream.stopped:
                            reason = "stop"
                            engine.finish(e.index)
                    if reason:
                        piece += stream.close()
                        stats.finish_reason = reason
                    if piece:
                        shown += piece
                        yield piece
        finally:
            stats.total_s = time.perf_counter() - start
            if stats.finish_reason is None:
                stats.finish_reason = "interrupted"
            self._turns += [{"role": "user", "content": text}, {"role": "assistant", "content": shown}]
