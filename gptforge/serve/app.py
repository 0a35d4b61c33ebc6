"""The HTTP side of `gptforge serve`: routes, request bodies, and each request carried through the generation
loop (batcher.py) to its answer (responses.py shapes it; jobs.py turns a body into the loop's jobs).

Every user error is a 4xx with OpenAI's body `{"error": {"message", "type", "param", "code"}}`: the official
client retries a 5xx twice, so a bad request answered with 500 would run three times. Bodies are read by the
transport's middleware (transport.py, not by FastAPI) so that bad JSON, invalid UTF-8, a body too large (413)
or too slow (408) each get their own clear answer, and validation errors name the field that is wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
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
from .batcher import Batcher, Event, Job, PromptScores, QueueFull
from .jobs import build_jobs, completion_prompts
from .responses import APIError, Reply, error_response, next_item
from .schemas import ChatRequest, CompletionRequest
from .transport import BodyAndAuth

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
    request_timeout_s: float = 30.0  # a client that takes longer to send its request (head and body) gets 408
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer KEY`


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
                self.chat_error = ("this model's chat template is not gptforge's ChatML; it is served for "
                                   "/v1/completions only")
        else:
            self.chat_error = (f"this is a base model without a chat template (no {IM_START}/{IM_END} tokens), so it "
                               "serves /v1/completions only; fine-tune it into a chat model with `gptforge sft`")
        # the rule ChatSession follows (chat.tokens.reply_end_ids: <|im_end|>, <|im_start|>, end-of-text), so a
        # served reply is the reply `gptforge chat` gives; a base model ends only at end-of-text
        self.end_ids = reply_end_ids(tokenizer) if has_chat_tokens(tokenizer) else frozenset({tokenizer.eot_id})
        self.batcher = Batcher(model, tokenizer.decode_bytes, tokenizer.vocab_size, settings.max_rows,
                               settings.max_queued)


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

    app.add_middleware(BodyAndAuth, settings=settings)

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
        return await respond(request, s, body, [prompt], limit, param, logprobs=top, echo=False)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _parse(request, CompletionRequest)
        s = served()
        _check_model(body.model, name)
        prompts = completion_prompts(s.tokenizer, body.prompt)
        limit = body.max_tokens if body.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
        return await respond(request, s, body, prompts, limit, "max_tokens", logprobs=body.logprobs, echo=body.echo)

    async def respond(request: Request, s: _Served, body: Any, prompts: list[list[int]], limit: int | None,
                      limit_param: str, logprobs: int | None, echo: bool):
        # in a worker thread: compiling a response_format schema may take a few hundred ms (bounded by its
        # size), which must not hold up the streams the event loop is serving
        jobs = await asyncio.to_thread(
            build_jobs, body, prompts, block_size=s.block_size, end_ids=s.end_ids, max_rows=settings.max_rows,
            max_queued=settings.max_queued, max_prompts=settings.max_prompts, limit=limit,
            limit_param=limit_param, logprobs=logprobs, echo=echo, tokenizer=s.tokenizer)
        reply = Reply(s.tokenizer, chat=hasattr(body, "messages"), name=name, prompts=prompts, n=body.n,
                      logprobs=logprobs, echo=echo)
        return await _Run(s.batcher, jobs, reply, body).respond(request)

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


class _Run:
    """One request's jobs in the generation loop, and their events carried to the client as `reply` shapes
    them, whole or streamed; the jobs are cancelled as soon as the client goes away."""

    def __init__(self, batcher: Batcher, jobs: list[Job], reply: Reply, body: Any) -> None:
        self.batcher, self.jobs, self.reply, self.body = batcher, jobs, reply, body

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
            self.batcher.submit(self.jobs)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry later", "rate_limit_error", code="queue_full")
        remaining = self.reply.n_choices
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

    async def respond(self, request: Request):
        events = self.events()
        if self.body.stream:
            include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
            # Submit and wait for the first event before the response starts, so a full queue is a 429 rather
            # than an error mid-stream. Once it streams, the StreamingResponse watches for the client leaving.
            first = await self._unless_gone(request, events, next_item(events))
            return StreamingResponse(self.reply.sse(first, events, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return JSONResponse(await self._unless_gone(request, events, self.reply.collect(events)))

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


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the server's http.disconnect), which may be never. The body has
    been read by then, so nothing else this receives is of use."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
