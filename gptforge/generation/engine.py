"""The token loop: prefill, choose, feed back, slide the context window, finish rows.

Past the context. Positions are learned and absolute, so a full cache cannot simply roll: every cached key
was computed at its old position. When the cache is full and a row's sequence would outgrow the context,
that row is cut to its last `context_keep` tokens and the batch is prefilled again from position 0
(default keep: half the context, so the cost is one prefill per block_size/2 new tokens and the model
always sees at least half its context). `context_keep=block_size` re-prefills on every token, which is
exactly "condition on the last block_size tokens" as a recompute-everything loop would do. A row is only
cut when its own sequence overflows, so its tokens are the same as when it is generated alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import UserError
from ..model import GPT
from .compiled import compiled_decoder
from .constrained import build_constraints
from .kv_cache import CudaGraphDecoder, KVCache
from .sampling import Sampler, SamplingConfig

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

COMPACT_FRACTION = 0.25  # drop finished rows from the batch once this share of it is finished


@dataclass
class TokenEvent:
    """One new token of sequence `index` (its position in the caller's prompt list).

    `finish_reason` is set on the sequence's last event: "stop" (end-of-text, or a stop string found by a
    text layer) or "length" (max_new_tokens reached). An end-of-text token ends the sequence and is
    reported with its id but is not part of the completion.
    """

    index: int
    token: int
    finish_reason: str | None = None


class TokenGenerator:
    """Iterate over steps of batched generation; each step yields the TokenEvents of the rows still going.

    `finish(index)` ends a row early (a stop string seen by the caller); its next steps are not computed.
    `eot_id`: the id that ends a row whose config has `stop_at_eot`, or several (a chat reply ends at
    `<|im_end|>`, `<|im_start|>` or end-of-text: `gptforge.chat.tokens.reply_end_ids`).
    """

    def __init__(self, model: GPT, prompts: Sequence[Sequence[int]], configs: Sequence[SamplingConfig],
                 seeds: Sequence[int | None], eot_id: int | Collection[int] | None = None,
                 context_keep: int | None = None,
                 static: bool = False, cuda_graph: bool = False, vocab_size: int | None = None,
                 tokenizer: "Tokenizer | None" = None) -> None:
        block = model.config.block_size
        # Ids the caller can turn back into text: a model may have more (an HF import with a padded
        # vocabulary) and must never produce those.
        self.vocab_size = model.config.vocab_size if vocab_size is None else min(vocab_size, model.config.vocab_size)
        if not prompts:
            raise ValueError("no prompts")
        if len(configs) != len(prompts) or len(seeds) != len(prompts):
            raise ValueError("one config and one seed per prompt")
        self.model = model
        self.block_size = block
        self.context_keep = block // 2 if context_keep is None else context_keep
        if not 1 <= self.context_keep <= block:
            raise ValueError(f"context_keep must be in [1, {block}], got {context_keep}")
        self.end_ids = end_id_set(eot_id)
        # prepare_for_decoding(model, compile=True): decode steps by the compiled step, on a static cache
        self.compiled = compiled_decoder(model)
        self.static = static or cuda_graph or self.compiled is not None  # fixed-shape decode steps (see KVCache)
        self.cuda_graph = cuda_graph
        # a captured graph, or a compiled step (compiled again for every batch size), keeps the batch size:
        # finished rows stay in it instead of being dropped
        self.fixed_batch = cuda_graph or self.compiled is not None
        self._decode = None
        self.configs = list(configs)
        self.histories: list[list[int]] = []
        for i, prompt in enumerate(prompts):
            prompt = [int(t) for t in prompt]
            if not prompt:
                raise UserError(f"prompt {i} is empty; give at least one token (e.g. the end-of-text token)")
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise UserError(f"prompt {i} has token ids outside the vocabulary (0..{self.vocab_size - 1}): {bad[:5]}")
            if len(prompt) > block:
                warnings.warn(f"prompt {i} has {len(prompt)} tokens, more than the model's context of {block}; "
                              f"keeping the last {block}", stacklevel=3)
                prompt = prompt[-block:]
            self.histories.append(prompt)
        self.device = model.transformer.wte.weight.device
        self.generated = [0] * len(prompts)
        self.starts = [0] * len(prompts)  # each row's context is histories[i][starts[i]:]
        self.rows = list(range(len(prompts)))  # original index of each row of the current batch
        # Each row's grammar (JSON mode / schema; compiled for `tokenizer`) and logit bias, or None.
        constraints = build_constraints(self.configs, tokenizer, self.end_ids)
        self.sampler = Sampler(configs, seeds, self.histories, self.vocab_size, self.device, constraints=constraints)
        self._finished: set[int] = set()
        self.cache: KVCache | None = None

    def finish(self, index: int) -> None:
        self._finished.add(index)

    def __iter__(self) -> Iterator[list[TokenEvent]]:
        # Sampling is inference: never with dropout, whatever mode the caller left the model in (a trainer
        # writing samples mid-run); the caller's mode comes back when the iteration ends or is abandoned.
        was_training = self.model.training
        self.model.eval()
        try:
            yield from self._steps()
        finally:
            if was_training:  # (only then: a generator abandoned at interpreter exit must not touch torch)
                self.model.train()

    @torch.inference_mode()  # on a generator: active while it runs, not while the caller handles a step
    def _steps(self) -> Iterator[list[TokenEvent]]:
        logits = self._prefill([self.histories[i] for i in self.rows])
        while True:
            tokens = self.sampler.choose(logits)
            token_list = tokens.tolist()  # the one host sync per step: streaming needs the ids anyway
            self.sampler.observe(tokens, token_list)
            events = []
            for r, (index, token) in enumerate(zip(self.rows, token_list)):
                if index in self._finished:
                    self.sampler.constraints[r] = None  # a finished row kept in the batch needs no grammar
                    continue
                self.histories[index].append(token)
                self.generated[index] += 1
                reason = None
                constraint = self.sampler.constraints[r]
                if self.configs[index].stop_at_eot and token in self.end_ids:
                    reason = "stop"
                elif constraint is not None and constraint.exhausted and not constraint.end_ids:
                    reason = "stop"  # the grammar is complete and can take nothing more; no end id to force
                elif self.generated[index] >= self.configs[index].max_new_tokens:
                    reason = "length"
                if reason:
                    self._finished.add(index)
                    self.sampler.constraints[r] = None
                events.append(TokenEvent(index, token, reason))
            yield events
            live = [r for r, index in enumerate(self.rows) if index not in self._finished]
            if not live:
                return
            if self.cache.length >= self.cache.capacity:
                self._select(live)
                logits = self._prefill([self._window(i) for i in self.rows])
                continue
            if not self.fixed_batch and len(live) <= (1 - COMPACT_FRACTION) * len(self.rows):
                self._select(live)
                tokens = tokens[torch.tensor(live, device=self.device)]
            logits = self._decode(tokens)

    def _select(self, live: list[int]) -> None:
        if len(live) == len(self.rows):
            return
        self.rows = [self.rows[r] for r in live]
        self.sampler.select(live)
        if self.cache is not None:
            self.cache.select(live)

    def _window(self, index: int) -> list[int]:
        """What row `index` conditions on after a slide: its current context, cut to the last
        `context_keep` tokens only if that context itself has outgrown the model's."""
        history = self.histories[index]
        if len(history) - self.starts[index] > self.block_size:
            self.starts[index] = len(history) - self.context_keep
        return history[self.starts[index]:]

    def _prefill(self, sequences: list[list[int]]) -> torch.Tensor:
        width = max(len(s) for s in sequences)
        remaining = max(self.configs[i].max_new_tokens - self.generated[i] for i in self.rows)
        capacity = min(self.block_size, width + remaining)
        pads = [width - len(s) for s in sequences]
        pad_id = sequences[0][-1]  # any valid id: padded positions are masked out
        idx = torch.tensor([[pad_id] * p + s for p, s in zip(pads, sequences)], device=self.device)
        weight = self.model.transformer.wte.weight
        self.cache = KVCache(self.model.config, pads, capacity, weight.device, weight.dtype, static=self.static)
        logits = self._step(idx, self.cache)
        self._decode = lambda tokens: self._step(tokens.view(-1, 1), self.cache)
        if self.cuda_graph and self.device.type == "cuda":
            self._decode = CudaGraphDecoder(self._step, self.cache).decode
        elif self.compiled is not None:
            self._decode = lambda tokens: self.compiled.decode(tokens.view(-1, 1), self.cache)
        return logits

    def _step(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed idx (B, T) after what the cache holds; the next-token logits (B, V) of each row."""
        x = self.model.hidden_states(idx, kv_cache=cache)  # (B, T, C)
        return self.model.head(x[:, -1])


def generate_ids(model: GPT, prompt_ids: Sequence[Sequence[int]], config: SamplingConfig | Sequence[SamplingConfig] = SamplingConfig(),
                 seed: int | Sequence[int | None] | None = None, eot_id: int | Collection[int] | None = None,
                 context_keep: int | None = None, static: bool = False, cuda_graph: bool = False,
                 vocab_size: int | None = None) -> list[list[int]]:
    """Tokenizer-free batched generation: the new token ids of each prompt (the end id, of `eot_id`'s, that
    ended a sequence is not included). `seed` is one base seed (sample i gets a seed derived from it and i) or
    one seed per prompt. `static`/`cuda_graph`: fixed-shape decode steps, replayed as a CUDA graph on a GPU.
    `vocab_size`: only ids below it are ever produced (default: the model's vocabulary)."""
    configs, seeds = expand_settings(len(prompt_ids), config, seed)
    out: list[list[int]] = [[] for _ in prompt_ids]
    end_ids = end_id_set(eot_id)
    for events in TokenGenerator(model, prompt_ids, configs, seeds, end_ids, context_keep,
                                 static=static, cuda_graph=cuda_graph, vocab_size=vocab_size):
        for e in events:
            if not (e.finish_reason == "stop" and e.token in end_ids):
                out[e.index].append(e.token)
    return out


def end_id_set(eot_id: int | Collection[int] | None) -> frozenset[int]:
    """`eot_id` as TokenGenerator and generate_ids take it (one id, several, or none) -> the set of them."""
    if eot_id is None:
        return frozenset()
    return frozenset((eot_id,)) if isinstance(eot_id, int) else frozenset(eot_id)


def expand_settings(n: int, config: SamplingConfig | Sequence[SamplingConfig],
                    seed: int | Sequence[int | None] | None) -> tuple[list[SamplingConfig], list[int | None]]:
    """One config and one seed per prompt from the shorthand forms the API accepts."""
    from .sampling import row_seed

    configs = [config] * n if isinstance(config, SamplingConfig) else list(config)
    if len(configs) != n:
        raise ValueError(f"{len(configs)} sampling configs for {n} prompts")
    if seed is None or isinstance(seed, int):
        seeds = [None if seed is None else row_seed(seed, i) for i in range(n)]
    else:
        seeds = list(seed)
        if len(seeds) != n:
            raise ValueError(f"{len(seeds)} seeds for {n} prompts")
    return configs, seeds
