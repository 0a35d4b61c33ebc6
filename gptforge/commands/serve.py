"""`gptforge serve`: an OpenAI-compatible HTTP server and a web chat page (a thin layer over
`gptforge.serve.create_app` and uvicorn)."""

from __future__ import annotations

import argparse
import sys

from ..errors import UserError
from ..numeric import PORT, POSITIVE_INT, SEED
from ._options import add_device_options, add_quantize_option, resolve_device_for


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model over the OpenAI API, with a web chat page",
        description="Serve a model over HTTP: POST /v1/chat/completions (chat models), POST /v1/completions, "
                    "GET /v1/models, GET /health, and a chat page at /. Requests are generated together "
                    "(continuous batching). Needs the serve extra: pip install 'gptforge[serve]'.")
    p.add_argument("--model", required=True, help="run directory, checkpoint, hf:DIR or preset name")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=PORT, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require `Authorization: Bearer KEY` on /v1/* (strongly advised beyond 127.0.0.1)")
    p.add_argument("--name", default=None, help="model id clients use (default: the --model argument's last part)")
    p.add_argument("--max-batch", type=POSITIVE_INT, default=16, metavar="ROWS",
                   help="most sequences generated together (default 16; 1 = one request at a time)")
    p.add_argument("--max-queued", type=POSITIVE_INT, default=64,
                   help="prompts that may wait for a row (a completions request may carry several); more get 429 "
                        "(default 64)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of a preset's random weights (default 0)")
    add_device_options(p)
    add_quantize_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serve.app import ServeSettings, create_app
        from ..serve.server import server_config
    except ImportError as e:
        raise UserError(f"gptforge serve needs FastAPI and uvicorn ({e.name} is missing): "
                        "pip install 'gptforge[serve]'") from None
    from pathlib import Path

    from ..devices import resolve_dtype
    from ..generation import prepare_for_decoding
    from ..loading import default_tokenizer, load_model, resolve_model_source

    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach this port can use the "
              "model", file=sys.stderr, flush=True)
    device = resolve_device_for(args)
    dtype = resolve_dtype(args.dtype, device)
    source = resolve_model_source(args.model)  # a bad --model is one line and exit 2, before anything listens
    check_address(args.host, args.port)
    failure: list[BaseException] = []

    def load():
        model, tokenizer = load_model(source, device, dtype, seed=args.seed)
        if tokenizer is None:
            tokenizer = default_tokenizer(model, args.model)
        prepare_for_decoding(model, quantize=args.quantize, weights_file=source.weights)
        return model, tokenizer

    def failed(e: BaseException) -> None:  # loading (or setting up what it loaded) failed: stop serving
        failure.append(e)
        server.should_exit = True  # the loader starts with the server (its lifespan): `server` exists

    name = args.name or Path(str(args.model).rstrip("/")).name or str(args.model)
    settings = ServeSettings(max_rows=args.max_batch, max_queued=args.max_queued, api_key=args.api_key)
    app = create_app(name=name, settings=settings, loader=load, on_load_error=failed)
    # /health answers 503 while the model loads in the background, then 200
    server = uvicorn.Server(server_config(app, host=args.host, port=args.port, log_level="warning"))
    print(f"serving {args.model} as {name!r} on http://{args.host}:{args.port}/ (chat page at /, API at /v1)",
          file=sys.stderr, flush=True)
    try:
        server.run()
    except SystemExit:  # uvicorn exits this way when it cannot listen (it has logged why)
        pass
    if app.state.loader_thread.ident is not None:  # never leave while torch works in another thread (abort)
        app.state.loader_thread.join()
    if failure:
        raise load_failure(failure[0], args.model)
    if not server.started:
        raise UserError(f"--host {args.host} --port {args.port}: could not listen there (in use, or not an "
                        "address of this machine); pick another --port")
    return 0


def load_failure(e: BaseException, model: str) -> BaseException:
    """What to raise for a failed load: the error itself where the command line reports it in one line
    (UserError, OSError, Ctrl-C), else a UserError naming --model and the error's first line (a file that
    is not the checkpoint it claims to be fails deep inside torch or safetensors)."""
    if isinstance(e, (UserError, OSError, KeyboardInterrupt)):
        return e
    lines = str(e).strip().splitlines()
    return UserError(f"--model {model}: could not load it ({type(e).__name__}{': ' + lines[0] if lines else ''})")


def check_address(host: str, port: int) -> None:
    """A UserError now, rather than a server that loads a model and then cannot listen."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(address)
    except OSError as e:
        raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); pick another "
                        "--port, or an address of this machine for --host") from None
