"""The HTTP side of `gptforge serve`: the OpenAI protocol over the generation loop (batcher.py).

Every user error is a 4xx with OpenAI's body `{"error": {"message", "type", "param", "code"}}`: the official
client retries a 5xx twice, so a bad request answered with 500 would run three times. Bodies are read here
(not by FastAPI) so that bad JSON, invalid UTF-8, a body too large (413) or too slow (408) each get their
own clear answer, and validation errors name the field that is wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import secrets
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import UserError
from .batcher import Batcher, Event, Job, PromptScores, QueueFull, TokenInfo
from .schemas import ChatRequest, CompletionRequest

if TYPE_CHECKING:
    from ..model import GPT
    from ..tokenizer import Tokenizer

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the protocol's default for /v1/completions


@dataclass
class ServeSettings:
    """Limits that protect the server, and its name and key."""

    max_rows: int = 16  # rows generated together (one request's n choices count n)
    max_queued: int = 64  # prompts waiting for rows; more get 429 (one request with more prompts: 400)
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    max_messages: int = 512  # messages in one chat request
    max_prompts: int = 64  # completions: prompts x n in one request
    body_timeout_s: float = 30.0  # a client that takes longer to send its body gets 408
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer KEY`


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code)


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status_code=status)


class _Served:
    """The model behind the app, once loaded."""

    def __init__(self, model: "GPT", tokenizer: "Tokenizer", settings: ServeSettings) -> None:
        from ..chat.session import chat_template
        from ..chat.template import IM_END, IM_START
        from ..chat.tokens import has_chat_tokens, reply_end_ids

        if tokenizer.vocab_size > model.config.vocab_size:
            raise UserError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
                            f"{model.config.vocab_size}; use the tokenizer the model was trained with")
        self.model, self.tokenizer = model, tokenizer
        self.block_size = model.config.block_size
        self.is_chat = has_chat_tokens(tokenizer) and chat_template(tokenizer) is not None
        self.chat_error = None
        if self.is_chat:
            from ..chat.template import CHAT_TEMPLATE
            if chat_template(tokenizer) != CHAT_TEMPLATE:
                self.is_chat = False
                self.chat_error = "this model's chat template is not gptforge's ChatML; it is served for /v1/completions only"
        else:
            self.chat_error = (f"this is a base model without a chat template (no {IM_START}/{IM_END} tokens), so it "
                               "serves /v1/completions only; fine-tune it into a chat model with `gptforge sft`")
        # the rule ChatSession follows (chat.tokens.reply_end_ids: <|im_end|>, <|im_start|>, end-of-text), so a
        # served reply is the reply `gptforge chat` gives; a base model ends only at end-of-text
        self.end_ids = reply_end_ids(tokenizer) if has_chat_tokens(tokenizer) else frozenset({tokenizer.eot_id})
        self.batcher = Batcher(model, tokenizer.decode_bytes, tokenizer.vocab_size, settings.max_rows,
                               settings.max_queued)

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode_bytes([token]).decode("utf-8", errors="replace")


def create_app(model: "GPT | None" = None, tokenizer: "Tokenizer | None" = None, *, name: str = "gptforge",
               settings: ServeSettings | None = None,
               loader: Callable[[], tuple["GPT", "Tokenizer"]] | None = None,
               on_load_error: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The ASGI app serving `model` with `tokenizer` under the model id `name`.

    `loader`: instead of a model, a function that loads one; it runs in a thread (`app.state.loader_thread`)
    started with the app (its lifespan), and until it returns /health answers 503 (so a supervisor can wait
    for readiness) and /v1/* answer 503. If loading fails, even in setting up what `loader` returned (a
    tokenizer the model cannot take), /health and /v1/* say so and `on_load_error` is called with the error
    (in the loader's thread): a command stops its server there. The generation loop is a daemon thread;
    `app.state.close()` stops it (run at the app's shutdown).
    """
    settings = settings or ServeSettings()
    if (model is None) == (loader is None):
        raise ValueError("give a model and tokenizer, or a loader")
    # created: when the model was loaded (or, while it loads, the app made), as /v1/models reports it
    state: dict[str, Any] = {"served": None, "load_error": None, "created": int(time.time())}

    def close() -> None:
        if state["served"] is not None:
            state["served"].batcher.close()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if loader is not None:  # started here, not in create_app: whoever runs the app exists by now
            app.state.loader_thread.start()
        yield
        # the server is stopping: end the generation loop, in a thread (joining it may take a decode step or
        # a prefill, and the event loop still serves the connections being closed)
        await asyncio.to_thread(close)

    app = FastAPI(title="gptforge", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.settings = settings
    app.state.model_name = name

    def ready(served: _Served) -> None:
        state["created"] = int(time.time())
        state["served"] = served
        app.state.batcher = served.batcher

    if loader is None:
        if tokenizer is None:
            raise ValueError("a tokenizer is needed to serve text")
        ready(_Served(model, tokenizer, settings))
    else:
        def load() -> None:
            try:
                ready(_Served(*loader(), settings))
            except BaseException as e:  # reported by /health and every request, and to on_load_error
                state["load_error"] = e
                if on_load_error is not None:
                    on_load_error(e)
        app.state.loader_thread = threading.Thread(target=load, name="gptforge-serve-loader", daemon=True)

    app.state.close = close

    def served() -> _Served:
        if state["served"] is None:
            if state["load_error"] is not None:
                raise APIError(503, f"the model failed to load: {state['load_error']}", "server_error")
            raise APIError(503, "the model is still loading; retry shortly", "server_error", code="loading")
        return state["served"]

    app.add_middleware(_BodyAndAuth, settings=settings)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, f"{request.method} {request.url.path}: {e.detail}", kind)

    @app.get("/health")
    async def health() -> JSONResponse:
        if state["served"] is None:
            detail = "loading" if state["load_error"] is None else f"failed: {state['load_error']}"
            return JSONResponse({"status": detail}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        html = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Content-Security-Policy":
                                           "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'"})

    def model_card() -> dict[str, Any]:
        card = {"id": name, "object": "model", "created": state["created"], "owned_by": "gptforge"}
        if state["served"] is not None:  # the context in tokens, under vLLM's name for it (the page reads it)
            card["max_model_len"] = state["served"].block_size
        return card

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def model_info(model_id: str) -> JSONResponse:
        if model_id != name:
            raise _model_not_found(model_id, name)
        return JSONResponse(model_card())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _parse(request, ChatRequest)
        s = served()
        _check_model(body.model, name)
        if not s.is_chat:
            raise APIError(400, s.chat_error, param="messages", code="not_a_chat_model")
        if len(body.messages) > settings.max_messages:
            raise APIError(400, f"{len(body.messages)} messages; this server takes at most {settings.max_messages}",
                           param="messages")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        from ..chat.tokens import encode_chat_prompt
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        prompt = encode_chat_prompt(s.tokenizer, messages)
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        top = (body.top_logprobs or 0) if body.logprobs else None
        run = _Run(s, settings, body, [prompt], limit, param, None, logprobs=top, echo=False)
        return await run.respond(request, chat=True, name=name)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _parse(request, CompletionRequest)
        s = served()
        _check_model(body.model, name)
        prompts = _completion_prompts(s, body.prompt)
        limit = body.max_tokens if body.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
        run = _Run(s, settings, body, prompts, limit, "max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS,
                   logprobs=body.logprobs, echo=body.echo)
        return await run.respond(request, chat=False, name=name)

    return app


def _model_not_found(requested: str, name: str) -> APIError:
    return APIError(404, f"the model {requested!r} does not exist; this server serves {name!r} (GET /v1/models)",
                    "invalid_request_error", param="model", code="model_not_found")


def _check_model(requested: str | None, name: str) -> None:
    if requested is not None and requested != name:
        raise _model_not_found(requested, name)


async def _parse(request: Request, schema: type[BaseModel]) -> Any:
    """The request body as `schema`, or a 400 naming what is wrong."""
    raw = await request.body()
    try:
        data = json.loads(raw.decode("utf-8"))  # strict: no encoded surrogates either
        # text escaped as "\ud800" is valid JSON but not text: refuse lone surrogates before a tokenizer sees them
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 ({e.reason} at byte {e.start})")
    except UnicodeEncodeError:
        raise APIError(400, "the request body has a lone surrogate escape (\\ud800-\\udfff): not valid text")
    except (json.JSONDecodeError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}")
    except ValueError:  # valid JSON that Python will not read: an integer past its digit limit (4300)
        raise APIError(400, f"the request body has an integer of more than {sys.get_int_max_str_digits()} digits")
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        return_msg = f"{param}: {first['msg']}" if param else first["msg"]
        raise APIError(400, return_msg, param=param)
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply")


def _completion_prompts(s: _Served, prompt: Any) -> list[list[int]]:
    from ..generation.api import encode_prompts

    if isinstance(prompt, str):
        return encode_prompts(s.tokenizer, [prompt])
    if not prompt:
        raise APIError(400, "prompt is an empty list; give text, a list of texts or token ids", param="prompt")
    if isinstance(prompt[0], str):
        return encode_prompts(s.tokenizer, prompt)
    lists = [prompt] if isinstance(prompt[0], int) else prompt
    vocab = s.tokenizer.vocab_size
    for i, ids in enumerate(lists):
        if not ids:
            raise APIError(400, f"prompt {i} is an empty list of token ids", param="prompt")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"prompt {i} has token ids outside the vocabulary (0..{vocab - 1}): {bad[:5]}",
                           param="prompt")
    return [list(ids) for ids in lists]


class _Run:
    """One request turned into batcher jobs, and their events turned into the protocol's answer."""

    def __init__(self, s: _Served, settings: ServeSettings, body: Any, prompts: list[list[int]], limit: int | None,
                 limit_param: str, default_limit: int | None, logprobs: int | None, echo: bool) -> None:
        from ..generation import SamplingConfig
        from ..generation.sampling import row_seed

        self.s, self.body, self.prompts, self.echo, self.logprobs = s, body, prompts, echo, logprobs
        n = body.n
        if n > settings.max_rows:
            raise APIError(400, f"n = {n}: this server generates at most {settings.max_rows} choices at once",
                           param="n")
        if len(prompts) * n > settings.max_prompts:
            raise APIError(400, f"{len(prompts)} prompts x n = {n} is {len(prompts) * n} completions; at most "
                                f"{settings.max_prompts} per request", param="prompt")
        if len(prompts) > settings.max_queued:  # one queued job per prompt: this request could never be queued
            raise APIError(400, f"{len(prompts)} prompts: this server queues at most {settings.max_queued} at a time; "
                                "send fewer prompts per request", param="prompt")
        block = s.block_size
        if limit is not None and (limit < 0 or limit == 0 and not echo):
            raise APIError(400, f"{limit_param} must be a positive integer, got {limit}", param=limit_param)
        if limit is not None and limit > block:
            raise APIError(400, f"{limit_param} = {limit} is more than the model's context of {block} tokens",
                           param=limit_param)
        self.generate = limit != 0
        stops = body.stops()
        if any(not s for s in stops):
            raise APIError(400, "stop strings must not be empty", param="stop")
        temperature = 1.0 if body.temperature is None else body.temperature
        top_p = 1.0 if body.top_p is None else body.top_p
        self.jobs: list[Job] = []
        for p, prompt in enumerate(prompts):
            room = block - len(prompt)
            if room < (1 if self.generate else 0):
                over = len(prompt) - block + (1 if self.generate else 0)
                raise APIError(400, f"the prompt takes {len(prompt)} tokens and the model's context holds {block}"
                                    f"{' with at least 1 for the reply' if self.generate else ''}: shorten it by "
                                    f"{over} tokens", param="messages" if hasattr(body, "messages") else "prompt",
                               code="context_length_exceeded")
            budget = max(1, min(room, limit if limit is not None else room))
            try:
                config = SamplingConfig(max_new_tokens=budget, temperature=temperature, top_p=top_p, stop=stops)
            except UserError as e:  # "--top-p: why": name the field as the request spells it
                option, _, why = str(e).partition(": ")
                field = option.removeprefix("--").replace("-", "_")
                field = limit_param if field == "max_new_tokens" else field
                raise APIError(400, f"{field}: {why}", param=field)
            seeds = [None if body.seed is None else row_seed(body.seed % (1 << 64), p * n + c) for c in range(n)]
            end_ids = frozenset() if body.ignore_eos else s.end_ids
            self.jobs.append(Job(prompt, [config] * n, seeds, deliver=None, end_ids=end_ids,  # type: ignore[arg-type]
                                 logprobs=logprobs, echo_logprobs=echo and logprobs is not None,
                                 presence_penalty=body.presence_penalty or 0.0,
                                 frequency_penalty=body.frequency_penalty or 0.0, choice_offset=p * n,
                                 generate=self.generate))
        self.n_choices = len(prompts) * n
        self.id = ("chatcmpl-" if hasattr(body, "messages") else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    async def events(self) -> AsyncIterator[Event | PromptScores]:
        """Submit the jobs; yield their events until every choice has finished. Cancels the jobs when the
        consumer stops early (a client that went away)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def deliver(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutdown); nobody is listening
                pass

        for job in self.jobs:
            job.deliver = deliver
        try:
            self.s.batcher.submit(self.jobs)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry later", "rate_limit_error", code="queue_full")
        remaining = self.n_choices
        try:
            while remaining:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise APIError(500, f"generation failed: {item}", "server_error")
                if isinstance(item, Event) and item.finish_reason:
                    remaining -= 1
                yield item
        finally:
            for job in self.jobs:
                job.cancel()

    async def respond(self, request: Request, chat: bool, name: str):
        events = self.events()
        if self.body.stream:
            include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
            # Submit and wait for the first event before the response starts, so a full queue is a 429 rather
            # than an error mid-stream. Once it streams, the StreamingResponse watches for the client leaving.
            first = await self._unless_gone(request, events, _next(events))
            return StreamingResponse(self._sse(first, events, chat, name, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return JSONResponse(await self._unless_gone(request, events, self._collect(events, chat, name)))

    async def _unless_gone(self, request: Request, events: AsyncIterator[Any], work: Any) -> Any:
        """The result of `work` (which reads `events`), however long it takes; but if the client disconnects
        first, its jobs are cancelled at once, so rows (or its place in the queue) go to clients still there.
        Waiting is never a reason to stop: a request queued behind a full batch or a slow model gets its
        whole reply."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this handler is cancelled (the server shutting down)
            gone.cancel()
            left = not task.done()
            if left:
                for job in self.jobs:
                    job.cancel()
                task.cancel()
            await asyncio.wait({task, gone})  # both ended before anything else reads `events` or the client
            if left:
                await events.aclose()
        if task.cancelled():
            raise APIError(400, "the client went away", code="client_closed")  # nobody reads this
        return task.result()

    # ---- pieces of the answer -----------------------------------------------------------------------

    def _usage(self, completion_tokens: int) -> dict[str, int]:
        prompt_tokens = sum(len(p) for p in self.prompts)  # once per prompt, whatever n is (as OpenAI counts)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def _chat_logprob(self, info: TokenInfo) -> dict[str, Any]:
        def entry(token: int, logprob: float) -> dict[str, Any]:
            return {"token": self.s.token_text(token), "logprob": logprob,
                    "bytes": list(self.s.tokenizer.decode_bytes([token]))}
        return {**entry(info.token, info.logprob), "top_logprobs": [entry(t, lp) for t, lp in info.top]}

    def _completion_logprobs(self, infos: list[TokenInfo], first_prompt_token: int | None, offset: int
                             ) -> tuple[dict[str, Any], int]:
        """The completions protocol's logprobs of these tokens, the first at `offset` in the text; and the
        offset after the last (where a stream's next chunk goes on)."""
        tokens, logprobs, tops, offsets = [], [], [], []
        position = offset
        if first_prompt_token is not None:  # echo: the prompt's first token has no logprob
            text = self.s.token_text(first_prompt_token)
            tokens.append(text), logprobs.append(None), tops.append(None), offsets.append(position)
            position += len(text)
        for info in infos:
            text = self.s.token_text(info.token)
            tokens.append(text)
            logprobs.append(info.logprob)
            tops.append({self.s.token_text(t): lp for t, lp in info.top})
            offsets.append(position)
            position += len(text)
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}, position

    async def _collect(self, events: AsyncIterator[Any], chat: bool, name: str) -> dict[str, Any]:
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
        n = self.body.n
        for c in range(self.n_choices):
            if chat:
                choices.append({"index": c, "message": {"role": "assistant", "content": texts[c], "refusal": None},
                                "logprobs": {"content": [self._chat_logprob(i) for i in infos[c]]}
                                if self.logprobs is not None else None,
                                "finish_reason": reasons[c]})
                continue
            prompt = self.prompts[c // n]
            prefix = self.s.tokenizer.decode(prompt) if self.echo else ""
            logprobs = None
            if self.logprobs is not None:
                if self.echo:
                    scored = prompt_infos.get((c // n) * n, [])
                    logprobs, _ = self._completion_logprobs(scored + infos[c], prompt[0], 0)
                else:
                    logprobs, _ = self._completion_logprobs(infos[c], None, 0)
            choices.append({"index": c, "text": prefix + texts[c], "logprobs": logprobs, "finish_reason": reasons[c]})
        return {"id": self.id, "object": "chat.completion" if chat else "text_completion", "created": self.created,
                "model": name, "system_fingerprint": None, "choices": choices, "usage": self._usage(sum(counts))}

    async def _sse(self, first: Any, events: AsyncIterator[Any], chat: bool, name: str, include_usage: bool
                   ) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None, with_usage: bool = include_usage
                  ) -> str:
            body: dict[str, Any] = {"id": self.id, "object": obj, "created": self.created, "model": name,
                                    "system_fingerprint": None, "choices": choices}
            if with_usage:
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        counts = [0] * self.n_choices
        offsets = [0] * self.n_choices  # completions with logprobs: where each choice's next token starts
        n = self.body.n
        try:
            if chat:
                for c in range(self.n_choices):
                    yield chunk([{"index": c, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
            elif self.echo and self.logprobs is None:  # with logprobs, the prompt goes out once it is scored
                for c in range(self.n_choices):
                    yield chunk([{"index": c, "text": self.s.tokenizer.decode(self.prompts[c // n]),
                                  "logprobs": None, "finish_reason": None}])
            item = first
            while item is not None:
                if isinstance(item, PromptScores):  # echo with logprobs: a job's prompt, before its replies
                    prompt = self.prompts[item.choice_offset // n]
                    logprobs, end = self._completion_logprobs(item.infos, prompt[0], 0)
                    for c in range(item.choice_offset, item.choice_offset + n):
                        offsets[c] = end
                        yield chunk([{"index": c, "text": self.s.tokenizer.decode(prompt), "logprobs": logprobs,
                                      "finish_reason": None}])
                elif item.text or item.finish_reason or item.infos:
                    c = item.choice
                    if item.finish_reason:
                        counts[c] = item.completion_tokens
                    if chat:
                        delta = {"content": item.text} if item.text or not item.finish_reason else {}
                        logprobs = {"content": [self._chat_logprob(i) for i in item.infos]} if item.infos else None
                        yield chunk([{"index": c, "delta": delta, "logprobs": logprobs,
                                      "finish_reason": item.finish_reason}])
                    else:
                        logprobs = None
                        if item.infos:
                            logprobs, offsets[c] = self._completion_logprobs(item.infos, None, offsets[c])
                        yield chunk([{"index": c, "text": item.text, "logprobs": logprobs,
                                      "finish_reason": item.finish_reason}])
                item = await _next(events)
            if include_usage:
                yield chunk([], self._usage(sum(counts)), True)
            yield "data: [DONE]\n\n"
        except APIError as e:
            yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.type, 'param': None, 'code': e.code}})}\n\n"
        finally:
            await events.aclose()


async def _next(events: AsyncIterator[Any]) -> Any:
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return None


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the server's http.disconnect), which may be never. The body has
    been read by then, so nothing else this receives is of use."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _BodyAndAuth:
    """ASGI middleware: the API key on /v1/*, and the request body read here with a size limit (413) and a
    time limit (408), then handed on whole."""

    def __init__(self, app: Any, settings: ServeSettings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = self.settings.api_key
        if key is not None and scope["path"].startswith("/v1/"):
            # bytes against bytes: the header as sent, the key as UTF-8 (as clients send a key beyond ASCII)
            given = next((v for k, v in scope.get("headers", []) if k.lower() == b"authorization"), b"")
            if not (given.startswith(b"Bearer ") and hmac.compare_digest(given[7:], key.encode("utf-8"))):
                return await error_response(401, "missing or wrong API key: send `Authorization: Bearer KEY`",
                                            "invalid_request_error", code="invalid_api_key")(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = self.settings.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                return await error_response(400, f"bad Content-Length {declared!r}")(scope, receive, send)
            if int(declared) > limit:
                return await _too_large(limit)(scope, receive, send)
        chunks, size = [], 0
        deadline = time.monotonic() + self.settings.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return await error_response(408, f"the request body took longer than {self.settings.body_timeout_s:g} s "
                                                 "to arrive")(scope, receive, send)
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await _too_large(limit)(scope, receive, send)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _too_large(limit: int) -> JSONResponse:
    return error_response(413, f"the request body is larger than this server accepts ({limit} bytes)",
                          code="request_too_large")
