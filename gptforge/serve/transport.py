"""The HTTP transport's guards, as ASGI middleware: the API key on /v1/*, and the request body read whole
before the app sees it, with a size limit (413) and a time limit (408), so a client cannot hold a row, a
queue place or a handler by sending slowly or too much. The time limit is one deadline for the whole
request: under `server.server_config` the clock started with the request's first byte (its head has the
same deadline there, before any app runs) and `scope["extensions"][REQUEST_START]` says when; under another
server, with the app's first call."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi.responses import JSONResponse

from .responses import error_response

if TYPE_CHECKING:
    from .app import ServeSettings

REQUEST_START = "gptforge.request_start"  # scope["extensions"] key: time.monotonic() when the request began

class BodyAndAuth:
    """ASGI middleware: the API key on /v1/*, and the request body read here with a size limit (413) and a
    time limit (408), then handed on whole."""

    def __init__(self, app: Any, settings: "ServeSettings") -> None:
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
        timeout = self.settings.request_timeout_s
        started = (scope.get("extensions") or {}).get(REQUEST_START, time.monotonic())
        deadline = started + timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return await error_response(408, f"the request took longer than {timeout:g} s to arrive",
                                            code="request_timeout")(scope, receive, send)
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
