"""`gptforge info`: parameters, FLOPs and memory of a preset or config (without building the model), or
what an existing model is (`--model`: a run's shape, progress, losses and checkpoints)."""

from __future__ import annotations

import argparse

from ..numeric import POSITIVE_INT


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("info", help="size a model (params, FLOPs, memory) or describe a run/checkpoint",
                                   description=__doc__)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", default=None, help="a preset name (default gpt2)")
    source.add_argument("--config", default=None, help="a run config TOML file (as `gptforge train --config`)")
    source.add_argument("--model", default=None,
                        help="describe an existing model: run directory, checkpoint, .safetensors, hf:DIR or "
                             "preset (verifies every checkpoint's checksums)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model field, e.g. --set n_layer=4 or --set model.n_layer=4 (repeatable)")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="training micro-batch (default 8)")
    parser.add_argument("--seq-len", type=POSITIVE_INT, default=None, help="sequence length (default: the context)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--inference-batch", type=POSITIVE_INT, default=1)
    parser.add_argument("--world-size", type=POSITIVE_INT, default=1,
                        help="number of GPUs: also show per-GPU training memory under DDP and FSDP2")
    parser.add_argument("--json", action="store_true", help="with --model: print the description as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError

    if args.model is not None:
        import json

        from ..describe import describe_model, format_description
        if args.set:
            raise UserError("--set changes a model being sized; it does not apply to --model (an existing model)")
        info = describe_model(args.model)
        print(json.dumps(info, indent=2) if args.json else format_description(info))
        return 0
    if args.json:
        raise UserError("--json goes with --model; the sizing report is text")

    from ..info import format_report
    from ..memory import format_distributed
    from ..resolve import resolve_run_config, vocab_source

    # The same resolver as `gptforge train`, so a file means the same model to both; bare keys are model keys.
    overrides = [item if "." in item.split("=", 1)[0] else f"model.{item}" for item in args.set]
    name = args.config or args.preset or "gpt2"
    run_config = resolve_run_config(args.config, None if args.config else name, overrides=overrides)
    config = run_config.model
    seq_len = args.seq_len or config.block_size
    if not 1 <= seq_len <= config.block_size:
        raise UserError(f"--seq-len {seq_len} must be between 1 and the context {config.block_size}")
    print(format_report(config, name, args.batch_size, seq_len, args.dtype, args.inference_batch, run_config.train))
    source = vocab_source(run_config)
    if source:
        print(f"\n{source}")
    if args.world_size > 1:
        print()
        print(format_distributed(config, args.world_size, args.batch_size, seq_len, args.dtype))
    return 0
