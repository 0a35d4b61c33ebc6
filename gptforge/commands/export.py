"""`gptforge export`: write a model as a Hugging Face directory (transformers, lm-eval) or a GGUF file
(llama.cpp). Models that a format cannot represent exactly are refused, never approximated."""

from __future__ import annotations

import argparse

from ..numeric import SEED

FORMATS = ("hf", "gguf")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="export a model to Hugging Face (hf) or llama.cpp (gguf)",
                                   description=__doc__)
    parser.add_argument("--model", required=True, help="run dir, checkpoint dir, .safetensors, hf:DIR or preset")
    parser.add_argument("--format", required=True, help="hf (a transformers directory) or gguf (one .gguf file)")
    parser.add_argument("--out", required=True, help="output directory (hf) or file (gguf)")
    parser.add_argument("--force", action="store_true", help="replace an earlier export of the same format at --out")
    parser.add_argument("--dtype", default=None,
                        help="weights precision: hf f32|f16|bf16 (default f32); gguf f32|f16|bf16|q8_0 (default f16)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer to include: gpt2 or a directory (default: the one saved with the model, else "
                             "gpt2 for a model with GPT-2's 50,257-id vocabulary)")
    parser.add_argument("--seed", type=SEED, default=0,
                        help="seed of a preset's random weights (default 0), as `sample`/`serve --model PRESET "
                             "--seed N` draw them")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError

    if args.format not in FORMATS:
        raise UserError(f"--format {args.format!r} is not supported; choose one of {', '.join(FORMATS)}")
    from ..loading import chosen_tokenizer, load_model

    model, own = load_model(args.model, seed=args.seed)
    tokenizer = chosen_tokenizer(model, own, args.model, args.tokenizer, hint=" or pass --tokenizer")
    inputs = {"--model": args.model, "--tokenizer": args.tokenizer}  # never written over (gptforge.outputs)
    if args.format == "hf":
        from ..interop.hf import export_hf
        out = export_hf(model, tokenizer, args.out, force=args.force, dtype=args.dtype or "f32", inputs=inputs)
    else:
        from ..interop.gguf import export_gguf
        out = export_gguf(model, tokenizer, args.out, force=args.force, dtype=args.dtype or "f16", inputs=inputs)
    print(f"exported {args.model} as {args.format} to {out}")
    return 0
