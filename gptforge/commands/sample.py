"""`gptforge sample`: complete a prompt (argument, --prompt-file or stdin), or chat-free interactive loop."""

from __future__ import annotations

import argparse
import json
import re
import secrets
import sys

from ._options import (add_compile_option, add_device_options, add_json_output_options, add_quantize_option,
                       add_sampling_options, check_json_output, json_output_fields, prepare_model,
                       resolve_device_for, sampling_config)
from ..errors import UserError
from ..numeric import SAMPLES, SEED


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sample", help="generate text from a model",
        description="Generate text from a model with a KV cache. The prompt comes from the PROMPT argument, "
                    "--prompt-file or standard input; with none of them on a terminal, an interactive loop.")
    p.add_argument("prompt", nargs="?", default=None, metavar="PROMPT", help="text to continue")
    p.add_argument("--model", required=True, help="run directory, checkpoint, .safetensors, hf:DIR or preset name")
    p.add_argument("--prompt-file", default=None, help="read the prompt from this UTF-8 file")
    add_sampling_options(p, max_new_tokens=256, temperature=1.0)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end a sample at this text (not printed); repeatable. Backslash escapes as in Python "
                        "strings: \\n newline, \\t tab, \\r, \\\\ a backslash, \\xNN, \\uNNNN, \\UNNNNNNNN "
                        "(so --stop '\\n\\n' ends at a blank line)")
    p.add_argument("--no-stop-at-eot", dest="stop_at_eot", action="store_false",
                   help="keep generating past the end-of-text token")
    p.add_argument("--num-samples", type=SAMPLES, default=1,
                   help="samples per seed (default 1), generated as a batch")
    p.add_argument("--seed", type=SEED, action="append", default=None, metavar="N",
                   help="random seed; repeat for several seeds, each printed with its samples (default: a "
                        "fresh one per prompt, recorded in --json output so a sample can be reproduced)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--json", action="store_true",
                   help="machine-readable output: one JSON object (with --stream: one JSON line per token)")
    add_json_output_options(p)
    add_device_options(p)
    add_quantize_option(p)
    add_compile_option(p)
    p.set_defaults(func=run)


def read_prompt(args: argparse.Namespace) -> str | None:
    """The prompt from the argument, --prompt-file or piped stdin; None means "ask interactively"."""
    if args.prompt is not None and args.prompt_file is not None:
        raise UserError("give the prompt either as an argument or with --prompt-file, not both")
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            raise UserError(f"--prompt-file {args.prompt_file}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--prompt-file {args.prompt_file}: cannot read it as UTF-8 text ({e})") from None
    if not sys.stdin.isatty():
        return sys.stdin.read()
    return None


_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.?)", re.DOTALL)
_SIMPLE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
_HEX_DIGITS = {"x": 2, "u": 4, "U": 8}


def unescape(text: str, option: str) -> str:
    """`text` with backslash escapes decoded (\\n \\t \\r \\\\ \\xNN \\uNNNN \\UNNNNNNNN, as in Python strings),
    since a shell passes `--stop "\\n\\n"` as backslash-n-backslash-n, never as two newlines. Any other
    backslash is an error naming the option (it is almost certainly a typo), not a literal backslash."""
    def replace(match: re.Match) -> str:
        code = match.group(1)
        if code in _SIMPLE_ESCAPES:
            return _SIMPLE_ESCAPES[code]
        if len(code) > 1:
            point = int(code[1:], 16)
            if 0xD800 <= point <= 0xDFFF or point > 0x10FFFF:
                raise UserError(f"{option} '{text}': \\{code} is not a character (a surrogate or beyond U+10FFFF)")
            return chr(point)
        if code in _HEX_DIGITS:
            raise UserError(f"{option} '{text}': \\{code} needs exactly {_HEX_DIGITS[code]} hex digits")
        what = f"unknown escape \\{code}" if code else "a lone backslash at the end"
        raise UserError(f"{option} '{text}': {what}; use \\n, \\t, \\r, \\xNN, \\uNNNN, \\UNNNNNNNN, "
                        "or \\\\ for a backslash")

    return _ESCAPE.sub(replace, text)


def run(args: argparse.Namespace) -> int:
    from ..devices import resolve_dtype
    from ..loading import default_tokenizer, load_model, resolve_model_source

    config = sampling_config(args, stop=tuple(unescape(text, "--stop") for text in args.stop),
                             stop_at_eot=args.stop_at_eot, **json_output_fields(args))
    prompt = read_prompt(args)
    device = resolve_device_for(args)
    source = resolve_model_source(args.model)
    seeds = args.seed or [fresh_seed()]  # chosen first: a preset's random weights are drawn from it too
    model, tokenizer = load_model(source, device, resolve_dtype(args.dtype, device), seed=seeds[0])
    # on CPU: faster products (prepacked, quantized, compiled)
    prepare_model(model, args, batch=args.num_samples, weights_file=source.weights)
    args.provenance = source.provenance()
    tokenizer = tokenizer or default_tokenizer(model, args.model)
    check_json_output(config, tokenizer, args)
    if prompt is not None:
        _sample(model, tokenizer, prompt, config, args, seeds)
        return 0
    return _interactive(model, tokenizer, config, args)


def _interactive(model, tokenizer, config, args: argparse.Namespace) -> int:
    """One prompt per line until end of input (Ctrl-D), on a terminal: readline line editing and history,
    samples streamed as they are written, Ctrl-C stops only the sample being written (at the prompt it
    clears the line, as a shell does)."""
    try:
        import readline  # noqa: F401  (importing it gives input() line editing and history)
    except ImportError:  # not on every platform's Python; plain input() still works
        pass
    args.stream = args.stream or not args.json
    while True:
        try:
            line = input("prompt> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        try:
            _sample(model, tokenizer, line, config, args, args.seed or [fresh_seed()])
        except KeyboardInterrupt:
            print("\n[stopped]", file=sys.stderr, flush=True)


def fresh_seed() -> int:
    """A seed for a run without --seed: random, but known, so --json can record it and --seed repeat it."""
    return secrets.randbelow(2**31)


def _sample(model, tokenizer, prompt: str, config, args: argparse.Namespace, seeds: list[int]) -> None:
    from ..generation import generate

    n = args.num_samples
    results = []
    for seed in seeds:
        label = f"seed {seed}"
        events = generate(model, tokenizer, prompt, config, num_samples=n, seed=seed)
        if args.stream and args.json:
            for e in events:
                print(json.dumps({"seed": seed, "sample": e.index, "token": e.token, "text": e.text,
                                  "finish_reason": e.finish_reason}), flush=True)
            continue
        if args.stream:
            _print_streaming(events, prompt, n, label if len(seeds) > 1 or n > 1 else None)
            continue
        texts, reasons = [""] * n, [None] * n
        for e in events:
            texts[e.index] += e.text
            reasons[e.index] = e.finish_reason or reasons[e.index]
        for i in range(n):
            results.append({"seed": seed, "sample": i, "prompt": prompt, "text": texts[i],
                            "finish_reason": reasons[i]})
            if not args.json:
                if len(seeds) > 1 or n > 1:
                    print(f"=== {label}, sample {i + 1}/{n} ===")
                print(prompt + texts[i], flush=True)
    if args.json and not args.stream:
        print(json.dumps({"model": args.model, **args.provenance, "samples": results}, ensure_ascii=False,
                         indent=2))


def _print_streaming(events, prompt: str, n: int, label: str | None) -> None:
    """Stream sample 0 live; later samples are buffered while earlier ones run, then continue live, so the
    output reads one sample after another."""
    buffered = [""] * n
    done = [False] * n
    current = 0

    def start(i: int) -> None:
        if label:
            print(f"\n=== {label}, sample {i + 1}/{n} ===")
        print(prompt + buffered[i], end="", flush=True)

    start(0)
    for e in events:
        if e.index == current:
            print(e.text, end="", flush=True)
        else:
            buffered[e.index] += e.text
        if e.finish_reason:
            done[e.index] = True
        while current < n and done[current]:
            print(flush=True)
            current += 1
            if current < n:
                start(current)
