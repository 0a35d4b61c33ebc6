"""Turning a row's token ids into text that is safe to print as it arrives.

Two things make naive per-token decoding wrong: a byte-level token can end in the middle of a UTF-8
character (so pieces are decoded from exact bytes with an incremental decoder), and a stop string can
span several tokens (so text that could still turn out to be the start of a stop string is held back
until it is certain, and the completion is cut where the stop string begins).
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence


class TextStream:
    """Accumulates one sequence's tokens; `push` returns the newly printable text."""

    def __init__(self, token_bytes: Callable[[Sequence[int]], bytes], stop: Sequence[str] = ()) -> None:
        self.token_bytes = token_bytes
        self.stop = tuple(stop)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # everything decoded so far (stop string and all)
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the text that can now be printed ("" if it is still held back)."""
        if self.stopped:
            return ""
        self.text += self.decoder.decode(self.token_bytes([token]))
        return self._release(final=False)

    def close(self) -> str:
        """No more tokens: flush held-back text (a dangling partial character becomes U+FFFD)."""
        if not self.stopped:
            self.text += self.decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if not self.stopped and self.stop:
            search_from = max(0, self.emitted - max(len(s) for s in self.stop))
            hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
        end = len(self.text)
        if not final and not self.stopped:
            end -= _held_back(self.text, self.stop)
        end = max(end, self.emitted)
        piece = self.text[self.emitted:end]
        self.emitted = end
        return piece


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
