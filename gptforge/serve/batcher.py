"""The generation loop of the server: one thread owns the model and runs every request in one batch.

Continuous batching: between two decode steps the loop takes finished and cancelled rows out of the batch
and lets queued requests in (each one prefilled alone, then its rows appended), so a short request never
waits for a long one and sixteen clients share each decode step instead of taking turns.

Every row sits at its own position, so the cache here (`RowsCache`) is not the left-padded one of
`gptforge.generation`: each row writes its key at its own length and attends under its own mask. A request
with n choices is prefilled once and its cache rows copied n times. Sampling is `gptforge.generation`'s
`Sampler` (per-row settings, one random generator per row, so a seeded row draws the same tokens whatever
else is in the batch); it is rebuilt whenever the rows change, handing over each row's generator as it is.

Nothing slides past the context here: a request's max_tokens is capped so that prompt + reply fit (the
HTTP layer refuses a prompt that leaves no room), which keeps served text identical to a request run alone.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..generation.constrained import Grammar, RowConstraint
from ..generation.sampling import Sampler, SamplingConfig
from ..generation.text import TextStream
from ..model import GPT


@dataclass
class TokenInfo:
    """Log-probabilities of one token: its own and the `top` most likely alternatives (id, logprob)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Event:
    """What one row produced in one step: newly printable text (may be ""), the token and, on the row's last
    event, its finish_reason ("stop" / "length"). `infos`: when the request asked for log-probabilities,
    those of the tokens whose text starts in what has been printed, so they travel with their text (a token
    held back as a possible stop string start may come out a step later, or never: the tokens at and after
    the point where a stop string cuts the reply are not part of it). An end token (`Job.end_ids`) has no
    text in the reply but is generated and counted, so its info comes with the last event, as OpenAI, vLLM
    and llama.cpp list it (lm-evaluation-harness drops the last entry as the generated token's)."""

    choice: int
    text: str
    token: int | None
    finish_reason: str | None = None
    infos: list[TokenInfo] = field(default_factory=list)
    completion_tokens: int = 0


@dataclass
class PromptScores:
    """Log-probabilities of the prompt's tokens after the first (echo), delivered once before any Event of
    the job whose first choice is `choice_offset`."""

    choice_offset: int
    infos: list[TokenInfo]


@dataclass
class Job:
    """One prompt and its n choices, as the HTTP layer submits it; events come back through `deliver`."""

    prompt: list[int]
    configs: list[SamplingConfig]  # one per choice; max_new_tokens already fits the context
    seeds: list[int | None]
    deliver: Callable[[Event | PromptScores | BaseException], None]
    end_ids: frozenset[int] = frozenset()  # tokens that end a reply and are not part of it
    logprobs: int | None = None  # None: off; k: the chosen token's logprob and the top k
    echo_logprobs: bool = False  # log-probabilities of the prompt's own tokens (first = None)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    choice_offset: int = 0  # the index of this job's first choice in the response
    generate: bool = True  # False: only score the prompt (echo with max_tokens 0)
    grammar: Grammar | None = None  # response_format's, compiled for the served tokenizer (each row: its state)
    cancelled: bool = False

    def cancel(self) -> None:
        """Stop this job's rows (a client that went away); they leave the batch at the next step."""
        self.cancelled = True


@dataclass
class Row:
    job: Job
    choice: int
    history: list[int]
    generator: torch.Generator | None
    stream: TextStream
    generated: int = 0
    counts: collections.Counter = field(default_factory=collections.Counter)  # for the OpenAI penalties
    pending: list[tuple[int, TokenInfo]] = field(default_factory=list)  # (where its text starts, info), unsent
    constraint: RowConstraint | None = None  # its grammar state and logit bias (None: a free row, no cost)

    @property
    def config(self) -> SamplingConfig:
        return self.job.configs[self.choice]


class PrefillCache:
    """The model's cache protocol for a whole prompt from position 0: keeps each layer's keys and values and
    lets attention run its own causal (or band) pattern over them, as without a cache."""

    def __init__(self, n_layer: int, device: torch.device) -> None:
        self.keys: list[torch.Tensor] = [None] * n_layer  # type: ignore[list-item]
        self.values: list[torch.Tensor] = [None] * n_layer  # type: ignore[list-item]
        self.device = device

    def start_step(self, T: int) -> torch.Tensor:
        return torch.arange(T, device=self.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        self.keys[layer], self.values[layer] = k, v
        return k, v, None

    def advance(self, T: int) -> None:
        pass


class RowsCache:
    """Keys and values of the rows of a continuous batch; row b holds `lengths[b]` slots, slot = position. A
    decode step writes each row's key at its own length and attends over the slots up to the longest row under
    a per-row mask (banded layers: also only the last `window`).

    Storage is preallocated per layer, (rows, nh, slots, hd), and kept when rows leave: the live rows are its
    first `batch` rows, so a row joining is one copy of its prompt's keys and a row leaving moves the rows
    kept to the front (rows join and leave every few steps; concatenating every buffer each time cost more
    than a decode step on small models). When a joining row needs more, it is reallocated once: rows to at
    least double what it had, slots to exactly what the longest row needs (prompt + max_tokens), never
    shrinking while the batch has rows."""

    def __init__(self, model: GPT) -> None:
        config = model.config
        self.windows = [config.window if config.is_band_layer(i) else None for i in range(config.n_layer)]
        self.device = model.transformer.wte.weight.device
        self._keys: list[torch.Tensor] = []  # (rows, nh, slots, hd) per layer; the first `batch` rows are live
        self._values: list[torch.Tensor] = []
        self.batch = 0
        self.lengths = torch.zeros(0, dtype=torch.long, device=self.device)
        self.capacity = 0  # slots per row
        self._masks: dict[int | None, torch.Tensor] = {}
        self._n = 0

    def _reserve(self, rows: int, capacity: int, like: torch.Tensor) -> None:
        """Room for `rows` rows of `capacity` slots (the live rows kept)."""
        have_rows = self._keys[0].size(0) if self._keys else 0
        if rows <= have_rows and capacity <= self.capacity:
            return
        rows = max(rows, 2 * have_rows) if rows > have_rows else have_rows
        capacity = max(capacity, self.capacity)
        _, nh, _, hd = like.shape
        for store in (self._keys, self._values):
            for layer in range(len(self.windows)):
                grown = torch.zeros(rows, nh, capacity, hd, dtype=like.dtype, device=self.device)
                if store and self.batch:
                    grown[: self.batch, :, : self.capacity] = store[layer][: self.batch, :, : self.capacity]
                if len(store) > layer:
                    store[layer] = grown
                else:
                    store.append(grown)
        self.capacity = capacity

    def add(self, prefill: PrefillCache, copies: int, capacity: int) -> None:
        """Append `copies` rows holding the prompt `prefill` computed, each with room for `capacity` slots."""
        length = prefill.keys[0].size(2)
        self._reserve(self.batch + copies, max(capacity, length), prefill.keys[0])
        rows = slice(self.batch, self.batch + copies)
        for layer in range(len(self.windows)):
            # Slots after `length` may hold an old row's keys: masked out until this row writes them.
            self._keys[layer][rows, :, :length] = prefill.keys[layer]
            self._values[layer][rows, :, :length] = prefill.values[layer]
        self.lengths = torch.cat([self.lengths, torch.full((copies,), length, dtype=torch.long, device=self.device)])
        self.batch += copies

    def select(self, rows: list[int]) -> None:
        """Keep only `rows` (in this order) of the live rows."""
        if rows == list(range(len(rows))):  # a prefix: nothing moves
            self.lengths = self.lengths[: len(rows)]
        else:
            index = torch.tensor(rows, dtype=torch.long, device=self.device)
            for store in (self._keys, self._values):
                for t in store:
                    t[: len(rows)] = t[: self.batch].index_select(0, index)
            self.lengths = self.lengths[index]
        self.batch = len(rows)

    # the model's three calls (see gptforge.generation.kv_cache)

    def start_step(self, T: int) -> torch.Tensor:
        if T != 1:
            raise ValueError("a continuous batch takes one token per row per step")
        n = int(self.lengths.max()) + 1
        if n > self.capacity:
            raise ValueError("a row outgrew the cache (its max_tokens was not capped to the context)")
        slots = torch.arange(n, device=self.device)[None, :]  # (1, n)
        now = self.lengths[:, None]  # (B, 1): the slot (= position) each row writes this step
        self._masks = {}
        for window in set(self.windows):
            allowed = slots <= now
            if window is not None:
                allowed = allowed & (slots > now - window)
            self._masks[window] = allowed[:, None, None, :]  # (B, 1, 1, n)
        self._n = n
        return now

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        rows = torch.arange(self.batch, device=self.device)
        keys, values = self._keys[layer][: self.batch], self._values[layer][: self.batch]  # views of the live rows
        keys[rows, :, self.lengths] = k[:, :, 0].to(keys.dtype)  # (B, nh, hd) at each row's own slot
        values[rows, :, self.lengths] = v[:, :, 0].to(values.dtype)
        return keys[:, :, :self._n], values[:, :, :self._n], self._masks[self.windows[layer]]

    def advance(self, T: int) -> None:
        self.lengths += T


class QueueFull(Exception):
    """More requests are waiting than the server accepts (HTTP 429)."""


class Batcher:
    """The generation loop (a daemon thread). `submit(job)` queues a request; `generated_tokens` counts every
    token the loop has produced (a client that went away stops adding to it)."""

    def __init__(self, model: GPT, decode_bytes: Callable[[Sequence[int]], bytes], vocab_size: int,
                 max_rows: int = 16, max_queued: int = 64) -> None:
        self.model = model.eval()
        self.decode_bytes = decode_bytes
        self.vocab_size = min(vocab_size, model.config.vocab_size)
        self.max_rows = max_rows
        self.max_queued = max_queued
        self.device = model.transformer.wte.weight.device
        self.generated_tokens = 0
        self.steps = 0
        self._pending: collections.deque[Job] = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        self._rows: list[Row] = []
        self._cache = RowsCache(model)
        self._logits: torch.Tensor | None = None  # (B, V): next-token logits of each row
        self._sampler: Sampler | None = None
        self._thread = threading.Thread(target=self._run, name="gptforge-serve-batcher", daemon=True)
        self._thread.start()

    # ---- the HTTP side ----------------------------------------------------------------------------------

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue `jobs` (all or none); QueueFull when the queue is full."""
        with self._wake:
            if any(job.cancelled for job in self._pending):  # clients that left while waiting free their places
                self._pending = collections.deque(job for job in self._pending if not job.cancelled)
            if len(self._pending) + len(jobs) > self.max_queued:
                raise QueueFull(f"{len(self._pending)} requests are already waiting (at most {self.max_queued})")
            self._pending.extend(jobs)
            self._wake.notify()

    def close(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout)

    @property
    def rows(self) -> int:
        return len(self._rows)

    @property
    def queued(self) -> int:
        """Jobs waiting for rows (not those whose clients left while waiting)."""
        with self._wake:
            return sum(not job.cancelled for job in self._pending)

    # ---- the loop ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._pending and not self._rows:
                    self._wake.wait()
                if self._closed:
                    break
                admitted = []
                while self._pending and (not self._rows and not admitted or
                                         self.rows + sum(len(j.configs) for j in admitted)
                                         + len(self._pending[0].configs) <= self.max_rows):
                    admitted.append(self._pending.popleft())
            try:
                with torch.inference_mode():
                    self._step(admitted)
            except BaseException as e:  # a bug or out of memory: fail the requests in flight, keep serving
                jobs = {id(r.job): r.job for r in self._rows} | {id(j): j for j in admitted}
                for job in jobs.values():
                    job.deliver(e)
                self._rows, self._logits, self._sampler = [], None, None
                self._cache = RowsCache(self.model)
        for job in [r.job for r in self._rows] + list(self._pending):
            job.deliver(RuntimeError("the server is shutting down"))

    def _step(self, admitted: list[Job]) -> None:
        changed = self._drop([r for r, row in enumerate(self._rows) if not row.job.cancelled])
        for job in admitted:
            if not job.cancelled:
                self._admit(job)
                changed = True
        if not self._rows:
            return
        if changed:
            self._sampler = Sampler([r.config for r in self._rows], [None] * len(self._rows),
                                    [r.history for r in self._rows], self.vocab_size, self.device,
                                    generators=[r.generator for r in self._rows],
                                    constraints=[r.constraint for r in self._rows])
        logits = self._logits[:, : self.vocab_size].float()
        chosen = self._sampler.choose(self._penalised(logits))
        token_list = chosen.tolist()
        self._sampler.observe(chosen, token_list)
        logprobs = None
        if any(r.job.logprobs is not None for r in self._rows):
            logprobs = torch.log_softmax(logits, dim=-1)
        keep = []
        for r, (row, token) in enumerate(zip(self._rows, token_list)):
            info = None
            if logprobs is not None and row.job.logprobs is not None:
                info = _token_info(logprobs[r], token, row.job.logprobs)
            if self._emit(row, token, info) is None:
                keep.append(r)
        self.generated_tokens += len(token_list)
        self.steps += 1
        if not keep:  # the batch is empty: nothing to sample until requests come (a Sampler needs rows)
            self._drop(keep)
            self._sampler = None
            return
        if len(keep) < len(self._rows):
            self._drop(keep)
            chosen = chosen[torch.tensor(keep, dtype=torch.long, device=self.device)]
            self._sampler.select(keep)
        x = self.model.hidden_states(chosen.view(-1, 1), kv_cache=self._cache)  # (B, 1, C)
        self._logits = self.model.head(x[:, -1])

    def _drop(self, keep: list[int]) -> bool:
        """Keep only rows `keep`; whether anything left."""
        if len(keep) == len(self._rows):
            return False
        self._rows = [self._rows[r] for r in keep]
        if keep:
            self._cache.select(keep)
            self._logits = self._logits[torch.tensor(keep, dtype=torch.long, device=self.device)]
        else:
            self._cache = RowsCache(self.model)
            self._logits = None
        return True

    def _admit(self, job: Job) -> None:
        """Prefill the job's prompt once and add one row per choice."""
        prefill = PrefillCache(self.model.config.n_layer, self.device)
        idx = torch.tensor([job.prompt], dtype=torch.long, device=self.device)
        x = self.model.hidden_states(idx, kv_cache=prefill)  # (1, T, C)
        if job.echo_logprobs:
            prompt_logits = self.model.head(x[0, :-1])[:, : self.vocab_size].float()  # (T-1, V)
            prompt_logprobs = torch.log_softmax(prompt_logits, dim=-1)
            infos = [_token_info(prompt_logprobs[i], job.prompt[i + 1], job.logprobs or 0)
                     for i in range(len(job.prompt) - 1)]
            job.deliver(PromptScores(job.choice_offset, infos))
        logits = self.model.head(x[:, -1])  # (1, V)
        n = len(job.configs)
        if not job.generate:  # echo only: the prompt scored, nothing generated
            for c in range(n):
                job.deliver(Event(job.choice_offset + c, "", None, "length"))
            return
        capacity = len(job.prompt) + max(c.max_new_tokens for c in job.configs)
        self._cache.add(prefill, n, capacity)
        self._logits = logits.expand(n, -1) if self._logits is None else torch.cat([self._logits, logits.expand(n, -1)])
        for c in range(n):
            generator = None
            if job.seeds[c] is not None:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(job.seeds[c])
            stream = TextStream(self.decode_bytes, job.configs[c].stop)
            bias = dict(job.configs[c].logit_bias)
            constraint = RowConstraint(job.grammar, job.end_ids, bias) if job.grammar or bias else None
            self._rows.append(Row(job, c, list(job.prompt), generator, stream, constraint=constraint))

    def _penalised(self, logits: torch.Tensor) -> torch.Tensor:
        """OpenAI's presence and frequency penalties: minus presence for every token the reply already has,
        minus frequency times its count (the prompt does not count)."""
        rows = [r for r, row in enumerate(self._rows) if row.job.presence_penalty or row.job.frequency_penalty]
        if not rows:
            return logits
        logits = logits.clone()
        for r in rows:
            row = self._rows[r]
            if not row.counts:
                continue
            ids = torch.tensor(list(row.counts), dtype=torch.long, device=logits.device)
            counts = torch.tensor(list(row.counts.values()), dtype=logits.dtype, device=logits.device)
            logits[r, ids] -= row.job.frequency_penalty * counts + row.job.presence_penalty
        return logits

    def _emit(self, row: Row, token: int, info: TokenInfo | None) -> str | None:
        """Record the row's new token and deliver its event; the finish reason if the row is done."""
        row.generated += 1
        row.history.append(token)
        row.counts[token] += 1
        reason = None
        if info is not None:  # the end marker too: it is generated and counted, so it has its logprobs entry
            row.pending.append((len(row.stream.text), info))
        if token in row.job.end_ids:
            reason, text = "stop", ""  # the end marker is not part of the reply's text
        else:
            text = row.stream.push(token)
            if row.stream.stopped:
                reason = "stop"
            elif row.constraint is not None and row.constraint.exhausted and not row.constraint.end_ids:
                reason = "stop"  # the JSON is complete and can take nothing more (ignore_eos: no end to force)
            elif row.generated >= row.config.max_new_tokens:
                reason = "length"
        if reason:
            text += row.stream.close()
        # printed so far: infos of tokens starting before it go out; at the end, all but those a stop cut off
        printed = row.stream.emitted if not reason or row.stream.stopped else None
        infos = [i for start, i in row.pending if printed is None or start < printed]
        row.pending = row.pending[len(infos):]
        row.job.deliver(Event(row.job.choice_offset + row.choice, text, token, reason, infos, row.generated))
        return reason


def _token_info(logprobs: torch.Tensor, token: int, top: int) -> TokenInfo:
    """(V,) log-probabilities -> the token's and the `top` best."""
    best = []
    if top:
        values, ids = torch.topk(logprobs, min(top, logprobs.numel()))
        best = list(zip(ids.tolist(), values.tolist()))
    return TokenInfo(token, float(logprobs[token]), best)

