"""The OpenAI protocol's answers, shaped from the generation loop's events: chat and completions bodies, SSE
chunks, logprobs, usage and error bodies. Nothing here knows HTTP (app.py carries these answers); nothing
here generates (batcher.py does): it only turns `Event`s and `PromptScores` into the protocol's JSON.

Every generated token counted in `usage.completion_tokens` has its logprobs entry when logprobs were asked
for, the end token (`<|im_end|>`, `<|endoftext|>`) included, as OpenAI, vLLM and llama.cpp return it:
lm-evaluation-harness drops the last entry as the generated token's, so leaving the end token out would
make it drop a token of the text it scores instead.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi.responses import JSONResponse

from .batcher import Event, PromptScores, TokenInfo

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer


class APIError(Exception):
    """A request the server answers with the protocol's error body (4xx for the client's mistakes)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code)


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status_code=status)


async def next_item(events: AsyncIterator[Any]) -> Any:
    """The next event, or None at the end."""
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return None


class Reply:
    """The answer to one request of `len(prompts) x n` choices, whole (`collect`) or streamed (`sse`).

    `logprobs`: None (not asked), else how many alternatives each entry lists; `echo` (completions): the
    prompt goes before each choice's text, with its tokens' log-probabilities when logprobs are asked."""

    def __init__(self, tokenizer: "Tokenizer", *, chat: bool, name: str, prompts: list[list[int]], n: int,
                 logprobs: int | None, echo: bool) -> None:
        self.tokenizer, self.chat, self.name = tokenizer, chat, name
        self.prompts, self.n, self.logprobs, self.echo = prompts, n, logprobs, echo
        self.n_choices = len(prompts) * n
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    def usage(self, completion_tokens: int) -> dict[str, int]:
        prompt_tokens = sum(len(p) for p in self.prompts)  # once per prompt, whatever n is (as OpenAI counts)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def token_text(self, token: int) -> str:
        """A token as text: special tokens as their marker text ("<|im_end|>"), as vLLM and llama.cpp show them."""
        return self.tokenizer.decode_bytes([token]).decode("utf-8", errors="replace")

    def chat_logprob(self, info: TokenInfo) -> dict[str, Any]:
        def entry(token: int, logprob: float) -> dict[str, Any]:
            return {"token": self.token_text(token), "logprob": logprob,
                    "bytes": list(self.tokenizer.decode_bytes([token]))}
        return {**entry(info.token, info.logprob), "top_logprobs": [entry(t, lp) for t, lp in info.top]}

    def completion_logprobs(self, infos: list[TokenInfo], first_prompt_token: int | None, offset: int
                            ) -> tuple[dict[str, Any], int]:
        """The completions protocol's logprobs of these tokens, the first at `offset` in the text; and the
        offset after the last (where a stream's next chunk goes on)."""
        tokens, logprobs, tops, offsets = [], [], [], []
        position = offset
        if first_prompt_token is not None:  # echo: the prompt's first token has no logprob
            text = self.token_text(first_prompt_token)
            tokens.append(text), logprobs.append(None), tops.append(None), offsets.append(position)
            position += len(text)
        for info in infos:
            text = self.token_text(info.token)
            tokens.append(text)
            logprobs.append(info.logprob)
            tops.append({self.token_text(t): lp for t, lp in info.top})
            offsets.append(position)
            position += len(text)
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}, position

    # ---- the whole answer -------------------------------------------------------------------------------

    async def collect(self, events: AsyncIterator[Any]) -> dict[str, Any]:
        """The response body, once every choice has finished."""
        texts = [""] * self.n_choices
        reasons: list[str | None] = [None] * self.n_choices
        counts = [0] * self.n_choices
        infos: list[list[TokenInfo]] = [[] for _ in range(self.n_choices)]
        prompt_infos: dict[int, list[TokenInfo]] = {}
        try:
            async for item in events:
                if isinstance(item, PromptScores):
                    prompt_infos[item.choice_offset] = item.infos
                    continue
                c = item.choice
                texts[c] += item.text
                infos[c] += item.infos
                if item.finish_reason:
                    reasons[c] = item.finish_reason
                    counts[c] = item.completion_tokens
        finally:
            await events.aclose()
        choices = []
        n = self.n
        for c in range(self.n_choices):
            if self.chat:
                choices.append({"index": c, "message": {"role": "assistant", "content": texts[c], "refusal": None},
                                "logprobs": {"content": [self.chat_logprob(i) for i in infos[c]]}
                                if self.logprobs is not None else None,
                                "finish_reason": reasons[c]})
                continue
            prompt = self.prompts[c // n]
            prefix = self.tokenizer.decode(prompt) if self.echo else ""
            logprobs = None
            if self.logprobs is not None:
                if self.echo:
                    scored = prompt_infos.get((c // n) * n, [])
                    logprobs, _ = self.completion_logprobs(scored + infos[c], prompt[0], 0)
                else:
                    logprobs, _ = self.completion_logprobs(infos[c], None, 0)
            choices.append({"index": c, "text": prefix + texts[c], "logprobs": logprobs, "finish_reason": reasons[c]})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.name, "system_fingerprint": None, "choices": choices,
                "usage": self.usage(sum(counts))}

    # ---- the streamed answer ----------------------------------------------------------------------------

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None, with_usage: bool) -> str:
        body: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                                "created": self.created, "model": self.name, "system_fingerprint": None,
                                "choices": choices}
        if with_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def sse(self, first: Any, events: AsyncIterator[Any], include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: `first` (already read from `events`), then the rest, each as it comes; the
        usage chunk when asked; `[DONE]`. An error once streaming has begun is an `error` event."""
        def chunk(choices: list[dict[str, Any]]) -> str:
            return self._chunk(choices, None, include_usage)

        counts = [0] * self.n_choices
        offsets = [0] * self.n_choices  # completions with logprobs: where each choice's next token starts
        n = self.n
        try:
            if self.chat:
                for c in range(self.n_choices):
                    yield chunk([{"index": c, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
            elif self.echo and self.logprobs is None:  # with logprobs, the prompt goes out once it is scored
                for c in range(self.n_choices):
                    yield chunk([{"index": c, "text": self.tokenizer.decode(self.prompts[c // n]),
                                  "logprobs": None, "finish_reason": None}])
            item = first
            while item is not None:
                if isinstance(item, PromptScores):  # echo with logprobs: a job's prompt, before its replies
                    prompt = self.prompts[item.choice_offset // n]
                    logprobs, end = self.completion_logprobs(item.infos, prompt[0], 0)
                    for c in range(item.choice_offset, item.choice_offset + n):
                        offsets[c] = end
                        yield chunk([{"index": c, "text": self.tokenizer.decode(prompt), "logprobs": logprobs,
                                      "finish_reason": None}])
                elif item.text or item.finish_reason or item.infos:
                    c = item.choice
                    if item.finish_reason:
                        counts[c] = item.completion_tokens
                    yield chunk([self._delta(item, offsets)])
                item = await next_item(events)
            if include_usage:
                yield self._chunk([], self.usage(sum(counts)), True)
            yield "data: [DONE]\n\n"
        except APIError as e:
            error = {"message": e.message, "type": e.type, "param": None, "code": e.code}
            yield f"data: {json.dumps({'error': error})}\n\n"
        finally:
            await events.aclose()

    def _delta(self, item: Event, offsets: list[int]) -> dict[str, Any]:
        """One choice's part of a chunk: its new text (and the logprobs of the tokens that text starts)."""
        c = item.choice
        if self.chat:
            delta = {"content": item.text} if item.text or not item.finish_reason else {}
            logprobs = {"content": [self.chat_logprob(i) for i in item.infos]} if item.infos else None
            return {"index": c, "delta": delta, "logprobs": logprobs, "finish_reason": item.finish_reason}
        completion_logprobs = None
        if item.infos:
            completion_logprobs, offsets[c] = self.completion_logprobs(item.infos, None, offsets[c])
        return {"index": c, "text": item.text, "logprobs": completion_logprobs, "finish_reason": item.finish_reason}
