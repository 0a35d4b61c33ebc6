"""Character-level tokenizer: one id per character seen in the training corpus.

The classic tiny-Shakespeare setup: a vocabulary of a few dozen ids makes small models learn fast. Ids
0..n-1 are the corpus's characters in code-point order, then `<|endoftext|>` and `<|unk|>`, then any
special tokens added later.

Characters never seen in training are encoded as `<|unk|>` rather than failing: a validation set or a
prompt may contain a stray symbol, and refusing the whole input would be worse than losing that one
character. Each tokenizer counts them in `unknown_chars` and warns once, naming the first one, so the loss
is visible. `<|unk|>` decodes to its own text, like every special token.
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import write_text
from ..errors import UserError
from .base import EOT, Tokenizer, check_special_tokens, read_json

UNK = "<|unk|>"
VOCAB_FILE = "chars.json"


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype="<u4")


class CharTokenizer(Tokenizer):
    """One id per character; unseen characters become `<|unk|>` (counted in `unknown_chars`)."""

    kind = "char"
    unk_token = UNK

    def __init__(self, chars: Sequence[str], special_tokens: dict[str, int] | None = None) -> None:
        chars = list(chars)
        if not chars:
            raise UserError("a char tokenizer needs at least one character; train it on a non-empty corpus")
        if any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise UserError("char tokenizer vocabulary must be single characters")
        if chars != sorted(set(chars)):
            raise UserError("char tokenizer vocabulary must be unique characters in code-point order")
        n = len(chars)
        super().__init__(special_tokens or {EOT: n, UNK: n + 1})
        if UNK not in self._special:
            raise UserError(f"a char tokenizer needs the {UNK} special token")
        ids = sorted(self._special.values())
        if ids != list(range(n, n + len(ids))):
            raise UserError(f"char tokenizer special token ids must follow the {n} characters: {n}, {n + 1}, ...")
        self.chars = chars
        # id of each code point up to the largest in the vocabulary; -1 = unseen (the last slot catches
        # everything larger). A table lookup is ~10x faster than a binary search per character.
        points = _code_points("".join(chars))
        self._lookup = np.full(int(points.max()) + 2, -1, dtype=np.int32)
        self._lookup[points] = np.arange(n, dtype=np.int32)
        self._id_to_text = chars + [self._special_by_id[i] for i in ids]
        self.unknown_chars: collections.Counter[str] = collections.Counter()
        self._warned = False

    @classmethod
    def train(cls, texts: Iterable[str]) -> "CharTokenizer":
        """Collect the distinct characters of a streamed corpus (memory grows with the alphabet, not the corpus)."""
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        if not seen:
            raise UserError("cannot build a char tokenizer from an empty corpus; check the SOURCE paths and --glob")
        return cls(sorted(seen))

    @property
    def unk_id(self) -> int:
        return self._special[UNK]

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_text)

    def _encode_ordinary(self, text: str) -> list[int]:
        return self.encode_ordinary_array(text).tolist()

    def encode_ordinary_array(self, text: str) -> np.ndarray:
        points = _code_points(text)
        if points.size == 0:
            return np.zeros(0, dtype=np.uint32)
        ids = self._lookup[np.minimum(points, len(self._lookup) - 1)]
        unknown = ids < 0
        if unknown.any():
            ids[unknown] = self.unk_id
            self._report_unknown(points[unknown])
        return ids.astype(np.uint32, copy=False)

    def _report_unknown(self, points: np.ndarray) -> None:
        values, counts = np.unique(points, return_counts=True)
        for value, count in zip(values.tolist(), counts.tolist()):
            self.unknown_chars[chr(value)] += count
        if not self._warned:
            self._warned = True
            first = chr(int(points[0]))
            warnings.warn(f"char tokenizer: character {first!r} (U+{ord(first):04X}) was not in the training corpus "
                          f"and is encoded as {UNK}; further ones are counted in tokenizer.unknown_chars. Retrain "
                          "on a corpus that includes them to keep them.", stacklevel=4)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        self._check_ids(ids)
        table = self._id_to_text
        return "".join([table[i] for i in ids]).encode("utf-8", errors="surrogatepass")

    def _add_special(self, token: str) -> int:
        self._id_to_text.append(token)
        return len(self._id_to_text) - 1

    def _save_files(self, directory: Path) -> dict[str, Any]:
        import json
        write_text(directory / VOCAB_FILE, json.dumps(self.chars, ensure_ascii=True) + "\n")
        return {"vocab_file": VOCAB_FILE}

    @classmethod
    def load(cls, directory: Path, config: dict[str, Any]) -> "CharTokenizer":
        config_path = directory / "tokenizer_config.json"
        specials = check_special_tokens(config.get("special_tokens"), config_path)
        chars = read_json(directory / VOCAB_FILE, "char tokenizer vocabulary")
        if not isinstance(chars, list):
            raise UserError(f"{directory / VOCAB_FILE}: expected a list of characters; save the tokenizer again")
        try:
            return cls(chars, specials)
        except UserError as e:
            raise UserError(f"saved char tokenizer {directory}: {e}; save the tokenizer again") from None
