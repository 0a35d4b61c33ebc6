"""Byte-level BPE trained on the user's own corpus with Hugging Face `tokenizers`.

Same scheme as GPT-2: text is split with GPT-2's regex, each piece is seen as UTF-8 bytes (all 256 are in
the base vocabulary), and merges are learned on top — so any text, in any script, round-trips exactly and
no `<unk>` is ever needed. The saved `tokenizer.json` is a standard HF file (transformers can load it).

HF's tokenizer always recognises its added tokens inside text; gptforge's contract is that special-token
text is ordinary text unless allowed. So encoding uses a copy without the added tokens, and `Tokenizer`
splits out allowed special tokens itself. Decoding goes through our own id -> bytes table, because HF
decodes to `str` and would lose a UTF-8 character cut at a token boundary.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..numeric import MAX_VOCAB
from .base import EOT, Tokenizer, read_json, split_at_safe_cuts

TOKENIZER_FILE = "tokenizer.json"
#: Texts longer than this (characters) are encoded in pieces cut where the tokens do not change.
LONG_TEXT_CHARS = 1 << 16
N_BYTES = 256


@functools.lru_cache(maxsize=1)
def byte_encoder() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte, so byte-level tokens can be JSON strings.

    Printable Latin-1 bytes stand for themselves, the other 68 take code points from 256 up in byte order.
    The one copy of the table: HF export/import (gptforge.interop) spells tokens with it too.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(N_BYTES):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(N_BYTES + extra)
            extra += 1
    return table


@functools.lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """`byte_encoder` inverted (character -> byte), for turning token strings back into exact bytes."""
    return {c: b for b, c in byte_encoder().items()}


def _build_untrained(special_tokens: Sequence[str]) -> Any:
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    return hf


#: A pre-token (a run of letters, of digits, or of other non-space characters) this long or longer is cut
#: into pieces of this length before the trainer sees it. Natural words are far shorter.
LONG_RUN_CHARS = 64
#: At most this many characters of such long runs are used for training, in all. The HF trainer keeps every
#: distinct pre-token, at ~70 bytes per character, so text without whitespace (minified code, base64, DNA,
#: a dump) would otherwise cost memory in proportion to its size (5 MB of it: 355 MB); with the cap the
#: memory is that of the ordinary text plus ~40 MB. Long runs still tokenize: bytes are always in the
#: vocabulary, and the first LONG_RUN_BUDGET characters teach the merges such text needs.
LONG_RUN_BUDGET = 1 << 19
_LONG_RUN = re.compile(r"[^\W\d_]{%d,}|\d{%d,}|[^\w\s]{%d,}" % ((LONG_RUN_CHARS,) * 3))


class _LongRunLimiter:
    """Re-cut each text so no pre-token the trainer sees is longer than LONG_RUN_CHARS, and stop feeding
    long runs after LONG_RUN_BUDGET characters (`dropped` counts what was left out)."""

    def __init__(self, budget: int = LONG_RUN_BUDGET, size: int = LONG_RUN_CHARS) -> None:
        self.budget = budget
        self.size = size
        self.dropped = 0

    def __call__(self, text: str) -> Iterator[str]:
        if not _LONG_RUN.search(text):  # the common case: one C-level scan, text passed on whole
            yield text
            return
        position = 0
        for match in _LONG_RUN.finditer(text):
            if match.start() > position:
                yield text[position:match.start()]
            run = match.group()
            used = run[:max(0, self.budget)]
            self.budget -= len(used)
            self.dropped += len(run) - len(used)
            for start in range(0, len(used), self.size):
                yield used[start:start + self.size]
            position = match.end()
        if position < len(text):
            yield text[position:]


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = (EOT,),
              min_frequency: int = 2, show_progress: bool = False) -> "BPETokenizer":
    """Train a byte-level BPE on a stream of documents; `vocab_size` counts the 256 bytes and the specials.

    The corpus is streamed to the trainer (documents are not kept). A small corpus may stop short of
    `vocab_size` when no pair occurs `min_frequency` times; check `.vocab_size` for the size you got.
    Memory is bounded for text without whitespace too: see LONG_RUN_BUDGET.
    """
    from tokenizers import trainers, pre_tokenizers

    special_tokens = list(dict.fromkeys([EOT, *special_tokens]))
    minimum = N_BYTES + len(special_tokens)
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise UserError(f"--vocab-size {vocab_size} is too small for byte-level BPE: it needs at least {minimum} "
                        f"(256 bytes + {len(special_tokens)} special tokens); 8192-50257 is typical")
    if vocab_size > MAX_VOCAB:  # also `prepare --tokenizer bpe:N`; the Rust trainer aborts the process near 1e9
        raise UserError(f"--vocab-size {vocab_size:,} is more than the {MAX_VOCAB:,} a tokenizer may have; "
                        "8192-50257 is typical")
    counter = {"docs": 0, "chars": 0}

    limit_long_runs = _LongRunLimiter()

    def counted(stream: Iterable[str]) -> Iterator[str]:
        for text in stream:
            if text:
                counter["docs"] += 1
                counter["chars"] += len(text)
                yield from limit_long_runs(text)

    hf = _build_untrained(special_tokens)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=special_tokens, show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(counted(texts), trainer=trainer)
    if counter["docs"] == 0:
        raise UserError("cannot train a tokenizer on an empty corpus; check the SOURCE paths and --glob")
    return BPETokenizer(hf)


class BPETokenizer(Tokenizer):
    """A trained byte-level BPE (wraps a `tokenizers.Tokenizer`)."""

    kind = "bpe"

    def __init__(self, hf: Any) -> None:
        self._hf = hf
        super().__init__(self._specials_of(hf))
        self._rebuild()

    @staticmethod
    def _specials_of(hf: Any) -> dict[str, int]:
        return {tok.content: i for i, tok in hf.get_added_tokens_decoder().items() if tok.special}

    def _rebuild(self) -> None:
        """Derive the plain encoder (no added tokens) and the id -> bytes table from the HF tokenizer."""
        from tokenizers import Tokenizer as HFTokenizer

        state = json.loads(self._hf.to_str())
        state["added_tokens"] = []
        self._plain = HFTokenizer.from_str(json.dumps(state))
        decoder = byte_decoder()
        size = self._hf.get_vocab_size(with_added_tokens=True)
        table: list[bytes] = []
        for i in range(size):
            if i in self._special_by_id:
                table.append(self._special_by_id[i].encode("utf-8"))
                continue
            token = self._hf.id_to_token(i)
            if token is None:
                raise UserError(f"bpe tokenizer has no token for id {i}; the tokenizer.json is inconsistent")
            try:
                table.append(bytes(decoder[c] for c in token))
            except KeyError:  # an added non-special token: its text is literal
                table.append(token.encode("utf-8"))
        self._bytes = table

    @property
    def hf_tokenizer(self) -> Any:
        """The full `tokenizers.Tokenizer` (special tokens included), e.g. for export to transformers."""
        return self._hf

    @property
    def vocab_size(self) -> int:
        return len(self._bytes)

    def _encode_ordinary(self, text: str) -> list[int]:
        if len(text) > LONG_TEXT_CHARS and self._cuts_are_safe():
            # One Encoding of a 5 MB text took ~800 MB (offsets, token strings) and 12 s on one thread.
            return [i for ids in self._encode_ordinary_batch(split_at_safe_cuts(text, LONG_TEXT_CHARS)) for i in ids]
        return self._plain.encode(text, add_special_tokens=False).ids

    def _cuts_are_safe(self) -> bool:
        """Whether cutting at SAFE_CUT keeps the tokens: GPT-2's byte-level pre-tokenizer (what `train_bpe`
        builds) and no normalizer; an imported tokenizer.json may pre-tokenize otherwise."""
        from tokenizers import pre_tokenizers

        pre = self._plain.pre_tokenizer
        return (self._plain.normalizer is None and isinstance(pre, pre_tokenizers.ByteLevel) and pre.use_regex
                and not pre.add_prefix_space)

    def _encode_ordinary_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.20) skips character offsets, which we never use.
        encode = getattr(self._plain, "encode_batch_fast", self._plain.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        self._check_ids(ids)
        table = self._bytes
        return b"".join([table[i] for i in ids])

    def _add_special(self, token: str) -> int:
        from tokenizers import AddedToken

        self._hf.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        new_id = self._hf.token_to_id(token)
        self._special_by_id[new_id] = token  # needed by _rebuild before the base class records it
        self._rebuild()
        return new_id

    def _save_files(self, directory: Path) -> dict[str, Any]:
        from ..atomic import write_text

        write_text(directory / TOKENIZER_FILE, self._hf.to_str(pretty=True))
        return {"tokenizer_file": TOKENIZER_FILE}

    @classmethod
    def load(cls, directory: Path, config: dict[str, Any]) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        path = directory / TOKENIZER_FILE
        read_json(path, "bpe tokenizer file")  # clear error for a missing or garbled file
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on schema errors
            raise UserError(f"{path} is not a valid tokenizers file ({e}); save the tokenizer again") from None
        tokenizer = cls(hf)
        saved = config.get("special_tokens")
        if saved is not None and saved != tokenizer.special_tokens:
            raise UserError(f"{directory / 'tokenizer_config.json'}: special_tokens disagree with {TOKENIZER_FILE}; "
                            "save the tokenizer again")
        return tokenizer
