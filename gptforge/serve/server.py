"""How `gptforge serve` runs its app under uvicorn: `server_config(app, ...)` is uvicorn's Config with one
deadline for each whole request, its head included.

uvicorn times nothing before a request's head is complete (its keep-alive timer runs only between
requests), so a client sending a header line every few seconds held a connection forever, and enough of
them hold every connection the server has. Here the request's clock starts with the connection (or with the
first byte after the previous response); a head not complete within `ServeSettings.request_timeout_s` gets
408 and the connection is closed. The app's body reader (transport.py) then ends the same clock for the
body: `scope["extensions"][REQUEST_START]` is when the request began.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .transport import REQUEST_START


class HeadDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on the request head (the body's is the app's, on the same
    clock). `timeout_s` is set per server by `server_config`."""

    timeout_s: float = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._started: float | None = None  # when the request being received began; None between requests
        self._received = False  # whether any byte of that request has come
        self._head_timer: asyncio.TimerHandle | None = None

    def _begin(self) -> None:
        self._started = time.monotonic()
        self._received = False
        self._stop_timer()
        self._head_timer = self.loop.call_later(self.timeout_s, self._head_expired)

    def _stop_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._begin()

    def data_received(self, data: bytes) -> None:
        if self._started is None:  # the first byte of the next request on a kept-alive connection
            self._begin()
        self._received = True
        super().data_received(data)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not None and self.cycle is not cycle:  # a head arrived: the app has the request now
            self._stop_timer()
            started = self._started if self._started is not None else time.monotonic()
            self.cycle.scope.setdefault("extensions", {})[REQUEST_START] = started  # type: ignore[typeddict-item]

    def on_response_complete(self) -> None:
        self._started = None
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def _head_expired(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._received:  # a client that said nothing is just closed, as an idle keep-alive connection is
            body = json.dumps({"error": {"message": f"the request's head took longer than {self.timeout_s:g} s to "
                                                    "arrive", "type": "invalid_request_error", "param": None,
                                         "code": "request_timeout"}}).encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body)
        self.transport.close()


def server_config(app: Any, host: str = "127.0.0.1", port: int = 8000, **kwargs: Any) -> uvicorn.Config:
    """uvicorn's Config for `app` (from `create_app`), its requests under the app's `request_timeout_s`
    from their first byte, head included. Other keyword arguments are uvicorn's."""
    timeout = app.state.settings.request_timeout_s
    protocol = type("HeadDeadlineProtocol", (HeadDeadlineProtocol,), {"timeout_s": timeout})
    return uvicorn.Config(app, host=host, port=port, http=protocol, **kwargs)
