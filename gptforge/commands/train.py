"""`gptforge train`: resolve the run config (gptforge.resolve), then call gptforge.training.train (or the demo)."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import EXIT_INTERRUPTED


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a model (no arguments: the offline demo on Python's own sources)",
        description="Train a GPT-2/GPT-3-family model on prepared data. Settings come from --preset, a TOML "
                    "file (--config) and --set key=value (e.g. --set train.lr=3e-4 --set model.n_layer=6). "
                    "With no arguments, runs the offline demo: prepares Python's standard library as a "
                    "corpus and trains a small model for a few minutes into runs/demo.")
    p.add_argument("--config", metavar="TOML", help="run config file with [model], [train], [data] tables")
    p.add_argument("--preset", help="model shape preset, e.g. gpt2, gpt3-small, dev-17m")
    p.add_argument("--data", metavar="DIR", help="prepared data directory (from gptforge prepare)")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory for checkpoints, logs and plots")
    p.add_argument("--init", metavar="MODEL",
                   help="start a new run from these weights: a run directory, a checkpoint, hf:DIR "
                        "(sets train.init_from; the model's shape comes from it)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting (repeatable), e.g. train.max_steps=2000")
    p.add_argument("--resume", nargs="?", const="auto", metavar="auto|CHECKPOINT",
                   help="continue the run in --out from its newest valid checkpoint (or the given one)")
    p.add_argument("--fresh", action="store_true",
                   help="start --out over (its previous run is kept aside until the new one's first checkpoint)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError
    from ..resolve import resolve_run_config

    if args.resume and args.fresh:
        raise UserError("--resume and --fresh contradict each other; pass one of them")
    if args.resume and args.init:
        raise UserError("--init starts a new run from other weights, --resume continues this one; pass one of them")
    is_demo = not (args.config or args.preset or args.data or args.out or args.overrides or args.resume
                   or args.fresh or args.init)
    started = False
    try:
        if is_demo:
            from ..training.demo import demo_config, run_demo
            if args.print_config:
                print(json.dumps(demo_config().to_dict(), indent=2))
                return 0
            started = True
            result = run_demo()
        else:
            config = resolve_run_config(args.config, args.preset, args.data, args.out, args.overrides, args.resume,
                                        fresh=args.fresh, init=args.init)
            if args.print_config:
                print(json.dumps(config.to_dict(), indent=2))
                return 0
            from ..training.trainer import train
            started = True
            result = train(config, resume=args.resume, fresh=args.fresh)
    except KeyboardInterrupt:
        if started:
            raise  # the trainer's own second-Ctrl-C abort: the CLI says "interrupted"
        print("gptforge train: interrupted during start-up; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_INTERRUPTED if result.stopped == "interrupted" else 0
