"""`gptforge tokenizer`: train a byte-level BPE (or char vocabulary), fetch GPT-2's ranks, inspect a tokenizer."""

from __future__ import annotations

import argparse
import sys
import time

from ..numeric import POSITIVE_INT, VOCAB_SIZE


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tokenizer", help="train a tokenizer, fetch GPT-2's vocabulary, encode text",
                                   description=__doc__)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    train = actions.add_parser("train", help="train a byte-level BPE (or char) tokenizer on your corpus",
                               description="Train a tokenizer on SOURCEs (text files, folders, .jsonl, .parquet, "
                                           "hf:NAME, builtin:pystdlib) and save it to --out.")
    train.add_argument("sources", nargs="+", metavar="SOURCE")
    train.add_argument("--vocab-size", type=VOCAB_SIZE, default=None,
                       help="total ids incl. 256 bytes and special tokens (required for bpe)")
    train.add_argument("--out", required=True,
                       help="directory to write (new or empty; --overwrite replaces a tokenizer directory)")
    train.add_argument("--kind", choices=["bpe", "char"], default="bpe")
    train.add_argument("--glob", default=None, help="only files in folders matching this pattern, e.g. '*.py'")
    train.add_argument("--special-token", action="append", default=[], metavar="TOKEN",
                       help="extra special token besides <|endoftext|> (repeatable), e.g. <|im_start|>")
    train.add_argument("--min-frequency", type=POSITIVE_INT, default=2,
                       help="bpe: least count for a merge (default 2)")
    train.add_argument("--overwrite", action="store_true", help="replace --out if it holds a tokenizer")
    train.set_defaults(func=run_train)

    fetch = actions.add_parser("fetch-gpt2", help="get GPT-2's BPE ranks through pip (openai-whisper sdist)",
                               description="Download the openai-whisper source archive with pip, take "
                                           "whisper/assets/gpt2.tiktoken from it, verify its sha256 and store it "
                                           "in the gptforge cache ($GPTFORGE_CACHE or ~/.cache/gptforge).")
    fetch.add_argument("--force", action="store_true", help="fetch again even if a verified copy exists")
    fetch.set_defaults(func=run_fetch)

    encode = actions.add_parser("encode", help="print the token ids of TEXT")
    encode.add_argument("text")
    encode.add_argument("--tokenizer", default="gpt2", help="gpt2 or a saved tokenizer directory")
    encode.add_argument("--allow-special", action="store_true", help="recognise special-token text")
    encode.set_defaults(func=run_encode)

    info = actions.add_parser("info", help="kind, vocabulary size and special tokens of a tokenizer")
    info.add_argument("tokenizer", help="gpt2 or a saved tokenizer directory")
    info.set_defaults(func=run_info)


def run_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..data.sources import DocumentReader
    from ..errors import UserError
    from ..outputs import TOKENIZER, check_output, owned_output
    from ..tokenizer import CharTokenizer, train_bpe

    out = Path(args.out)
    inputs = {"SOURCE": args.sources}
    check_output(out, TOKENIZER, replace=args.overwrite, inputs=inputs)  # before the training; again when saving
    start = time.perf_counter()
    reader = DocumentReader(args.sources, glob=args.glob)
    documents = reader.documents()
    if args.kind == "char":
        tokenizer = CharTokenizer.train(documents)
        tokenizer.add_special_tokens(args.special_token)
    else:
        if args.vocab_size is None:
            raise UserError("--vocab-size is required for a bpe tokenizer, e.g. --vocab-size 16384")
        tokenizer = train_bpe(documents, args.vocab_size, special_tokens=["<|endoftext|>", *args.special_token],
                              min_frequency=args.min_frequency, show_progress=sys.stderr.isatty())
    with owned_output(out, TOKENIZER, replace=args.overwrite, inputs=inputs, command="tokenizer train") as tmp:
        tokenizer.write_into(tmp)
    seconds = time.perf_counter() - start
    note = ""
    if args.kind == "bpe" and tokenizer.vocab_size < args.vocab_size:
        note = f" (the corpus supports only {tokenizer.vocab_size} of the {args.vocab_size} requested)"
    print(f"saved {tokenizer.kind} tokenizer to {out}: vocab_size {tokenizer.vocab_size}{note}, "
          f"eot_id {tokenizer.eot_id}, {seconds:.1f} s")
    problems = reader.stats.records.summary()  # malformed lines skipped, text repaired: say where
    if problems:
        print("\n".join(f"warning: {line}" for line in problems.splitlines()))
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    from ..tokenizer import fetch_gpt2_ranks

    print("fetching openai-whisper sdist through pip ...", file=sys.stderr)
    path = fetch_gpt2_ranks(force=args.force)
    print(f"GPT-2 ranks verified and stored at {path}")
    return 0


def run_encode(args: argparse.Namespace) -> int:
    from ..tokenizer import get_tokenizer

    tokenizer = get_tokenizer(args.tokenizer)
    print(" ".join(str(i) for i in tokenizer.encode(args.text, allowed_special=args.allow_special)))
    return 0


def run_info(args: argparse.Namespace) -> int:
    from ..tokenizer import get_tokenizer

    tokenizer = get_tokenizer(args.tokenizer)
    print(f"kind: {tokenizer.kind}\nvocab_size: {tokenizer.vocab_size}\neot_id: {tokenizer.eot_id}")
    for token, i in sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1]):
        print(f"special: {token} = {i}")
    return 0
