"""The one rule for numbers a user types: a command-line option, a TOML value or a `--set`.

A count, a size or a rate must be a finite number in its range; 0 is allowed only where the option's help says
it means "off" (`--top-k 0`); a seed is a whole number in 0 .. 2**32-1 (what NumPy's legacy seeding, used by
the trainer, accepts; torch and NumPy's newer generators accept all of those too). Anything else is one line
that names the option, said before a command opens a file, so `--epochs 0` can no longer mean "the
default", `-1` one step, or `nan` a traceback somewhere deep in the run.

Every command's parser uses these ranges as argparse `type=` (`Range.__call__`), and the run config's
dataclasses check their fields with `Range.check`, so both spell the rule and the message the same way.
Sits just above `errors.py` (it raises UserError); imports nothing else of ours.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from .errors import UserError

SEED_LIMIT = 2**32  # seeds are 0 .. SEED_LIMIT - 1
INT_LIMIT = 2**62  # no count a user means is this large; beyond it int64 arithmetic (token ids, positions) overflows
MAX_STEPS = 10**9  # the most optimizer steps a run may plan: ~12 days at a (very fast) millisecond per step
MAX_VOCAB = 2**24  # the largest vocabulary a tokenizer may be trained to (HF's BPE trainer aborts near 1e9)
MAX_SAMPLES = 4096  # rows of one `sample` batch (1e9 allocated until the machine gave up); more: repeat --seed


@dataclass(frozen=True)
class Range:
    """A number's kind and range; `note` says what the lower end means where it is not a plain minimum."""

    kind: type = int
    low: float = 1
    high: float | None = None
    low_open: bool = False  # True: low itself is not allowed (e.g. > 0 for a float)
    high_open: bool = False
    note: str = ""  # e.g. "0 = off"

    def describe(self) -> str:
        """The range in words, as the error line says it: "a positive integer", "a number in (0, 1]"."""
        what = "an integer" if self.kind is int else "a number"
        note = f" ({self.note})" if self.note else ""
        if self.high is None or (self.kind is int and self.high >= INT_LIMIT):
            if self.low == 0 and self.low_open:
                return f"a positive {'integer' if self.kind is int else 'number'}{note}"
            if self.low == 1 and self.kind is int:
                return f"a positive integer{note}"
            if self.low == 0:
                return f"{what} >= 0{note}"
            return f"{what} {'>' if self.low_open else '>='} {_text(self.low)}{note}"
        if self.kind is int:
            return f"{what} in {_text(self.low)}..{_text(self.high)}{note}"
        return (f"{what} in {'(' if self.low_open else '['}{_text(self.low)}, {_text(self.high)}"
                f"{')' if self.high_open else ']'}{note}")

    def check(self, value: object, where: str) -> int | float:
        """`value` if it is in range, else a UserError naming `where` (an option or a config key)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: must be {self.describe()}, got {value!r}")
        if self.kind is int and (isinstance(value, float) and not value.is_integer()):
            raise UserError(f"{where}: must be {self.describe()}, got {value!r}")
        if not math.isfinite(value) or not self._inside(value):
            raise UserError(f"{where}: must be {self.describe()}, got {_text(value)}")
        return int(value) if self.kind is int else float(value)

    def parse(self, text: str, where: str) -> int | float:
        """A typed option's text -> its number (integers may be written 1e6 or 2.0, as `--set` allows)."""
        text = text.strip()
        try:
            value: int | float = int(text) if self.kind is int else float(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise UserError(f"{where}: must be {self.describe()}, got {text!r}") from None
            if self.kind is int and not (math.isfinite(value) and value.is_integer()):
                raise UserError(f"{where}: must be {self.describe()}, got {text!r}") from None
        return self.check(value, where)

    def __call__(self, text: str) -> int | float:
        """argparse's `type=`: argparse prefixes the option's name ("argument --epochs: must be ...")."""
        try:
            return self.parse(text, "value")
        except UserError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("value: ")) from None

    def _inside(self, value: float) -> bool:
        if value < self.low or (self.low_open and value == self.low):
            return False
        high = self.high if self.high is not None else (INT_LIMIT if self.kind is int else None)
        return high is None or value < high or (value == high and not self.high_open)


def _text(value: float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return str(value)


POSITIVE_INT = Range(int, 1)  # a count or a size: 1 or more
COUNT_OR_OFF = Range(int, 0, note="0 = off")  # e.g. --top-k, --no-repeat-ngram
NON_NEGATIVE_INT = Range(int, 0)  # a count where none is a real answer: --shots 0
POSITIVE = Range(float, 0, low_open=True)  # a rate or an amount: > 0
NON_NEGATIVE = Range(float, 0)  # >= 0 where 0 has a meaning of its own (the help says which)
SEED = Range(int, 0, SEED_LIMIT - 1)
VOCAB_SIZE = Range(int, 1, MAX_VOCAB)
SAMPLES = Range(int, 1, MAX_SAMPLES)
PORT = Range(int, 0, 65535, note="0 = any free port")
