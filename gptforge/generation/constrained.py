"""Constrained decoding: at each step only tokens that keep a row's output inside its grammar may be sampled.

A small model rarely writes valid JSON by itself; masking every token that would leave the grammar makes
its output parse, whatever the weights. The grammar engine is llguidance (Earley parser plus a lazily built
lexer automaton over the token trie), chosen by measurement against xgrammar and outlines-core
(benchmarks/grammar_engines.py): it compiles a schema 5x faster than xgrammar and 100x+ faster than
outlines-core on GPT-2's vocabulary, accepts escaped quotes where xgrammar 0.2.9 refuses them under
`maxLength`, bounds its own work (fuel limits: a hostile schema is an error, not a hang) and has no
dependencies -- xgrammar pulls in transformers and triton. Its mask costs ~0.3 ms a token, a few percent
of a CPU decode step. It is an optional dependency (the `serve` extra), imported only when a grammar is used.

The engine sees the tokenizer exactly: each id's bytes as `decode_bytes([id])` gives them, special tokens
(`<|endoftext|>`, `<|unk|>`, chat markers) marked special, so no grammar can ever produce them as text.
Ending is ours, not the engine's: a row's end ids (end-of-text, or `<|im_end|>` and friends in a chat) are
allowed only where the grammar is complete, and are the only choice once the grammar can go no further.
A reply cut by max_new_tokens stays cut ("length"), never a silently invalid "stop".

`RowConstraint` is one row's state (a grammar matcher and/or a logit bias); the Sampler takes one per row
(or None) so rows without one pay nothing, and a server keeps each row's constraint as its rows come and go.
"""

from __future__ import annotations

import json
import threading
import warnings
import weakref
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import UserError

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

#: A schema's JSON text may be at most this long: compile time grows with it (a 20,000-value enum, 270 kB,
#: takes ~0.35 s on one core; llguidance's own limit then stops a 100,000-value one only after ~3 s).
MAX_SCHEMA_BYTES = 256 * 1024
#: Output format of constrained JSON: one line, json.dumps' separators (the spacing most text a model has
#: read uses), no free whitespace -- so a model cannot spend its tokens on spaces and newlines.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
INSTALL_HINT = "constrained decoding (JSON mode, JSON schema) needs llguidance: pip install 'gptforge[serve]'"


def _llguidance():
    try:
        import llguidance  # (not llguidance.torch: it imports torch.compile's machinery, ~10 s on a loaded CPU)
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return llguidance


def token_bytes_table(tokenizer: "Tokenizer") -> list[bytes]:
    """Each id's bytes as the grammar engine must see them: the exact bytes `decode_bytes([id])` gives, and
    for special tokens the engine's special-token spelling (0xFF then the name), which no text contains."""
    specials = set(tokenizer.special_tokens.values())
    return [b"\xff" + tokenizer.decode_bytes([i]) if i in specials else tokenizer.decode_bytes([i])
            for i in range(tokenizer.vocab_size)]


class _Wrapper:
    """The tokenizer as llguidance's TokenizerWrapper reads it (tokens, special ids, an encode function)."""

    def __init__(self, tokenizer: "Tokenizer") -> None:
        self.eos_token_id = tokenizer.eot_id
        self.bos_token_id = None
        self.tokens = token_bytes_table(tokenizer)
        self.special_token_ids = sorted(tokenizer.special_tokens.values())
        self._encode = tokenizer.encode

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        with warnings.catch_warnings():  # the engine probes with text of its own ("test"): no unknown-char warning
            warnings.simplefilter("ignore")
            return self._encode(text)


_engine_tokenizers: "weakref.WeakKeyDictionary[Tokenizer, tuple[int, Any]]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def engine_tokenizer(tokenizer: "Tokenizer") -> Any:
    """llguidance's view of `tokenizer`, built once per tokenizer (0.6 s for GPT-2's 50,257 ids) and rebuilt
    if special tokens were added since."""
    llg = _llguidance()
    with _lock:
        cached = _engine_tokenizers.get(tokenizer)
        if cached is None or cached[0] != tokenizer.vocab_size:
            cached = (tokenizer.vocab_size, llg.LLTokenizer(llg.TokenizerWrapper(_Wrapper(tokenizer))))
            _engine_tokenizers[tokenizer] = cached
        return cached[1]


def _local_ref_cycle(schema: Any) -> str | None:
    """The first `$ref` (a local "#/..." pointer) that leads back to itself, or None. A recursive schema
    lets output nest without bound, which no max_tokens can finish validly."""
    def resolve(pointer: str) -> Any:
        node = schema
        for part in pointer.lstrip("#").split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return None
        return node

    def refs(node: Any) -> list[str]:
        found, stack = [], [node]
        while stack:
            n = stack.pop()
            if isinstance(n, dict):
                ref = n.get("$ref")
                if isinstance(ref, str) and ref.startswith("#"):
                    found.append(ref)
                stack.extend(n.values())
            elif isinstance(n, list):
                stack.extend(n)
        return found

    edges: dict[str, list[str]] = {}
    todo = refs(schema)
    while todo:
        ref = todo.pop()
        if ref not in edges:
            edges[ref] = refs(resolve(ref))
            todo.extend(edges[ref])
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(ref: str) -> str | None:
        state[ref] = 1
        for nxt in edges.get(ref, ()):
            if state.get(nxt) == 1:
                return nxt
            if nxt not in state and (hit := visit(nxt)):
                return hit
        state[ref] = 2
        return None

    for ref in edges:
        if ref not in state and (hit := visit(ref)):
            return hit
    return None


@dataclass(frozen=True)
class Grammar:
    """A compiled grammar for one tokenizer; `matcher()` starts a fresh row state. `what` names it in errors."""

    text: str  # llguidance's serialized grammar
    engine_tok: Any
    what: str

    def matcher(self) -> Any:
        m = _llguidance().LLMatcher(self.engine_tok, self.text, log_level=0)
        if m.is_error():
            raise UserError(f"{self.what}: {m.get_error()}")
        return m


def compile_json_grammar(tokenizer: "Tokenizer", schema: Mapping[str, Any] | str | None = None,
                         what: str = "--json-schema") -> Grammar:
    """A grammar for JSON valid against `schema` (a dict or its JSON text), or for any JSON object when
    `schema` is None. Errors (not JSON, not a schema, unsupported keywords, recursion, too large) are one
    UserError starting with `what`, the option or field the schema came from."""
    llg = _llguidance()
    if schema is None:
        schema = {"type": "object"}
    if isinstance(schema, str):
        if len(schema.encode("utf-8")) > MAX_SCHEMA_BYTES:
            raise UserError(f"{what}: the schema is larger than {MAX_SCHEMA_BYTES // 1024} KiB; simplify it "
                            "(e.g. fewer enum values)")
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise UserError(f"{what}: not valid JSON ({e})") from None
    if not isinstance(schema, Mapping):
        raise UserError(f"{what}: a JSON schema must be a JSON object, got {type(schema).__name__}")
    text = json.dumps(schema)
    if len(text.encode("utf-8")) > MAX_SCHEMA_BYTES:
        raise UserError(f"{what}: the schema is larger than {MAX_SCHEMA_BYTES // 1024} KiB; simplify it "
                        "(e.g. fewer enum values)")
    cycle = _local_ref_cycle(schema)
    if cycle:
        raise UserError(f"{what}: recursive schemas are not supported ($ref {cycle!r} refers back to itself)")
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(text, overrides=JSON_OPTIONS)
    except ValueError as e:
        raise UserError(f"{what}: {str(e).splitlines()[0]}") from None
    engine_tok = engine_tokenizer(tokenizer)
    error = llg.LLMatcher.validate_grammar(grammar, engine_tok)
    if error:
        raise UserError(f"{what}: unsupported or invalid schema: {error.splitlines()[0]}")
    return Grammar(grammar, engine_tok, what)


class RowConstraint:
    """One row's constraints: an optional grammar (its own matcher, advanced token by token) and an optional
    logit bias (OpenAI's: added to the logits, -100 bans). `end_ids`: the tokens that end this row; they
    are allowed only where the grammar is complete and are never fed to the grammar."""

    def __init__(self, grammar: Grammar | None = None, end_ids: Collection[int] = (),
                 logit_bias: Mapping[int, float] | None = None) -> None:
        self.matcher = grammar.matcher() if grammar is not None else None
        self.end_ids = sorted(set(end_ids))
        self.logit_bias = dict(logit_bias or {})
        self._bias: tuple[torch.Tensor, torch.Tensor] | None = None
        self._bits: torch.Tensor | None = None
        if grammar is not None:
            self._engine_vocab = grammar.engine_tok.vocab_size
            self._eos = grammar.engine_tok.eos_token

    def _mask_bits(self) -> torch.Tensor:
        """The engine's allowed-token bitmask for the next token, computed once per step (the matcher's
        accepting/stopped state is only current after it)."""
        if self._bits is None:
            bits = torch.empty((self._engine_vocab + 31) // 32, dtype=torch.int32)
            self.matcher.unsafe_compute_mask_ptr(bits.data_ptr(), bits.numel() * 4)
            self._bits = bits
        return self._bits

    @property
    def complete(self) -> bool:
        """The output so far is a complete sentence of the grammar (true when there is none)."""
        if self.matcher is None:
            return True
        self._mask_bits()
        return self.matcher.is_accepting()

    @property
    def exhausted(self) -> bool:
        """The grammar can take no further token: only ending remains."""
        if self.matcher is None:
            return False
        self._mask_bits()
        return self.matcher.is_stopped()

    def advance(self, token: int) -> None:
        if self.matcher is None or token in self.end_ids:
            return
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"grammar refused token {token}: {self.matcher.get_error()}")
        self._bits = None

    def allow_ends(self, allowed: torch.Tensor) -> None:
        """Fix the ends in `allowed` (V,) bool, the engine's mask of this row: the row's end ids are allowed
        exactly where the grammar is complete, and the engine's own end id only if it is one of them."""
        vocab = allowed.numel()
        if self._eos < vocab:
            allowed[self._eos] = False
        if self.end_ids:
            complete = self.complete
            for t in self.end_ids:
                if t < vocab:
                    allowed[t] = complete

    def bias_tensors(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, biases) of the logit bias on `device`, made once."""
        if self._bias is None or self._bias[0].device != device:
            ids = torch.tensor(list(self.logit_bias), dtype=torch.long, device=device)
            self._bias = (ids, torch.tensor(list(self.logit_bias.values()), dtype=dtype, device=device))
        return self._bias


def build_constraints(configs: Sequence[Any], tokenizer: "Tokenizer | None", end_ids: Collection[int],
                      what: str = "--json-schema") -> list[RowConstraint | None]:
    """One RowConstraint per SamplingConfig that asks for JSON or a logit bias (None for the others); each
    distinct schema is compiled once. `end_ids`: the ids that end a row whose config has stop_at_eot."""
    grammars: dict[tuple[bool, str | None], Grammar] = {}
    out: list[RowConstraint | None] = []
    for config in configs:
        grammar = None
        if config.constrained:
            if tokenizer is None:
                raise ValueError("JSON mode and JSON schemas need the tokenizer (to describe tokens to the grammar)")
            key = (config.json_object, config.json_schema)
            if key not in grammars:
                grammars[key] = compile_json_grammar(tokenizer, config.json_schema, what)
            grammar = grammars[key]
        if grammar is None and not config.logit_bias:
            out.append(None)
            continue
        ends = end_ids if config.stop_at_eot else ()
        out.append(RowConstraint(grammar, ends, dict(config.logit_bias)))
    return out


_SHIFTS = torch.arange(32, dtype=torch.int32)


def unpack_bits(bits: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, W) int32 bitmasks (bit i of word w: token 32w+i) -> (B, vocab) bool."""
    return ((bits[:, :, None] >> _SHIFTS) & 1).bool().view(bits.size(0), -1)[:, :vocab]


def apply_constraints(logits: torch.Tensor, constraints: Sequence[RowConstraint | None]) -> torch.Tensor:
    """Logit bias, then the grammar mask, for the rows that have a constraint; other rows are untouched
    (the same values, so their tokens are the same as without constrained neighbours)."""
    rows = [r for r, c in enumerate(constraints) if c is not None]
    if not rows:
        return logits
    raw = logits
    logits = logits.clone()
    vocab = logits.size(1)
    for r in rows:
        c = constraints[r]
        if c.logit_bias:
            ids, bias = c.bias_tensors(logits.device, logits.dtype)
            logits[r, ids] += bias
            logits[r, ids[bias <= -100]] = float("-inf")  # -100 bans, as OpenAI documents it
    grammar_rows = [r for r in rows if constraints[r].matcher is not None]
    if grammar_rows:
        first = constraints[grammar_rows[0]]
        bits = torch.stack([constraints[r]._mask_bits() for r in grammar_rows])  # (G, W): one unpack for all
        allowed = unpack_bits(bits, first._engine_vocab)[:, :vocab]
        for i, r in enumerate(grammar_rows):
            constraints[r].allow_ends(allowed[i])
        index = torch.tensor(grammar_rows, dtype=torch.long, device=logits.device)
        allowed = allowed.to(logits.device)
        masked = logits.index_select(0, index).masked_fill(~allowed, float("-inf"))
        stuck = torch.isneginf(masked).all(dim=1)
        if bool(stuck.any()):  # the bias banned all the grammar allows: the grammar wins (output stays valid)
            unbiased = raw.index_select(0, index).masked_fill(~allowed, float("-inf"))
            masked = torch.where(stuck[:, None], unbiased, masked)
        logits.index_copy_(0, index, masked)
    return logits
