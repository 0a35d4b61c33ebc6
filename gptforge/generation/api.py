"""Text in, text out: encode prompts, run the token loop, stream printable pieces.

This is the layer a command line, a trainer's sample writer or an HTTP server uses; everything below it
works on token ids only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import UserError
from ..model import GPT
from .engine import TokenGenerator, expand_settings
from .sampling import SamplingConfig
from .text import TextStream

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer


@dataclass
class GenerationEvent:
    """One step of one completion.

    `index` is the completion's number: prompt p, sample s -> p * num_samples + s. `text` is the newly
    printable text (may be "" while a possible stop string or a split UTF-8 character is held back).
    `finish_reason` ("stop" or "length") is set on the completion's last event.
    """

    index: int
    token: int
    text: str
    finish_reason: str | None = None


def encode_prompts(tokenizer: "Tokenizer", prompts: Sequence[str], allow_special: bool = False) -> list[list[int]]:
    """Token ids per prompt; an empty prompt starts from end-of-text, as a fresh document would."""
    encoded = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt, allowed_special=allow_special) if prompt else []
        encoded.append(ids or [tokenizer.eot_id])
    return encoded


def generate(model: GPT, tokenizer: "Tokenizer", prompts: str | Sequence[str],
             config: SamplingConfig | Sequence[SamplingConfig] = SamplingConfig(), *, num_samples: int = 1,
             seed: int | Sequence[int | None] | None = None, context_keep: int | None = None,
             allow_special: bool = False) -> Iterator[GenerationEvent]:
    """Stream completions token by token, batched over prompts x num_samples.

    `config` is one SamplingConfig for all, or one per completion (per-request settings and stop strings).
    `seed`: a base seed (completion i draws from a seed derived from it and i, so results do not depend on
    batch composition) or one seed per completion. See TokenGenerator for what happens past the context.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if num_samples < 1:
        raise UserError(f"--num-samples: must be a positive integer, got {num_samples}")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {model.config.vocab_size}; "
                        "use the tokenizer the model was trained with")
    prompt_ids = [ids for ids in encode_prompts(tokenizer, prompts, allow_special) for _ in range(num_samples)]
    configs, seeds = expand_settings(len(prompt_ids), config, seed)
    engine = TokenGenerator(model, prompt_ids, configs, seeds, tokenizer.eot_id, context_keep,
                            vocab_size=tokenizer.vocab_size, tokenizer=tokenizer)
    streams = [TextStream(tokenizer.decode_bytes, c.stop) for c in configs]
    for events in engine:
        for e in events:
            stream = streams[e.index]
            reason = e.finish_reason
            ended_by_eot = reason == "stop" and e.token == tokenizer.eot_id
            piece = "" if ended_by_eot else stream.push(e.token)
            if stream.stopped:
                reason = "stop"
                engine.finish(e.index)
            if reason:
                piece += stream.close()
            yield GenerationEvent(e.index, e.token, piece, reason)


def generate_text(model: GPT, tokenizer: "Tokenizer", prompts: str | Sequence[str],
                  config: SamplingConfig | Sequence[SamplingConfig] = SamplingConfig(), **kwargs) -> list[str]:
    """The finished completions (without their prompts), in `generate`'s index order."""
    if isinstance(prompts, str):
        prompts = [prompts]
    n = len(prompts) * kwargs.get("num_samples", 1)
    texts = [""] * n
    for event in generate(model, tokenizer, prompts, config, **kwargs):
        texts[event.index] += event.text
    return texts
