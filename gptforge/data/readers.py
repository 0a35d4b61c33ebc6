"""Records (JSON objects) from JSONL/JSON files, Parquet files and Hugging Face datasets, read one way.

This is the one reader layer under every command that reads records: `prepare` (documents from a text
field), the evaluations (hellaswag/lambada/mmlu items) and chat data for SFT. They all get the same sources
and the same bad-line policy:

* A malformed record (a line that is not JSON, or not a JSON object) is **skipped, counted and reported
  with where it was** (`file:line`); the caller rejects records it cannot use the same way, through
  `ReadReport.add`. One bad line in a million must not cost a whole run, and silence would hide damage.
* Bytes that are not UTF-8 and lone UTF-16 surrogates (`"\\ud800"` in JSON, common in web scrapes; no
  tokenizer or file can hold one) are **replaced by U+FFFD and counted**, with the first places named.
* It is an error (`UserError`, one line) only when nothing usable is left: a missing, empty or unreadable
  file (a Parquet file damaged partway included: a bad row group cannot be skipped like a bad line), a
  Parquet file without a requested column, a hub dataset that cannot be loaded, or — decided by the
  caller, who knows what "usable" means — no usable record at all (`ReadReport.nothing_usable`).

Use it like this (the pattern prepare, the evals and SFT data follow):

    report = ReadReport()
    items = []
    for where, record in read_records("chats.jsonl", report):      # or "x.parquet", "hf:NAME[:CONFIG]"
        try:
            items.append(parse(record))                            # your own check of one record
        except ValueError as e:
            report.add(where, str(e))                              # skipped, counted, first few kept
    if not items:
        raise report.nothing_usable("chats.jsonl", "each line must be {\"messages\": [...]}")
    print(report.summary())                                        # '' when nothing was skipped or replaced

`where` is `PATH:LINE` for JSONL (1-based), `PATH item N` for a JSON list, `PATH row N` for Parquet and
`hf:NAME row N` for a hub dataset (0-based, as datasets index them).
"""

from __future__ import annotations

import codecs
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..errors import UserError

HF_PREFIX = "hf:"
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
JSON_SUFFIX = ".json"
PARQUET_SUFFIXES = frozenset({".parquet"})
#: How many skipped/replaced places a report keeps (and logs), so a bad file cannot flood the terminal.
MAX_EXAMPLES = 5
PARQUET_BATCH_ROWS = 1024
_REPLACEMENT = "\ufffd"
_SURROGATE = re.compile("[\ud800-\udfff]")
# A JSON escape that may decode to a lone surrogate; only lines with one need the (slower) record walk.
_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89abcdefABCDEF][0-9a-fA-F]{2}")

Record = dict[str, Any]
HubLoader = Callable[..., Iterable[Record]]


@dataclass
class ReadReport:
    """What reading skipped or repaired, with the first few places (`where: why`), for the user's report.

    `count`/`examples` are the skipped records; `invalid_utf8` counts replaced invalid byte sequences and
    `lone_surrogates` replaced surrogate code points, each with example places. With `log`, each kept example
    is also logged as a warning as it happens.
    """

    count: int = 0
    examples: list[str] = field(default_factory=list)
    invalid_utf8: int = 0
    invalid_utf8_examples: list[str] = field(default_factory=list)
    lone_surrogates: int = 0
    lone_surrogate_examples: list[str] = field(default_factory=list)
    bytes: int = 0  # bytes of local files read so far (for progress bars)
    log: logging.Logger | None = field(default=None, repr=False, compare=False)

    def _keep(self, examples: list[str], message: str) -> None:
        if len(examples) < MAX_EXAMPLES:
            examples.append(message)
            if self.log is not None:
                self.log.warning("%s", message)

    def add(self, where: str, why: str) -> None:
        """Skip one record: count it and keep the first few reasons."""
        self.count += 1
        self._keep(self.examples, f"{where}: {why}; skipped")

    def replaced_invalid_utf8(self, where: str, n: int) -> None:
        if n:
            self.invalid_utf8 += n
            self._keep(self.invalid_utf8_examples, f"{where}: {n} invalid UTF-8 sequence(s) replaced by U+FFFD")

    def replaced_surrogates(self, where: str, n: int) -> None:
        if n:
            self.lone_surrogates += n
            self._keep(self.lone_surrogate_examples, f"{where}: {n} lone surrogate(s) replaced by U+FFFD")

    def summary(self) -> str:
        """One line per kind of problem met ('' when none), naming the first place of each."""
        lines = []
        for n, what, examples in ((self.count, "malformed record(s) skipped", self.examples),
                                  (self.invalid_utf8, "invalid UTF-8 sequence(s) replaced", self.invalid_utf8_examples),
                                  (self.lone_surrogates, "lone surrogate(s) replaced", self.lone_surrogate_examples)):
            if n:
                lines.append(f"{n:,} {what} (first: {examples[0]})")
        return "\n".join(lines)

    def nothing_usable(self, source: str, expected: str) -> UserError:
        """The one-line error for a source that yielded no usable record: how many were skipped, the first
        reason, and what a record should hold."""
        first = f"; first: {self.examples[0].removesuffix('; skipped')}" if self.examples else ""
        return UserError(f"{source}: no usable records ({self.count:,} skipped{first}); {expected}")


# ------------------------------------------------------------------------------------------- text repair


def repair_warnings(invalid_utf8: int, invalid_utf8_examples: list[str], lone_surrogates: int,
                    lone_surrogate_examples: list[str], files: int | None = None) -> list[str]:
    """The manifest warnings for text repaired while reading, naming the first file:line of each kind: one
    wording for `prepare` and `prepare --chat`. `files`: how many files had invalid UTF-8, when known."""
    warnings = []
    if invalid_utf8:
        where = f" in {files} file(s)" if files else ""
        warnings.append(f"replaced {invalid_utf8} invalid UTF-8 sequence(s){where} (first: {invalid_utf8_examples[0]})")
    if lone_surrogates:
        warnings.append(f"replaced {lone_surrogates} lone surrogate(s) by U+FFFD (first: {lone_surrogate_examples[0]})")
    return warnings


class CountingReplace:
    """A codec error handler: U+FFFD for each invalid sequence, as errors="replace", counted (the readers
    here and the plain-text source reader share it)."""

    name = "gptforge-readers-replace"
    count = 0

    @classmethod
    def handle(cls, error: UnicodeDecodeError) -> tuple[str, int]:
        cls.count += 1
        return _REPLACEMENT, error.end


codecs.register_error(CountingReplace.name, CountingReplace.handle)


#: Text files are read as "utf-8-sig": a byte-order mark (Windows editors, PowerShell and Excel write one) at
#: the start is dropped, not read as U+FEFF, which made a JSONL file's first record invalid JSON and a .json
#: array file unreadable.
TEXT_ENCODING = "utf-8-sig"


def decode_counting(raw: bytes) -> tuple[str, int]:
    """`raw` decoded as UTF-8 (a leading byte-order mark dropped) with invalid sequences replaced by U+FFFD;
    (text, replacements)."""
    try:
        return raw.decode(TEXT_ENCODING), 0
    except UnicodeDecodeError:
        before = CountingReplace.count
        text = raw.decode(TEXT_ENCODING, errors=CountingReplace.name)
        return text, CountingReplace.count - before


def replace_surrogates(value: Any) -> tuple[Any, int]:
    """`value` (a JSON value) with every lone surrogate in its strings, keys included, replaced by U+FFFD."""
    if isinstance(value, str):
        return _SURROGATE.subn(_REPLACEMENT, value)
    if isinstance(value, list):
        total = 0
        out = []
        for item in value:
            item, n = replace_surrogates(item)
            out.append(item)
            total += n
        return out, total
    if isinstance(value, dict):
        total = 0
        fixed = {}
        for key, item in value.items():
            key, n_key = replace_surrogates(key)
            item, n_item = replace_surrogates(item)
            fixed[key] = item
            total += n_key + n_item
        return fixed, total
    return value, 0


# ------------------------------------------------------------------------------------------- sources


def parse_hf_spec(spec: str) -> tuple[str, str | None]:
    """`hf:NAME` or `hf:NAME:CONFIG` -> (NAME, CONFIG or None). NAME is a Hub id or a local dataset folder."""
    name, _, config = spec[len(HF_PREFIX):].partition(":")
    if not name:
        raise UserError(f"source {spec!r}: write hf:NAME or hf:NAME:CONFIG (e.g. hf:roneneldan/TinyStories)")
    return name, config or None


def is_record_file(path: str | Path) -> bool:
    """Whether `path` names a records file by its suffix (.jsonl/.ndjson/.json/.parquet)."""
    suffix = Path(path).suffix.lower()
    return suffix in JSONL_SUFFIXES or suffix in PARQUET_SUFFIXES or suffix == JSON_SUFFIX


def require_file(path: Path, what: str = "data file") -> Path:
    """`path` if it is a non-empty regular file, else a UserError saying which and what to do."""
    if not path.exists():
        raise UserError(f"{what} {path} does not exist; check the path")
    if not path.is_file():
        raise UserError(f"{what} {path} is not a file; pass the file itself")
    if path.stat().st_size == 0:
        raise UserError(f"{what} {path} is empty; pass a file with at least one record")
    return path


def load_hf(name: str, config: str | None = None, split: str = "train", streaming: bool = True,
            what: str = "source") -> Iterable[Record]:
    """A Hugging Face dataset split's rows (`datasets.load_dataset`); streamed unless `streaming=False`.

    `name` is a Hub id or a local folder of data files (json/parquet/csv, which `datasets` finds itself);
    that is how it is tested offline. Any failure to load is one UserError naming the dataset.
    """
    try:
        import datasets
    except ImportError:
        raise UserError(f"{what} hf:{name}: reading Hugging Face datasets needs the 'datasets' package; "
                        "pip install 'gptforge[data]', or use local files") from None
    try:
        return datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as e:  # offline, unknown name, missing split or config: the hub raises many types
        text = str(e).strip()
        first_line = text.splitlines()[0] if text else type(e).__name__
        raise UserError(f"{what} hf:{name}: could not load hub dataset {name}{'/' + config if config else ''} "
                        f"split {split} ({first_line}); check the name, config and network, or use local files") \
            from None


def _hf_records(spec: str, report: ReadReport, split: str, streaming: bool, loader: HubLoader | None,
                what: str) -> Iterator[tuple[str, Record]]:
    name, config = parse_hf_spec(spec)
    rows = loader(name, config) if loader is not None else load_hf(name, config, split, streaming, what)
    iterator = iter(rows)
    n = 0
    while True:
        try:
            row = next(iterator)
        except StopIteration:
            return
        except UserError:
            raise
        except Exception as e:  # a streamed dataset can fail mid-way (network, a damaged remote file)
            raise UserError(f"{what} {spec}: reading row {n} failed ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); check the network "
                            "or the dataset") from None
        where = f"{spec} row {n}"
        n += 1
        if isinstance(row, dict):
            yield where, dict(row)
        else:
            report.add(where, "not a record (a mapping of fields)")


def _jsonl_records(path: Path, report: ReadReport) -> Iterator[tuple[str, Record]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            report.bytes += len(raw)
            where = f"{path}:{lineno}"
            line, bad_bytes = decode_counting(raw)
            report.replaced_invalid_utf8(where, bad_bytes)
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                report.add(where, f"not valid JSON ({e.msg})")
                continue
            except RecursionError:
                report.add(where, "JSON nested too deeply")
                continue
            if not isinstance(record, dict):
                report.add(where, f"not a JSON object (a {type(record).__name__})")
                continue
            if "\\u" in line and _ESCAPED_SURROGATE.search(line):
                record, n = replace_surrogates(record)
                report.replaced_surrogates(where, n)
            yield where, record


def _json_list_records(path: Path, text: str, report: ReadReport, what: str) -> Iterator[tuple[str, Record]]:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {path}: invalid JSON at line {e.lineno} ({e.msg}); fix it or convert it to "
                        "JSONL (one object per line), where a bad line is skipped instead") from None
    for n, record in enumerate(records):
        where = f"{path} item {n}"
        if not isinstance(record, dict):
            report.add(where, f"not a JSON object (a {type(record).__name__})")
            continue
        record, replaced = replace_surrogates(record)
        report.replaced_surrogates(where, replaced)
        yield where, record


def _parquet_records(path: Path, report: ReadReport, columns: list[str] | None, hint: str,
                     what: str) -> Iterator[tuple[str, Record]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{what} {path}: reading .parquet files needs the 'pyarrow' package; "
                        "pip install 'gptforge[data]'") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise UserError(f"{what} {path}: not a readable Parquet file ({e}); check the file") from None
    report.bytes += path.stat().st_size
    names = parquet.schema_arrow.names
    for column in columns or ():
        if column not in names:
            raise UserError(f"{what} {path}: no column {column!r} (found: {', '.join(names)})"
                            f"{'; ' + hint if hint else ''}")
    # A damaged column chunk surfaces only when its row group is decoded: OSError (pyarrow's ArrowIOError,
    # e.g. "Corrupt snappy compressed data") or ArrowInvalid (a ValueError). A row group cannot be skipped
    # like a bad JSONL line (its extent is unknown once its bytes are wrong), so it is an unreadable file:
    # one line naming it and where reading stopped.
    batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns)
    n = 0
    while True:
        try:
            batch = next(batches, None)
            rows = batch.to_pylist() if batch is not None else []
        except (OSError, ValueError, pa.ArrowException) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{what} {path}: damaged Parquet file, unreadable after row {n} ({reason}); "
                            "re-create or re-download it") from None
        if batch is None:
            return
        for row in rows:
            yield f"{path} row {n}", row
            n += 1


def read_records(source: str | Path, report: ReadReport, *, columns: list[str] | None = None, hint: str = "",
                 hf_split: str = "train", hf_streaming: bool = True, hf_loader: HubLoader | None = None,
                 what: str = "data file") -> Iterator[tuple[str, Record]]:
    """(where, record) for every record of `source`, in file order; see the module docstring for the policy.

    `source` is a .jsonl/.ndjson file (one JSON object per line), a .json file (a JSON list of objects, or
    JSONL under another name), a .parquet file (one record per row; `columns` limits and requires columns,
    `hint` is appended to the missing-column error) or `hf:NAME[:CONFIG]` (split `hf_split`, streamed unless
    `hf_streaming=False`; `hf_loader(name, config)` replaces `datasets` for tests and custom stores). `what`
    names the source in errors ("hellaswag data file", "source"). Records are streamed: memory does not grow
    with the file (a .json list is the exception: it is one JSON document).
    """
    if isinstance(source, str) and source.startswith(HF_PREFIX):
        yield from _hf_records(source, report, hf_split, hf_streaming, hf_loader, what)
        return
    path = require_file(Path(source).expanduser(), what)
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        yield from _parquet_records(path, report, columns, hint, what)
        return
    if suffix == JSON_SUFFIX:
        with open(path, "rb") as f:
            head = f.read(4096).removeprefix(codecs.BOM_UTF8).lstrip()
        if head.startswith(b"["):
            raw = path.read_bytes()
            report.bytes += len(raw)
            text, bad_bytes = decode_counting(raw)
            report.replaced_invalid_utf8(str(path), bad_bytes)
            yield from _json_list_records(path, text, report, what)
            return
    yield from _jsonl_records(path, report)
