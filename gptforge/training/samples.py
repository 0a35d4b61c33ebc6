"""Text samples during training, appended to samples.txt so progress can be read, not just plotted.

Uses `gptforge.generation`'s `generate_text` (KV cache, the same processors as `gptforge sample`), so what
the log shows is what sampling the checkpoint would give. Sampling runs in its own RNG so it never shifts
the training run's random stream (exact resume depends on that).
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Callable

import torch

from .. import atomic
from ..generation import SamplingConfig, generate_text
from ..layout import SAMPLES_FILE

_HEADER = re.compile(r"^=== step (\d+) ", re.MULTILINE)


def sample_texts(model: torch.nn.Module, tokenizer, prompts: list[str], max_new_tokens: int,
                 temperature: float, top_k: int, seed: int) -> list[str]:
    """Prompt + continuation for each prompt, with the model in eval mode and the global RNG untouched."""
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[] if not torch.cuda.is_available() else None):
            settings = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k)
            outs = generate_text(model, tokenizer, prompts, settings, seed=seed)
            return [p + o for p, o in zip(prompts, outs)]
    finally:
        model.train(was_training)


def append_samples(run_dir: str | os.PathLike, step: int, tokens: int, texts: list[str]) -> None:
    """Append one block `=== step N (T tokens) ===` with each sample (single write, like metrics.jsonl)."""
    block = f"=== step {step} ({tokens} tokens) ===\n" + "".join(
        f"--- sample {i + 1} ---\n{t}\n" for i, t in enumerate(texts))
    path = Path(run_dir) / SAMPLES_FILE
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, block.encode("utf-8", errors="replace"))
    finally:
        os.close(fd)


def truncate_samples(run_dir: str | os.PathLike, step: int) -> None:
    """Drop sample blocks from steps after `step` (written by a run killed after its last checkpoint)."""
    path = Path(run_dir) / SAMPLES_FILE
    if not path.is_file():
        return
    text = path.read_text(errors="replace")
    for match in _HEADER.finditer(text):
        if int(match.group(1)) > step:
            atomic.write_text(path, text[: match.start()])
            return


# (model, tokenizer, max_new_tokens, temperature, top_k, seed=...) -> texts; SFT's replies to held-out questions
Sampler = Callable[..., list[str]]


class SampleWriter:
    """Text samples at chosen steps into samples.txt (rank 0 writes; under FSDP2 every rank generates, in
    lockstep, since each forward gathers weights collectively)."""

    def __init__(self, run_dir: str | os.PathLike, tokenizer, prompts: list[str], max_new_tokens: int,
                 temperature: float, top_k: int, seed: int, device: torch.device, precision: str, fsdp: bool,
                 is_main: bool, sampler: Sampler | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.tokenizer = tokenizer
        self.prompts, self.max_new_tokens = list(prompts), max_new_tokens
        self.temperature, self.top_k, self.seed = temperature, top_k, seed
        self.device, self.precision, self.fsdp, self.is_main = device, precision, fsdp, is_main
        self.sampler = sampler
        self.last: list[str] | None = None

    @property
    def enabled(self) -> bool:
        """Whether this rank takes part (a tokenizer and prompts exist, and it writes or must generate)."""
        return (self.tokenizer is not None and bool(self.prompts or self.sampler) and self.max_new_tokens > 0
                and (self.is_main or self.fsdp))

    def __call__(self, model: torch.nn.Module, step: int, tokens: int) -> None:
        if not self.enabled:
            return
        from .precision import autocast
        # under FSDP2, autocast matches the KV cache (fp32, as the sharded weights) to FSDP2's bf16 compute
        with autocast(self.device, self.precision) if self.fsdp else contextlib.nullcontext():
            if self.sampler is not None:
                texts = self.sampler(model, self.tokenizer, self.max_new_tokens, self.temperature, self.top_k,
                                     seed=self.seed + step)
            else:
                texts = sample_texts(model, self.tokenizer, self.prompts, self.max_new_tokens, self.temperature,
                                     self.top_k, seed=self.seed + step)
        if self.is_main:
            append_samples(self.run_dir, step, tokens, texts)
        self.last = texts
