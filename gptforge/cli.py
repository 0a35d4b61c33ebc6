"""`gptforge` command line: parse arguments, call the library, turn user errors into one line and exit 2.

Each subcommand lives in its own module under gptforge/commands/ with `register(subparsers)`; they are
discovered here, so adding a command never means editing this file.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from typing import NoReturn

from . import __version__, commands
from .errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError


class Parser(argparse.ArgumentParser):
    """argparse with the product's error contract: a bad option is one line on stderr and exit 2 (argparse
    would print the whole usage first, burying the line that says what is wrong)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="gptforge",
        description="Train, sample, evaluate and export GPT-2/GPT-3-family language models.")
    parser.add_argument("--version", action="version", version=f"gptforge {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):  # _options: shared helpers, not a command
            importlib.import_module(f"{commands.__name__}.{info.name}").register(subparsers)
    return parser


def describe_os_error(e: OSError) -> str:
    """`FILE: reason` in one line; the errno text is what the user can act on, a traceback is not."""
    text = (e.strerror or str(e)).strip()
    reason = text.splitlines()[0] if text else type(e).__name__
    names = [str(name) for name in (e.filename, e.filename2) if name is not None]
    return ": ".join([" -> ".join(names), reason] if names else [reason])


def main(argv: list[str] | None = None) -> int:
    """Run one command; user errors become one stderr line naming the file or option, and exit code 2.

    Everything, start-up included (building the parser, importing the command's modules), is inside the
    handler, so a Ctrl-C at any moment is one line and exit 130 rather than a KeyboardInterrupt traceback.
    """
    prefix = "gptforge"
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USER_ERROR
        prefix = f"gptforge {args.command}"
        return args.func(args) or 0
    except UserError as e:
        print(f"{prefix}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `gptforge ... | head`: the reader left; not an error (an OSError: keep it first)
        sys.stderr.close()
        return 0
    except OSError as e:  # a path we cannot read or write: permissions, a file where a folder should be, full disk
        print(f"{prefix}: error: {describe_os_error(e)}", file=sys.stderr)
        return EXIT_USER_ERROR


def launched_by_torchrun() -> bool:
    """torchrun sets WORLD_SIZE (and TORCHELASTIC_RUN_ID) in each worker's environment."""
    return "TORCHELASTIC_RUN_ID" in os.environ or os.environ.get("WORLD_SIZE", "1") not in ("", "1")


def entry_point() -> None:
    code = main()
    if launched_by_torchrun() and "torch.distributed" in sys.modules:
        from .training.distributed import exit_worker  # why a torchrun worker skips interpreter finalization
        exit_worker(code)
    sys.exit(code)
