"""The one interface every tokenizer kind implements, and the parts they share.

Models, data preparation, generation and evaluation only ever see `Tokenizer`, so a run can switch between
GPT-2's BPE, a character vocabulary and a user-trained BPE without other code knowing. Special tokens
(`<|endoftext|>` now, chat markers later) are part of the interface: they are recognised in text only where
a caller explicitly allows them, so a document that happens to contain "<|endoftext|>" cannot inject a
document boundary into training data.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import numpy as np

from ..atomic import atomic_directory, write_text
from ..errors import UserError
from ..layout import CHAT_TEMPLATE_FILE

EOT = "<|endoftext|>"
CONFIG_FILE = "tokenizer_config.json"

# A safe cut: just after a lone newline between two non-space characters, or just before a lone space
# between two non-space characters. At such a point GPT-2's pre-tokenizer regex (and the byte-level one
# of HF tokenizers) ends one piece and starts the next whether or not the text is cut there, so encoding
# the pieces separately gives exactly the tokens of the whole (prepare cuts documents there; the bpe
# kind cuts one long text there to encode it in parallel, in little memory).
SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)|(?<=\S)(?= \S)")


def split_at_safe_cuts(text: str, size: int) -> list[str]:
    """`text` in pieces of at least `size` characters (the last may be shorter), each ending at the first safe
    cut past `size`; text without one stays whole. Encoding the pieces apart gives the tokens of the whole."""
    pieces: list[str] = []
    start = 0
    while len(text) - start > size:
        cut = SAFE_CUT.search(text, start + size)
        if cut is None:
            break
        pieces.append(text[start:cut.start()])
        start = cut.start()
    pieces.append(text[start:])
    return pieces


# False/None: special-token text is ordinary text. True or "all": every special token is recognised.
# A collection of strings: only those are recognised.
AllowedSpecial = Union[bool, Literal["all"], Collection[str], None]


class Tokenizer(ABC):
    """Text <-> token ids, with exact bytes for streaming and bits-per-byte.

    Subclasses implement the ordinary (no special tokens) encoding, `decode_bytes`, how to add a special
    token, and which files they save; this class handles special-token splitting, batching and the
    saved directory's layout (`tokenizer_config.json` with at least {"kind": ...}).
    """

    kind: ClassVar[str]
    eot_token: ClassVar[str] = EOT

    def __init__(self, special_tokens: dict[str, int]) -> None:
        if EOT not in special_tokens:
            raise UserError(f"tokenizer has no {EOT} special token; every gptforge tokenizer needs one")
        self._special: dict[str, int] = dict(special_tokens)
        self._special_by_id: dict[int, str] = {i: t for t, i in self._special.items()}
        self._split_cache: dict[frozenset[str], re.Pattern[str]] = {}
        # Jinja chat template (gptforge.chat), saved as its own file so exports and other tools read it as is
        self.chat_template: str | None = None

    # ---- properties ----------------------------------------------------------------------------------

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids; valid ids are 0 .. vocab_size-1 (special tokens included)."""

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def eot_id(self) -> int:
        return self._special[EOT]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"

    # ---- encoding -------------------------------------------------------------------------------------

    @abstractmethod
    def _encode_ordinary(self, text: str) -> list[int]:
        """Encode `text` treating any special-token text as plain characters."""

    def _encode_ordinary_batch(self, texts: list[str]) -> list[list[int]]:
        return [self._encode_ordinary(t) for t in texts]

    def encode_ordinary_array(self, text: str) -> np.ndarray:
        """`encode(text)` as a uint32 array: what `prepare` writes to shards. Kinds whose encoder can fill an
        array directly skip building (and then converting) a Python list of ints, ~7% of prepare's time."""
        return np.asarray(self._encode_ordinary(text), dtype=np.uint32)

    def _allowed(self, allowed_special: AllowedSpecial) -> frozenset[str]:
        if allowed_special is None or allowed_special is False:
            return frozenset()
        if allowed_special is True or allowed_special == "all":
            return frozenset(self._special)
        if isinstance(allowed_special, str):  # a lone token name; a str is a Collection of characters
            allowed_special = [allowed_special]
        allowed = frozenset(allowed_special)
        unknown = allowed - self._special.keys()
        if unknown:
            raise UserError(f"allowed_special names {sorted(unknown)} which this {self.kind} tokenizer does not "
                            f"have; its special tokens are {sorted(self._special)}")
        return allowed

    def _split_pattern(self, allowed: frozenset[str]) -> re.Pattern[str]:
        pattern = self._split_cache.get(allowed)
        if pattern is None:
            # Longest first, so that a token which is a prefix of another never wins the match.
            alternatives = sorted(allowed, key=len, reverse=True)
            pattern = re.compile("|".join(re.escape(t) for t in alternatives))
            self._split_cache[allowed] = pattern
        return pattern

    def encode(self, text: str, allowed_special: AllowedSpecial = False) -> list[int]:
        """Token ids of `text`. Special-token text is encoded as ordinary text unless allowed."""
        allowed = self._allowed(allowed_special)
        if not allowed:
            return self._encode_ordinary(text)
        ids: list[int] = []
        start = 0
        for match in self._split_pattern(allowed).finditer(text):
            if match.start() > start:
                ids.extend(self._encode_ordinary(text[start:match.start()]))
            ids.append(self._special[match.group()])
            start = match.end()
        if start < len(text):
            ids.extend(self._encode_ordinary(text[start:]))
        return ids

    def encode_batch(self, texts: Iterable[str], allowed_special: AllowedSpecial = False) -> list[list[int]]:
        """`[encode(t, allowed_special) for t in texts]`, using the kind's parallel encoder where it has one."""
        texts = list(texts)
        if not self._allowed(allowed_special):
            return self._encode_ordinary_batch(texts)
        return [self.encode(t, allowed_special) for t in texts]

    # ---- decoding -------------------------------------------------------------------------------------

    @abstractmethod
    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The exact bytes the ids stand for; a token may end inside a UTF-8 character."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the ids; bytes that are not valid UTF-8 (a cut-off character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def _check_ids(self, ids: Sequence[int]) -> None:
        n = self.vocab_size
        for i in ids:
            if not 0 <= i < n:
                raise ValueError(f"token id {i} is outside this {self.kind} tokenizer's vocabulary 0..{n - 1}")

    # ---- special tokens -------------------------------------------------------------------------------

    def add_special_tokens(self, tokens: Iterable[str]) -> dict[str, int]:
        """Add special tokens (e.g. chat markers) with new ids at the end; returns the ids of `tokens`.

        Tokens already present keep their id. A model trained with the old vocabulary needs its embedding
        grown to the new `vocab_size` before it can use the new ids.
        """
        result: dict[str, int] = {}
        for token in tokens:
            if not isinstance(token, str) or not token:
                raise UserError(f"special token {token!r} must be a non-empty string")
            if token not in self._special:
                new_id = self._add_special(token)
                self._special[token] = new_id
                self._special_by_id[new_id] = token
                self._split_cache.clear()
            result[token] = self._special[token]
        return result

    @abstractmethod
    def _add_special(self, token: str) -> int:
        """Make room for one new special token in the kind's own tables and return its id."""

    # ---- saving ---------------------------------------------------------------------------------------

    @abstractmethod
    def _save_files(self, directory: Path) -> dict[str, Any]:
        """Write the kind's files into `directory`; return extra entries for tokenizer_config.json."""

    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write this tokenizer to `directory` atomically so `load_tokenizer(directory)` rebuilds it exactly.

        The directory is self-contained (GPT-2's ranks are copied in), so a run directory works offline.
        """
        directory = Path(directory)
        if directory.exists() and not overwrite:
            raise UserError(f"tokenizer directory {directory} already exists; choose another path or delete it")
        with atomic_directory(directory, overwrite=overwrite) as tmp:
            self.write_into(tmp)
        return directory

    def write_into(self, directory: Path) -> None:
        """Write the tokenizer's files into the existing, empty `directory` (for a caller that publishes the
        directory itself, such as `tokenizer train` through gptforge.outputs)."""
        extra = self._save_files(directory)
        if self.chat_template is not None:
            write_text(directory / CHAT_TEMPLATE_FILE, self.chat_template)
            extra["chat_template_file"] = CHAT_TEMPLATE_FILE
        config = {"kind": self.kind, "vocab_size": self.vocab_size, "eot_token": EOT,
                  "special_tokens": self.special_tokens, **extra}
        write_text(directory / CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def read_json(path: Path, what: str) -> Any:
    """Parse a JSON file of a saved tokenizer, or raise a UserError naming it."""
    if not path.is_file():
        raise UserError(f"{what} {path} is missing; save the tokenizer again (Tokenizer.save) or point to another "
                        "tokenizer directory")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path} is not valid JSON ({e}); save the tokenizer again") from None


def check_special_tokens(value: Any, path: Path) -> dict[str, int]:
    """Validate the special_tokens table of a saved tokenizer_config.json."""
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                              for k, v in value.items()):
        raise UserError(f"{path}: special_tokens must be a table of token -> integer id; save the tokenizer again")
    if EOT not in value:
        raise UserError(f"{path}: special_tokens lacks {EOT}; save the tokenizer again")
    return dict(value)
