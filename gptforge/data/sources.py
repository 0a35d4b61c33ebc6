"""Turn what the user names on the command line into a stream of text documents.

A source is a text file, a folder (searched recursively, filtered by a glob), a JSONL file (one document
per line, read from a text field), a Parquet file (a text column), a Hugging Face dataset `hf:NAME[:CONFIG]`
(streamed) or `builtin:pystdlib` (the Python standard library's own sources, on every machine: the offline
default). Every source is checked before any document is read, so a typo fails in a second, not after an
hour of tokenizing.

Documents are yielded in a deterministic order. A very long document is yielded in pieces (`Piece`) cut at
a whitespace boundary that does not change how GPT-2-style tokenizers pre-tokenize the text, so memory stays
bounded even for a 100 MB single line. Files with NUL bytes are skipped as binary and counted; invalid
UTF-8 is replaced by U+FFFD and counted; both end up in `SourceStats` and the prepared manifest.

Records (JSONL, Parquet, hf:) are read by the shared reader layer (gptforge.data.readers) with its one
bad-line policy: a malformed line, or a record without a usable text field, is skipped, counted and reported
by file and line; lone surrogates are replaced and counted; only a source with no usable record is an error.
"""

from __future__ import annotations

import codecs
import fnmatch
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..errors import UserError
from ..tokenizer.base import SAFE_CUT
from .readers import (HF_PREFIX, JSONL_SUFFIXES, PARQUET_SUFFIXES, TEXT_ENCODING, CountingReplace, ReadReport, load_hf,
                      parse_hf_spec, read_records)

#: Longest piece of a document handed out at once (characters). Small enough that a worker's task
#: and a split unit stay small, large enough that cutting costs nothing measurable.
PIECE_CHARS = 16 * 1024
READ_BYTES = 1 << 20
BUILTIN_SOURCES = ("builtin:pystdlib", "builtin:pystdlib-qa")
CHAT_BUILTIN_SOURCES = ("builtin:pystdlib-qa",)  # conversations (gptforge.data.pystdlib_qa): prepare --chat
# Tests, installed third-party packages, and `encodings/` — 1.4 MB of generated codec tables
# ('\x00' ... 'LATIN SMALL LETTER') that would teach a small model tables instead of Python.
_PYSTDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                                     "encodings"})
_MAX_EXAMPLES = 10


@dataclass
class SourceStats:
    """What reading the sources found: counts for the manifest and for the user's report."""

    documents: int = 0
    files: int = 0
    bytes: int = 0
    skipped_binary_files: int = 0
    skipped_binary_examples: list[str] = field(default_factory=list)
    invalid_utf8_files: int = 0
    invalid_utf8_replacements: int = 0
    invalid_utf8_examples: list[str] = field(default_factory=list)
    empty_documents: int = 0
    records: ReadReport = field(default_factory=ReadReport)  # JSONL/Parquet/hf: what was skipped or repaired

    def bytes_read(self) -> int:
        """Input bytes consumed so far: text files, record files and hub text."""
        return self.bytes + self.records.bytes

    def to_dict(self) -> dict[str, Any]:
        counts = {k: v for k, v in self.__dict__.items() if k != "records"}
        r = self.records
        counts["bytes"] = self.bytes_read()
        counts["invalid_utf8_replacements"] += r.invalid_utf8
        counts["invalid_utf8_examples"] = (counts["invalid_utf8_examples"] + r.invalid_utf8_examples)[:_MAX_EXAMPLES]
        return {**counts, "skipped_records": r.count, "skipped_record_examples": list(r.examples),
                "lone_surrogates": r.lone_surrogates, "lone_surrogate_examples": list(r.lone_surrogate_examples)}


@dataclass(frozen=True)
class Piece:
    """A run of one document's text; `last` marks the document's end (where end-of-text goes)."""

    text: str
    first: bool
    last: bool


@dataclass(frozen=True)
class Source:
    """One resolved source: `kind` is text|jsonl|parquet|dir|hf|builtin; `files` for local kinds."""

    spec: str
    kind: str
    files: tuple[Path, ...] = ()
    hf_name: str = ""
    hf_config: str | None = None


# --------------------------------------------------------------------------------------------- resolving


def _file_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    return "text"


def _matches(relative: Path, pattern: str | None) -> bool:
    if pattern is None:
        return True
    target = relative.as_posix() if "/" in pattern else relative.name
    return fnmatch.fnmatchcase(target, pattern)


def list_folder(folder: Path, pattern: str | None = None, exclude_dirs: frozenset[str] = frozenset()) -> list[Path]:
    """Files under `folder` matching `pattern`: recursive, hidden entries and `exclude_dirs` skipped.

    The order is fixed (each folder's files by name, then its subfolders by name), so output is reproducible.
    """
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in exclude_dirs)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if _matches(path.relative_to(folder), pattern) and path.is_file():
                found.append(path)
    return found


def pystdlib_files() -> list[Path]:
    """The Python standard library's .py files, tests and codec tables excluded, in sorted order (~11 MB)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = list_folder(root, "*.py", _PYSTDLIB_EXCLUDED_DIRS)
    if not files:
        raise UserError(f"builtin:pystdlib: no .py files found under {root}; name a text source instead")
    return files


def resolve_source(spec: str, glob: str | None = None) -> Source:
    """Check one source spec and list its files; raise UserError naming the spec if it cannot be read."""
    if spec.startswith("builtin:"):
        if spec not in BUILTIN_SOURCES:
            raise UserError(f"unknown built-in source {spec!r}; available: {', '.join(BUILTIN_SOURCES)}")
        if spec in CHAT_BUILTIN_SOURCES:
            return Source(spec, "chat-builtin")
        return Source(spec, "builtin", tuple(pystdlib_files()))
    if spec.startswith(HF_PREFIX):
        name, config = parse_hf_spec(spec)
        return Source(spec, "hf", hf_name=name, hf_config=config)
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"source {spec}: no such file or directory; check the path")
    if path.is_dir():
        files = list_folder(path, glob)
        if not files:
            what = f"matching --glob {glob!r}" if glob else "(hidden files are ignored)"
            raise UserError(f"source {spec}: folder has no files {what}; check the folder or the --glob pattern")
        return Source(spec, "dir", tuple(files))
    if not path.is_file():
        raise UserError(f"source {spec}: not a regular file or folder")
    if path.stat().st_size == 0:
        raise UserError(f"source {spec}: file is empty; remove it from the sources or give it some text")
    return Source(spec, _file_kind(path), (path,))


def resolve_sources(specs: Iterable[str], glob: str | None = None) -> list[Source]:
    """Resolve every spec up front, so that a bad one fails before any work is done."""
    specs = list(specs)
    if not specs:
        raise UserError("no sources given; name a text file, folder, .jsonl, .parquet, hf:NAME or builtin:pystdlib")
    return [resolve_source(spec, glob) for spec in specs]


# --------------------------------------------------------------------------------------------- reading


def _has_nul(path: Path) -> bool:
    with open(path, "rb") as f:
        while block := f.read(READ_BYTES):
            if b"\0" in block:
                return True
    return False


def single_document_chars(sources: list[Source]) -> int | None:
    """The number of characters of a corpus that is one document (a single plain text file, named or the
    only file of a folder), as DocumentReader decodes it; None for any other corpus. It lets the split take
    the file's tail in one streaming pass (split.SplitPlan); counting costs one more read of the file."""
    files = [path for source in sources for path in source.files]
    if len(files) != 1 or any(source.kind not in ("text", "dir") for source in sources):
        return None
    path = files[0]
    if _file_kind(path) != "text":
        return None
    decoder = codecs.getincrementaldecoder(TEXT_ENCODING)(errors="replace")  # one U+FFFD each, as the reader
    chars = 0
    with open(path, "rb") as f:
        while block := f.read(READ_BYTES):
            if b"\0" in block:
                return None  # binary: the reader skips it
            chars += len(decoder.decode(block))
    return chars + len(decoder.decode(b"", final=True))


def cut_pieces(text: str, limit: int = PIECE_CHARS) -> tuple[list[str], str]:
    """Cut complete pieces of at most `limit` chars off the front of `text`; return (pieces, remainder).

    Cuts fall at safe boundaries (tokenizer.base.SAFE_CUT: encoding the pieces apart gives the tokens of the
    whole) in the second half of each window; only a window with no whitespace at all is cut hard. The
    remainder (< limit chars) waits for more text.
    """
    pieces: list[str] = []
    start = 0
    while len(text) - start >= limit:
        window_lo, window_hi = start + limit // 2, start + limit
        cut = None
        for lo in (window_hi - 256, window_hi - 4096, window_lo):  # look near the end first: cheap
            for match in SAFE_CUT.finditer(text, max(lo, window_lo), window_hi):
                cut = match.start()
            if cut is not None:
                break
        if cut is None or cut <= start:
            cut = window_hi
        pieces.append(text[start:cut])
        start = cut
    return pieces, text[start:]


def safe_cut_near(text: str, position: int) -> int:
    """The safe cut (tokenizer.base.SAFE_CUT) of `text` closest to `position`; `position` itself when there is
    none (a run without whitespace is cut hard). Encoding text[:cut] and text[cut:] apart gives the tokens of
    the whole at a safe cut."""
    position = max(0, min(len(text), position))
    for radius in (256, 4096, len(text)):
        lo, hi = max(0, position - radius), min(len(text), position + radius)
        cuts = [m.start() for m in SAFE_CUT.finditer(text, lo, hi)]
        if cuts:
            return min(cuts, key=lambda c: (abs(c - position), c))
        if lo == 0 and hi == len(text):
            break
    return position


def _pieces_of(chunks: Iterable[str], limit: int = PIECE_CHARS) -> Iterator[Piece]:
    """Re-cut a document given as successive text chunks into bounded Pieces, marking first and last."""
    pending: str | None = None
    first = True
    buffer = ""
    for chunk in chunks:
        buffer += chunk
        if len(buffer) < limit:
            continue
        pieces, buffer = cut_pieces(buffer, limit)
        for piece in pieces:
            if pending is not None:
                yield Piece(pending, first, False)
                first = False
            pending = piece
    if buffer:
        if pending is not None:
            yield Piece(pending, first, False)
            first = False
        pending = buffer
    if pending is not None:
        yield Piece(pending, first, True)


class DocumentReader:
    """Iterate the pieces of every document of `sources`, filling `stats` as it goes.

    `pieces()` is the streaming form prepare uses; `documents()` joins pieces (a long document comes out
    in pieces of bounded size there too, see iter_documents).
    """

    def __init__(self, sources: Iterable[str] | list[Source], glob: str | None = None,
                 text_field: str = "text", piece_chars: int = PIECE_CHARS,
                 hf_loader: Callable[..., Iterable[dict]] | None = None) -> None:
        items = list(sources)
        self.sources = items if items and isinstance(items[0], Source) else resolve_sources(items, glob)
        self.text_field = text_field
        self.piece_chars = piece_chars
        self.hf_loader = hf_loader or load_hf_stream
        self.stats = SourceStats()

    # Each reader yields one iterator of text chunks per document.
    def _text_file(self, path: Path) -> Iterator[Iterator[str]]:
        self.stats.files += 1
        if _has_nul(path):
            self.stats.skipped_binary_files += 1
            if len(self.stats.skipped_binary_examples) < _MAX_EXAMPLES:
                self.stats.skipped_binary_examples.append(str(path))
            return
        yield self._decoded_chunks(path)

    def _note_replacements(self, path: Path, before: int) -> None:
        replaced = CountingReplace.count - before
        if replaced:
            self.stats.invalid_utf8_files += 1
            self.stats.invalid_utf8_replacements += replaced
            if len(self.stats.invalid_utf8_examples) < _MAX_EXAMPLES:
                self.stats.invalid_utf8_examples.append(str(path))

    def _decoded_chunks(self, path: Path) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder(TEXT_ENCODING)(errors=CountingReplace.name)
        before = CountingReplace.count
        with open(path, "rb") as f:
            while block := f.read(READ_BYTES):
                self.stats.bytes += len(block)
                yield decoder.decode(block)
            yield decoder.decode(b"", final=True)
        self._note_replacements(path, before)

    def _records_of(self, source: str | Path, hf_loader: Callable[..., Iterable[dict]] | None = None
                    ) -> Iterator[Iterator[str]]:
        """One document per usable record; records without usable text are skipped and counted."""
        field_name = self.text_field
        before = self.stats.records.invalid_utf8
        for where, record in read_records(source, self.stats.records, hf_loader=hf_loader, what="source"):
            if field_name not in record:
                self.stats.records.add(where, f"no field {field_name!r} (found: {', '.join(sorted(record)) or 'none'}); "
                                       "choose one with --text-field")
                continue
            value = record[field_name]
            if value is None:
                value = ""
            if not isinstance(value, str):
                self.stats.records.add(where, f"field {field_name!r} is {type(value).__name__}, not text; "
                                       "choose a text field with --text-field")
                continue
            yield iter((value,))
        if self.stats.records.invalid_utf8 > before:
            self.stats.invalid_utf8_files += 1

    def _jsonl_file(self, path: Path) -> Iterator[Iterator[str]]:
        self.stats.files += 1
        yield from self._records_of(path)

    def _parquet_file(self, path: Path) -> Iterator[Iterator[str]]:
        self.stats.files += 1
        report = self.stats.records
        for where, record in read_records(path, report, columns=[self.text_field],
                                          hint="choose one with --text-field", what="source"):
            value = record[self.text_field]
            if value is not None and not isinstance(value, str):
                report.add(where, f"column {self.text_field!r} holds {type(value).__name__}, not text; "
                           "choose a text column with --text-field")
                continue
            yield iter((value or "",))

    def _hf(self, source: Source) -> Iterator[Iterator[str]]:
        for chunks in self._records_of(source.spec, hf_loader=self.hf_loader):
            text = next(chunks)
            self.stats.bytes += len(text.encode("utf-8", errors="surrogatepass"))
            yield iter((text,))

    def _documents_of(self, source: Source) -> Iterator[Iterator[str]]:
        if source.kind == "hf":
            yield from self._hf(source)
            return
        if source.kind == "chat-builtin":
            raise UserError(f"{source.spec} holds conversations, not text: prepare it with --chat")
        for path in source.files:
            kind = _file_kind(path) if source.kind in ("dir", "builtin") else source.kind
            if kind == "builtin":
                kind = "text"
            if kind == "jsonl":
                yield from self._jsonl_file(path)
            elif kind == "parquet":
                yield from self._parquet_file(path)
            else:
                yield from self._text_file(path)

    def pieces(self) -> Iterator[Piece]:
        """Every document as Pieces, in order; empty documents are counted and skipped."""
        for source in self.sources:
            produced = self.stats.documents
            skipped_before = self.stats.records.count
            for chunks in self._documents_of(source):
                empty = True
                for piece in _pieces_of(chunks, self.piece_chars):
                    if piece.first:
                        empty = False
                        self.stats.documents += 1
                    yield piece
                if empty:
                    self.stats.empty_documents += 1
            if self.stats.documents == produced:
                if self.stats.records.count > skipped_before:
                    raise self.stats.records.nothing_usable(
                        f"source {source.spec}", "fix the file or choose the text field with --text-field")
                detail = ""
                if self.stats.skipped_binary_files:
                    detail = f" ({self.stats.skipped_binary_files} binary file(s) skipped so far)"
                raise UserError(f"source {source.spec}: no text found{detail}; check that it holds text documents")

    def documents(self) -> Iterator[str]:
        """Each document's text; documents longer than the piece size come out as several strings."""
        for piece in self.pieces():
            yield piece.text


def load_hf_stream(name: str, config: str | None = None, split: str = "train") -> Iterable[dict]:
    """Stream a Hugging Face dataset's rows (the reader layer's `load_hf`, streamed)."""
    return load_hf(name, config, split, streaming=True)


def iter_documents(sources: list[str], glob: str | None = None, text_field: str = "text") -> Iterator[str]:
    """Every document of `sources` as text, in a deterministic order (for training tokenizers).

    A document longer than PIECE_CHARS characters is yielded as several consecutive strings cut at
    whitespace, so that a 100 MB single line never has to sit in memory whole.
    """
    return DocumentReader(sources, glob, text_field).documents()
