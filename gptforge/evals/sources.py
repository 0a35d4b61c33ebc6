"""Reading evaluation data: local jsonl/json/parquet/csv files and Hugging Face hub datasets.

Every task parser goes through here so that bad input is reported the same way everywhere: a malformed
line is named by file and line number, skipped and counted (one bad line in 10,000 should not cost a
whole evaluation run), while a missing file, an empty file or a file with no usable item stops at once
with a one-line UserError before any model time is spent.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from ..errors import UserError

log = logging.getLogger("gptforge.evals")

HF_PREFIX = "hf:"
T = TypeVar("T")
MAX_REPORTED_PROBLEMS = 5


@dataclass
class Skipped:
    """Items dropped while reading, with the first few reasons (file:line: what is wrong)."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, where: str, why: str) -> None:
        self.count += 1
        message = f"{where}: {why}; skipped"
        if len(self.examples) < MAX_REPORTED_PROBLEMS:  # say where at once, without flooding the terminal
            self.examples.append(message)
            log.warning("%s", message)


def require_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise UserError(f"{what} {path} does not exist; check the --data path")
    if not path.is_file():
        raise UserError(f"{what} {path} is not a file; pass the file itself to --data")
    if path.stat().st_size == 0:
        raise UserError(f"{what} {path} is empty; pass a file with at least one item")
    return path


def iter_json_records(path: Path, what: str, skipped: Skipped) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location, record) for each JSON object in a .jsonl file (one per line) or a .json list of objects."""
    require_file(path, what)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text ({e}); pass a jsonl file") from None
    stripped = text.lstrip()
    if path.suffix == ".json" and stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{what} {path}: invalid JSON at line {e.lineno} ({e.msg}); fix or convert to jsonl") \
                from None
        for n, record in enumerate(records):
            if isinstance(record, dict):
                yield f"{path} item {n}", record
            else:
                skipped.add(f"{path} item {n}", "not a JSON object")
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            skipped.add(where, f"not valid JSON ({e.msg})")
            continue
        if not isinstance(record, dict):
            skipped.add(where, "not a JSON object")
            continue
        yield where, record


def load_hub(name: str, config: str | None, split: str, what: str) -> list[dict[str, Any]]:
    """Rows of a Hugging Face hub dataset split (needs `datasets` and the network, or a warm HF cache)."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"{what}: reading hub dataset {name} needs the `datasets` package "
                        "(pip install 'gptforge[data]'), or pass a local file with --data") from None
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown name, missing split: the hub raises many types
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{what}: could not load hub dataset {name}"
                        f"{'/' + config if config else ''} split {split} ({first_line}); "
                        "check the name and network, or pass a local file with --data") from None
    return [dict(row) for row in dataset]


def hub_name(spec: str) -> tuple[str, str | None]:
    """`hf:owner/name` or `hf:owner/name:config` -> (name, config)."""
    body = spec[len(HF_PREFIX):]
    name, _, config = body.partition(":")
    if not name:
        raise UserError(f"--data {spec}: expected hf:OWNER/NAME[:CONFIG]")
    return name, config or None


def read_parquet_rows(path: Path, what: str) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{what} {path}: reading parquet needs pyarrow (pip install 'gptforge[data]')") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
        raise UserError(f"{what} {path} is not a readable parquet file ({e})") from None


def load_records(spec: str, task: str, hub_split: str, parse_record: Callable[[dict[str, Any], str], T],
                 limit: int | None, expected: str) -> tuple[list[T], Skipped, str]:
    """Parse items from a local jsonl/json file or `hf:NAME[:CONFIG]`; a malformed record is skipped and
    reported with where it was; no usable item at all is a UserError saying what a line should hold."""
    skipped = Skipped()
    if spec.startswith(HF_PREFIX):
        name, config = hub_name(spec)
        records: Iterable[tuple[str, dict[str, Any]]] = (
            (f"{name} row {n}", r) for n, r in enumerate(load_hub(name, config, hub_split, f"{task} --data")))
    else:
        records = iter_json_records(Path(spec), f"{task} data file", skipped)
    items: list[T] = []
    for where, record in records:
        if limit is not None and len(items) >= limit:
            break
        try:
            items.append(parse_record(record, where))
        except ValueError as e:
            skipped.add(where, str(e))
    if not items:
        raise UserError(f"{task} data {spec}: no usable items ({skipped.count} skipped"
                        f"{': ' + skipped.examples[0] if skipped.examples else ''}); {expected}")
    return items, skipped, spec

