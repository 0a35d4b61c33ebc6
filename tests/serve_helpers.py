"""A live uvicorn server on 127.0.0.1 (a free port, in a thread) for the serve tests, always stopped; run as
`gptforge serve` runs it (`gptforge.serve.server.server_config`)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

uvicorn = pytest.importorskip("uvicorn", reason="the serve tests need uvicorn: pip install -e '.[dev]'")

from gptforge.serve.server import server_config  # noqa: E402  (under the guard: it needs uvicorn)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(app, timeout: float = 30.0) -> Iterator[str]:
    """Run `app` on a free port; yields its base URL; stops the server and the app's batcher after."""
    port = free_port()
    server = uvicorn.Server(server_config(app, port=port, log_level="error", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        app.state.close()
