"""`gptforge sft`: fine-tune a base run into a chat model on conversations (`prepare --chat`)."""

from __future__ import annotations

import argparse

from ..errors import EXIT_INTERRUPTED
from ..numeric import POSITIVE


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sft", help="fine-tune a base model into a chat model (no arguments: the offline demo chat model)",
        description="Supervised fine-tuning: start from --model's weights and tokenizer (adding the chat markers), "
                    "train on --data (conversations prepared with `gptforge prepare ... --chat --tokenizer "
                    "BASE_RUN`) with the loss on the assistant's replies only, into --out. Fine-tuning defaults "
                    "(a fifth of the base peak LR, short warmup, no weight decay, --epochs passes over the data) "
                    "can be changed with --set. With no arguments: fine-tunes the demo model runs/demo (trained "
                    "first if missing) on builtin:pystdlib-qa into runs/demo-chat and shows a few answers.")
    p.add_argument("--model", metavar="BASE_RUN", help="the base model: a run directory, checkpoint or HF directory")
    p.add_argument("--data", metavar="DIR", help="chat data prepared with `gptforge prepare ... --chat`")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory of the chat model")
    p.add_argument("--epochs", type=POSITIVE, default=None, metavar="N",
                   help="passes over the conversations (default 3; --set train.max_steps=N instead counts steps)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting (repeatable), e.g. train.lr=1e-4 or train.micro_batch_size=16")
    p.add_argument("--resume", nargs="?", const="auto", metavar="auto",
                   help="continue the fine-tuning run in --out from its newest valid checkpoint")
    p.add_argument("--fresh", action="store_true", help="delete --out's checkpoints and logs and start over")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError

    if args.resume not in (None, "auto"):
        raise UserError(f"--resume {args.resume}: sft resumes its newest valid checkpoint; pass --resume alone")
    if not (args.model or args.data or args.out or args.overrides or args.resume or args.fresh
            or args.epochs is not None):
        from ..training.sft_demo import run_sft_demo
        result = run_sft_demo()
    else:
        from ..training.sft import sft
        result = sft(args.model, args.data, args.out, epochs=args.epochs, overrides=args.overrides,
                     resume=args.resume, fresh=args.fresh)
    return EXIT_INTERRUPTED if result.stopped == "interrupted" else 0
