"""`gptforge info`: parameters, FLOPs and memory of a preset or config, without building the model."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("info", help="parameters, FLOPs per token and memory estimates of a model",
                                   description=__doc__)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", default=None, help="a preset name (default gpt2)")
    source.add_argument("--config", default=None, help="a TOML file with a [model] table")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model field, e.g. --set n_layer=4 (repeatable)")
    parser.add_argument("--batch-size", type=int, default=8, help="training micro-batch (default 8)")
    parser.add_argument("--seq-len", type=int, default=None, help="sequence length (default: the context)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--inference-batch", type=int, default=1)
    parser.add_argument("--world-size", type=int, default=1,
                        help="number of GPUs: also show per-GPU training memory under DDP and FSDP2")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import ModelConfig, apply_overrides, from_dict, get_preset, load_toml
    from ..errors import UserError
    from ..info import format_report
    from ..memory import format_distributed

    if args.config:
        table = load_toml(args.config).get("model")
        if not isinstance(table, dict):
            raise UserError(f"config file {args.config} has no [model] table; add one or use --preset")
        preset = table.pop("preset", None)
        if preset is not None and not isinstance(preset, str):
            raise UserError(f"config file {args.config}: [model] preset must be a string such as \"gpt3-small\", "
                            f"got {preset!r}")
        config = apply_overrides(get_preset(preset), table) if preset else from_dict(ModelConfig, table, "model")
        name = args.config
    else:
        name = args.preset or "gpt2"
        config = get_preset(name)
    overrides = [item.removeprefix("model.") for item in args.set]
    config = apply_overrides(config, overrides)
    seq_len = args.seq_len or config.block_size
    if args.batch_size < 1 or args.inference_batch < 1 or args.world_size < 1:
        raise UserError("--batch-size, --inference-batch and --world-size must be at least 1")
    if not 1 <= seq_len <= config.block_size:
        raise UserError(f"--seq-len {seq_len} must be between 1 and the context {config.block_size}")
    print(format_report(config, name, args.batch_size, seq_len, args.dtype, args.inference_batch))
    if args.world_size > 1:
        print()
        print(format_distributed(config, args.world_size, args.batch_size, seq_len, args.dtype))
    return 0
