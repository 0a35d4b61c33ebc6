"""What to generate (SamplingConfig) and how one next token is chosen from logits (Sampler).

A SamplingConfig is one request's settings, like the body of an OpenAI-style completion request, so a
server can batch requests with different settings: the Sampler takes one config per row and turns each
setting into a number (all rows equal) or a (B, 1) tensor (rows differ).

Random draws take one uniform number per row and step from one torch.Generator per row, so a row's sample
depends on its own seed only, not on what else is in the batch. One number, not one per vocabulary entry (as
the exponential-race trick needs): 0.15 vs 2.8 ms a draw over GPT-2's 50,257 ids on this project's CPUs.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError
from . import processors as P
from .constrained import RowConstraint, apply_constraints


@dataclass(frozen=True)
class SamplingConfig:
    """Settings of one generation request. temperature 0 means greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off; > 1 discourages repeats
    no_repeat_ngram: int = 0  # 0: off; n: never repeat an n-gram
    stop: tuple[str, ...] = ()  # stop strings (not included in the output)
    stop_at_eot: bool = True  # end at the tokenizer's end-of-text token
    # Structured output (gptforge.generation.constrained): any JSON object, or JSON valid against a schema
    # (its JSON text; a dict is accepted and stored as text, so a config stays hashable and comparable).
    json_object: bool = False
    json_schema: str | None = None
    # OpenAI's logit_bias: token id -> bias in [-100, 100] added to the logits (-100 bans); a dict is accepted.
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.json_schema, dict):
            object.__setattr__(self, "json_schema", json.dumps(self.json_schema))
        if isinstance(self.logit_bias, dict):
            object.__setattr__(self, "logit_bias", tuple(self.logit_bias.items()))
        object.__setattr__(self, "logit_bias", tuple(self.logit_bias))
        self.validate()
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in self.logit_bias))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def constrained(self) -> bool:
        """Output must follow a grammar (JSON mode or a JSON schema)."""
        return self.json_object or self.json_schema is not None

    def validate(self) -> None:
        """One UserError per bad setting, naming the option as the CLI spells it."""
        def bad(option: str, why: str) -> UserError:
            return UserError(f"--{option.replace('_', '-')}: {why}")

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", f"must be a positive integer, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise bad("temperature", f"must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", f"must be a non-negative integer (0 = off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", f"must be in (0, 1] (1 = off), got {self.top_p!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", f"must be in [0, 1] (0 = off), got {self.min_p!r}")
        if not self.repetition_penalty > 0:
            raise bad("repetition_penalty", f"must be > 0 (1 = off), got {self.repetition_penalty!r}")
        if not isinstance(self.no_repeat_ngram, int) or self.no_repeat_ngram < 0:
            raise bad("no_repeat_ngram", f"must be a non-negative integer (0 = off), got {self.no_repeat_ngram!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", f"stop strings must be non-empty text, got {list(self.stop)!r}")
        if self.json_schema is not None and not isinstance(self.json_schema, str):
            raise bad("json_schema", f"must be a JSON schema (a dict or its JSON text), got {self.json_schema!r}")
        for pair in self.logit_bias:
            token, bias = pair if isinstance(pair, tuple) and len(pair) == 2 else (None, None)
            if isinstance(token, str) and token.isdigit():
                token = int(token)
            if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                raise bad("logit_bias", f"keys must be token ids (non-negative integers), got {pair!r}")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
                raise bad("logit_bias", f"token {token}: the bias must be a number in [-100, 100], got {bias!r}")

    def replace(self, **changes) -> "SamplingConfig":
        return dataclasses.replace(self, **changes)


def row_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for sample `index` of base `seed` (seed+index would make seed 1 sample 1
    equal seed 2 sample 0)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32).astype(np.uint64)
               .dot(np.array([1 << 31, 1], dtype=np.uint64)))


class Sampler:
    """Chooses each row's next token; keeps the per-row history the penalties need."""

    def __init__(self, configs: Sequence[SamplingConfig], seeds: Sequence[int | None], prompts: Sequence[Sequence[int]],
                 vocab_size: int, device: torch.device,
                 generators: Sequence[torch.Generator | None] | None = None,
                 constraints: Sequence[RowConstraint | None] | None = None) -> None:
        """`generators`: the rows' random generators as they are (a server's rows joining a new batch keep
        their random state); otherwise one is made per seed (None: torch's global generator).
        `constraints`: each row's grammar state and logit bias, kept as they are (a row carries its own);
        without them, rows get their config's logit bias (a grammar needs the tokenizer: build_constraints)."""
        self.configs = list(configs)
        if constraints is None:
            if any(c.constrained for c in self.configs):
                raise ValueError("a JSON mode or schema row needs its RowConstraint (constrained.build_constraints)")
            constraints = [RowConstraint(logit_bias=dict(c.logit_bias)) if c.logit_bias else None
                           for c in self.configs]
        if len(constraints) != len(self.configs):
            raise ValueError("one constraint (or None) per row")
        for c in constraints:
            if c is not None and c.logit_bias and max(c.logit_bias) >= vocab_size:
                raise UserError(f"logit_bias: token id {max(c.logit_bias)} is outside the vocabulary "
                                f"(0..{vocab_size - 1})")
        self.constraints = list(constraints)
        self.device = device
        self.vocab_size = vocab_size
        self.generators: list[torch.Generator | None] = [] if generators is None else list(generators)
        for seed in seeds if generators is None else ():
            g = None
            if seed is not None:
                g = torch.Generator(device=device)
                g.manual_seed(seed)
            self.generators.append(g)
        self.seen: torch.Tensor | None = None
        if any(c.repetition_penalty != 1.0 for c in self.configs):
            self.seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
            for r, prompt in enumerate(prompts):
                if prompt:
                    self.seen[r, torch.tensor(prompt, device=device)] = True
        self.ngrams = [P.NgramIndex(c.no_repeat_ngram, prompt) if c.no_repeat_ngram else None
                       for c, prompt in zip(self.configs, prompts)]
        self._refresh()

    def _refresh(self) -> None:
        """Per-setting scalars or (B, 1) tensors for the current rows."""
        def param(name: str, dtype=torch.float32):
            values = [getattr(c, name) for c in self.configs]
            if all(v == values[0] for v in values):
                return values[0]
            return torch.tensor(values, dtype=dtype, device=self.device)[:, None]

        self.temperature = param("temperature")
        self.top_k = param("top_k", torch.long)
        self.top_p = param("top_p")
        self.min_p = param("min_p")
        self.penalty = param("repetition_penalty")
        greedy = [c.greedy for c in self.configs]
        self.all_greedy = all(greedy)
        self.any_greedy = any(greedy)
        self.greedy_rows = torch.tensor(greedy, device=self.device)[:, None] if self.any_greedy else None

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token per row, (B,) long, from logits (B, V >= vocab_size); ids from vocab_size on are never
        chosen (the caller's tokenizer may not know them)."""
        logits = logits[:, : self.vocab_size].float()
        logits = apply_constraints(logits, self.constraints)  # bias, then the grammar's mask; no-op without
        if self.seen is not None:
            logits = P.apply_repetition_penalty(logits, self.seen, self.penalty)
        if any(self.ngrams):
            logits = P.apply_banned_tokens(logits, [n.banned() if n else set() for n in self.ngrams])
        if self.all_greedy:
            return logits.argmax(dim=-1)
        greedy_choice = logits.argmax(dim=-1) if self.any_greedy else None
        logits = P.apply_temperature(logits, self.temperature)
        logits = P.apply_top_k(logits, self.top_k)
        logits = P.apply_top_p(logits, self.top_p)
        logits = P.apply_min_p(logits, self.min_p)
        # Inverse-CDF draw: one uniform number per row against the running sum of the probabilities (float64,
        # so a 50k-term sum loses nothing); tokens filtered out add 0 to the sum and can never be hit.
        cdf = torch.softmax(logits, dim=-1).double().cumsum(dim=-1)  # (B, V)
        u = torch.empty(cdf.size(0), 1, dtype=torch.float64, device=cdf.device)
        if all(g is None for g in self.generators):
            u.uniform_()
        else:
            for r, g in enumerate(self.generators):
                u[r].uniform_(generator=g)
        choice = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0].clamp_(max=cdf.size(1) - 1)
        if greedy_choice is not None:
            choice = torch.where(self.greedy_rows[:, 0], greedy_choice, choice)
        return choice

    def observe(self, tokens: torch.Tensor, token_list: list[int]) -> None:
        """Record the tokens just chosen (as a tensor and as the same values in a list)."""
        if self.seen is not None:
            self.seen[torch.arange(len(token_list), device=self.device), tokens] = True
        for index, token in zip(self.ngrams, token_list):
            if index is not None:
                index.append(token)
        for constraint, token in zip(self.constraints, token_list):
            if constraint is not None:
                constraint.advance(token)

    def select(self, rows: list[int]) -> None:
        """Keep only `rows` (matches KVCache.select)."""
        self.configs = [self.configs[r] for r in rows]
        self.generators = [self.generators[r] for r in rows]
        self.ngrams = [self.ngrams[r] for r in rows]
        self.constraints = [self.constraints[r] for r in rows]
        if self.seen is not None:
            self.seen = self.seen[torch.tensor(rows, device=self.device)]
        self._refresh()
