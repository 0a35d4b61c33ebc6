"""`gptforge serve`: an OpenAI-compatible HTTP server (FastAPI) with continuous batching, and a web chat page.

    from gptforge.serve import create_app
    app = create_app(model, tokenizer, name="my-model")   # an ASGI app: uvicorn.run(app) or mount it

FastAPI and uvicorn come with the `serve` extra (`pip install "gptforge[serve]"`); importing this package
does not need them, `create_app` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import ServeSettings


def create_app(*args: Any, **kwargs: Any):
    """See `gptforge.serve.app.create_app`."""
    from .app import create_app as _create_app
    return _create_app(*args, **kwargs)


__all__ = ["create_app", "ServeSettings"]


def __getattr__(name: str):
    if name == "ServeSettings":
        from .app import ServeSettings
        return ServeSettings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
