"""Options several commands share, defined once so that `sample`, `chat` and `eval` spell, check and
document them the same way. (A leading underscore: not a command; `cli.build_parser` skips it.)"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from ..devices import DTYPE_CHOICES
from ..errors import UserError
from ..numeric import COUNT_OR_OFF, POSITIVE_INT, Range

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from ..generation import SamplingConfig
    from ..model import GPT


def add_device_options(p: argparse.ArgumentParser, dtype_note: str = "") -> None:
    """--device and --dtype, resolved later by gptforge.devices (one rule for every command)."""
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps or auto (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                   help=f"weights dtype (default: bfloat16 on CUDA, float32 on CPU){dtype_note}")


def add_quantize_option(p: argparse.ArgumentParser) -> None:
    """--quantize, for the commands that run a model without training it (sample, chat, serve, eval)."""
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="CPU only: linear weights (and the output head) as int8 with a scale per output row, or "
                        "int4 with a scale and zero per 32 inputs, for faster decoding; the token embedding "
                        "stays exact (default: off)")


def add_compile_option(p: argparse.ArgumentParser) -> None:
    """--compile, for the commands that decode one conversation or prompt at a time (sample, chat)."""
    p.add_argument("--compile", action="store_true",
                   help="CPU only: compile the decode step with torch.compile before the first prompt (10-55 s "
                        "for GPT-2 on 2 cores, needs a C++ compiler) for 1.6-2.8x the tokens/s afterwards; "
                        "worth it for a long session (default: off)")


def resolve_device_for(args: argparse.Namespace) -> "torch.device":
    """--device resolved (gptforge.devices), for a command with --quantize or --compile: both run on the CPU,
    so there --device defaults to cpu, and another device is refused before any time goes into loading."""
    from ..devices import resolve_device

    if args.quantize is not None:
        cpu_only = (f"--quantize {args.quantize}", "the int8/int4 kernels run")
    elif getattr(args, "compile", False):
        cpu_only = ("--compile", "the compiled decode step runs")
    else:
        cpu_only = None
    device = resolve_device("cpu" if cpu_only and args.device is None else args.device)
    if cpu_only and device.type != "cpu":
        option, what = cpu_only
        raise UserError(f"{option}: {what} on CPU only, and --device is {device}; add --device cpu or leave "
                        f"{option.split()[0]} out")
    return device


def prepare_model(model: "GPT", args: argparse.Namespace, batch: int = 1, weights_file: Path | None = None) -> None:
    """prepare_for_decoding with the command's --quantize and --compile (`weights_file`: what the model was
    loaded from, for the quantized-weights cache); a compile happens here, for `batch` rows, with a line on
    stderr before and after, rather than silently inside the first reply."""
    import gc
    import sys

    from ..generation import prepare_for_decoding
    from ..generation.compiled import compiled_decoder

    # Everything alive now (torch's modules, the model) lives until exit. Freezing it keeps the collector off
    # those ~170,000 objects: quantizing allocates enough to trigger a full collection (~75 ms of start-up),
    # and the interpreter's final one at exit takes ~0.2 s instead of ~0.8 s. (What the load left as garbage
    # is a few dozen objects, no tensors: nothing large is kept alive.)
    gc.freeze()
    prepare_for_decoding(model, quantize=args.quantize, compile=getattr(args, "compile", False),
                         weights_file=weights_file)
    decoder = compiled_decoder(model)
    if decoder is not None:
        print("compiling the decode step (torch.compile, once per run; 10-55 s for GPT-2 on 2 cores)...",
              file=sys.stderr, flush=True)
        print(f"compiled in {decoder.warm_up(batch):.1f} s", file=sys.stderr, flush=True)


def add_sampling_options(p: argparse.ArgumentParser, max_new_tokens: int, temperature: float,
                         per: str = "sample") -> None:
    """The sampling options, with a command's own defaults (`per`: what one generation is called)."""
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=max_new_tokens,
                   help=f"most tokens per {per} (default {max_new_tokens})")
    p.add_argument("--temperature", type=Range(float, 0, note="0 = greedy"), default=temperature,
                   help=f"0 = greedy (default {temperature})")
    p.add_argument("--top-k", type=COUNT_OR_OFF, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=Range(float, 0, 1, low_open=True, note="1 = off"), default=1.0,
                   help="nucleus sampling mass in (0, 1] (1 = off)")
    p.add_argument("--min-p", type=Range(float, 0, 1, note="0 = off"), default=0.0,
                   help="drop tokens below min-p x the top probability (0 = off)")
    p.add_argument("--repetition-penalty", type=Range(float, 0, low_open=True, note="1 = off"), default=1.0,
                   help="> 1 discourages tokens already present (sign-aware, as transformers; 1 = off)")
    p.add_argument("--no-repeat-ngram", type=COUNT_OR_OFF, default=0,
                   help="never repeat an n-gram of this size (0 = off)")


def add_json_output_options(p: argparse.ArgumentParser, also_json: bool = False) -> None:
    """--json-object / --json-schema FILE: constrained decoding (gptforge.generation.constrained). `also_json`:
    --json spells --json-object too (a command whose --json does not already mean machine-readable output)."""
    flags = ["--json-object", "--json"] if also_json else ["--json-object"]
    p.add_argument(*flags, dest="json_object", action="store_true",
                   help="constrain the output to one valid JSON object (needs pip install 'gptforge[serve]')")
    p.add_argument("--json-schema", default=None, metavar="FILE",
                   help="constrain the output to JSON valid against the JSON Schema in FILE")


def json_output_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The SamplingConfig fields --json-object / --json-schema ask for (the schema file read and parsed)."""
    import json

    from ..errors import UserError

    if args.json_schema is None:
        return {"json_object": bool(args.json_object)}
    if args.json_object:
        raise UserError("give either --json-object or --json-schema FILE, not both (a schema already means JSON)")
    try:
        with open(args.json_schema, encoding="utf-8") as f:
            schema = json.load(f)
    except FileNotFoundError:
        raise UserError(f"--json-schema {args.json_schema}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--json-schema {args.json_schema}: not a readable JSON file ({e})") from None
    if not isinstance(schema, dict):
        raise UserError(f"--json-schema {args.json_schema}: a JSON schema is a JSON object, "
                        f"got {type(schema).__name__}")
    return {"json_schema": json.dumps(schema)}


def check_json_output(config: "SamplingConfig", tokenizer: Any, args: argparse.Namespace) -> None:
    """Compile the schema now, so a bad one is reported before any generation (one line, exit 2)."""
    from ..generation.constrained import build_constraints

    if config.constrained:
        what = f"--json-schema {args.json_schema}" if args.json_schema else "--json-object"
        build_constraints([config], tokenizer, (), what=what)


def sampling_config(args: argparse.Namespace, **more: Any) -> "SamplingConfig":
    """The SamplingConfig the sampling options describe (`more`: a command's other fields, e.g. stop)."""
    from ..generation import SamplingConfig

    return SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          no_repeat_ngram=args.no_repeat_ngram, **more)
