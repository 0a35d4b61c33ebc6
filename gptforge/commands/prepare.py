"""`gptforge prepare`: tokenize text sources into train/val token shards plus manifest and tokenizer."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from ..errors import EXIT_INTERRUPTED
from ..numeric import POSITIVE_INT, SEED, Range

VAL_FRACTION = Range(float, 0, 1, high_open=True, note="0 = no val split")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prepare", help="tokenize text files, folders, JSONL, Parquet or hf: datasets into token shards",
        description=__doc__ + " SOURCE is a text file, a folder (recursive), a .jsonl or .parquet file, "
        "hf:NAME[:CONFIG] (a Hugging Face dataset, streamed) or builtin:pystdlib (Python's standard library).")
    parser.add_argument("sources", nargs="+", metavar="SOURCE", help="where the text comes from (see above)")
    parser.add_argument("--tokenizer", default="gpt2", metavar="SPEC",
                        help="gpt2 (default), char, bpe:VOCAB_SIZE (trained on the sources) or a tokenizer directory")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (must be new or empty)")
    parser.add_argument("--glob", default=None, metavar="PATTERN",
                        help="only files matching PATTERN inside folders, e.g. '*.txt' or 'books/*.md'")
    parser.add_argument("--text-field", default="text", metavar="NAME",
                        help="the text field of JSONL/Parquet/hf: records (default: text)")
    parser.add_argument("--val-fraction", type=VAL_FRACTION, default=None, metavar="F",
                        help="share of documents for the val split (default 0.05)")
    parser.add_argument("--workers", type=POSITIVE_INT, default=None, metavar="N",
                        help="tokenizer processes (default: the CPU count)")
    parser.add_argument("--seed", type=SEED, default=0, help="seed of the train/val split (default 0)")
    parser.add_argument("--shard-tokens", type=POSITIVE_INT, default=None, metavar="N",
                        help="tokens per shard file at most (default 100,000,000)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out once the new data is complete")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    chat = parser.add_argument_group("chat data (for gptforge sft)")
    chat.add_argument("--chat", action="store_true",
                      help="SOURCE holds conversations (messages, ShareGPT, Alpaca or prompt/completion records): "
                      "store them in ChatML with a loss mask on the assistant's turns; --tokenizer names the base "
                      "run (runs/NAME), its tokenizer directory or gpt2")
    chat.add_argument("--chat-format", default=None, metavar="FORMAT",
                      help="messages, sharegpt, alpaca or prompt_completion (default: detected per source)")
    chat.add_argument("--context", type=Range(int, 2), default=None, metavar="N",
                      help="row length to report packing for (default: the base run's, else 1024)")
    parser.set_defaults(func=run)


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, Slurm, docker stop) as an exception, so it unwinds like Ctrl-C: the temporary output
    is removed, the lock released, workers stopped."""


def _on_sigterm(owner: int):
    def handler(signum: int, frame: object) -> None:
        if os.getpid() != owner:  # a forked child still holding this handler: unwinding its copy of our
            os._exit(128 + signum)  # stack would remove our temporary output and lock; just end it
        raise Terminated
    return handler


def _identity(path: str) -> tuple[int, int] | None:
    """What is at `path` now (device, inode), to tell afterwards whether a new directory was renamed there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def run(args: argparse.Namespace) -> int:
    previous = signal.signal(signal.SIGTERM, _on_sigterm(os.getpid()))
    before = _identity(args.out)
    try:
        return _run_chat(args) if args.chat or args.chat_format or args.context else _run_text(args)
    except Terminated:
        # The final renames hold SIGTERM back (gptforge.atomic), so it can arrive just after them: then the
        # new data is whole and in place, and saying "unchanged" would be false.
        now = _identity(args.out)
        state = "unchanged" if now == before else "complete (the signal came as it was finished)"
        print(f"gptforge prepare: terminated (SIGTERM); {args.out} is {state}", file=sys.stderr)
        return EXIT_INTERRUPTED  # as train and sft: a stop request is 130, whether Ctrl-C or SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_text(args: argparse.Namespace) -> int:
    from ..data.prepare import DEFAULT_SHARD_TOKENS, DEFAULT_VAL_FRACTION, prepare, summary

    manifest = prepare(
        args.sources, args.tokenizer, args.out, glob=args.glob, text_field=args.text_field,
        val_fraction=DEFAULT_VAL_FRACTION if args.val_fraction is None else args.val_fraction,
        workers=args.workers, seed=args.seed,
        shard_tokens=args.shard_tokens or DEFAULT_SHARD_TOKENS, force=args.force, progress=not args.quiet)
    print(summary(manifest, args.out))
    return 0


def _run_chat(args: argparse.Namespace) -> int:
    from ..data.chat_prepare import chat_summary, prepare_chat
    from ..data.prepare import DEFAULT_SHARD_TOKENS, DEFAULT_VAL_FRACTION
    from ..errors import UserError

    if not args.chat:
        raise UserError("--chat-format and --context apply to chat data: add --chat")
    if args.glob or args.text_field != "text":
        raise UserError("--glob and --text-field apply to text data; chat records are read whole (drop them)")
    manifest = prepare_chat(
        args.sources, args.tokenizer, args.out, fmt=args.chat_format, context=args.context,
        val_fraction=DEFAULT_VAL_FRACTION if args.val_fraction is None else args.val_fraction,
        workers=args.workers, seed=args.seed, shard_tokens=args.shard_tokens or DEFAULT_SHARD_TOKENS,
        force=args.force, progress=not args.quiet)
    print(chat_summary(manifest, args.out))
    return 0
