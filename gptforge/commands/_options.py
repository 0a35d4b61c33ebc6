"""Options several commands share, defined once so that `sample`, `chat` and `eval` spell, check and
document them the same way. (A leading underscore: not a command; `cli.build_parser` skips it.)"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from ..devices import DTYPE_CHOICES
from ..numeric import COUNT_OR_OFF, POSITIVE_INT, Range

if TYPE_CHECKING:
    from ..generation import SamplingConfig


def add_device_options(p: argparse.ArgumentParser, dtype_note: str = "") -> None:
    """--device and --dtype, resolved later by gptforge.devices (one rule for every command)."""
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps or auto (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                   help=f"weights dtype (default: bfloat16 on CUDA, float32 on CPU){dtype_note}")


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


def sampling_config(args: argparse.Namespace, **more: Any) -> "SamplingConfig":
    """The SamplingConfig the sampling options describe (`more`: a command's other fields, e.g. stop)."""
    from ..generation import SamplingConfig

    return SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          no_repeat_ngram=args.no_repeat_ngram, **more)
