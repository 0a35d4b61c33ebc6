"""`gptforge import-hf`: convert a GPT-2-family Hugging Face checkpoint (local directory, or a hub repo id
when online) into a gptforge checkpoint directory (`model.safetensors` + `tokenizer/`) to sample,
evaluate or fine-tune. `--model hf:DIR` loads one directly without converting."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("import-hf", help="convert a Hugging Face GPT-2/GPT-Neo checkpoint to gptforge",
                                   description=__doc__)
    parser.add_argument("source", help="a local HF model directory, or a hub repo id such as gpt2 (needs network)")
    parser.add_argument("--out", required=True, help="the gptforge checkpoint directory to write")
    parser.add_argument("--force", action="store_true", help="replace an earlier import at --out")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..interop.hf import import_hf
    from ..loading import load_model

    out = import_hf(args.source, args.out, force=args.force)
    model, tokenizer = load_model(str(out))
    note = f"tokenizer {tokenizer.kind}" if tokenizer is not None else \
        "no tokenizer (not GPT-2's; pass --tokenizer where a command needs one)"
    print(f"imported {args.source} -> {out}: {model.num_parameters():,} parameters, {note}")
    return 0
