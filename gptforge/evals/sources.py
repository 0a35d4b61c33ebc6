"""Reading evaluation data: the task-level helpers over the shared reader layer (gptforge.data.readers).

Files (.jsonl/.json/.parquet) and `hf:NAME[:CONFIG]` hub datasets are read by `read_records`, so evaluation
data follows the same policy as `gptforge prepare` and SFT data: a malformed line is named by file and line,
skipped and counted (one bad line in 10,000 should not cost a whole evaluation run), while a missing, empty or
unreadable file, or a file with no usable item, stops at once with a one-line UserError before any model time
is spent.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from ..data.readers import HF_PREFIX, ReadReport, parse_hf_spec, read_records

log = logging.getLogger("gptforge.evals")

T = TypeVar("T")

__all__ = ["HF_PREFIX", "Skipped", "hub_rows", "iter_file_records", "load_records", "new_skipped"]

#: What a task skipped while reading (count, first few `where: why; skipped`); the reader's report.
Skipped = ReadReport


def new_skipped() -> Skipped:
    """An empty report that also logs each kept example as a warning (the evals show them as they happen)."""
    return ReadReport(log=log)


def iter_file_records(path: Path, what: str, skipped: Skipped) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) for each JSON object of a .jsonl/.json file or row of a .parquet file."""
    return read_records(path, skipped, what=what)


def hub_rows(spec: str, split: str, what: str, skipped: Skipped,
             default_config: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) of a hub split, `hf:NAME[:CONFIG]` (loaded whole, not streamed: eval sets are small, and a
    missing split then fails before any model time is spent)."""
    name, config = parse_hf_spec(spec)
    spec = f"{HF_PREFIX}{name}:{config or default_config}" if (config or default_config) else spec
    return read_records(spec, skipped, hf_split=split, hf_streaming=False, what=what)


def load_records(spec: str, task: str, hub_split: str, parse_record: Callable[[dict[str, Any], str], T],
                 limit: int | None, expected: str) -> tuple[list[T], Skipped, str]:
    """Parse items from a local jsonl/json/parquet file or `hf:NAME[:CONFIG]`; a malformed record is skipped
    and reported with where it was; no usable item at all is a UserError saying what a line should hold."""
    skipped = new_skipped()
    if spec.startswith(HF_PREFIX):
        records = hub_rows(spec, hub_split, f"{task} --data", skipped)
    else:
        records = iter_file_records(Path(spec), f"{task} data file", skipped)
    items: list[T] = []
    for where, record in records:
        if limit is not None and len(items) >= limit:
            break
        try:
            items.append(parse_record(record, where))
        except ValueError as e:
            skipped.add(where, str(e))
    if not items:
        raise skipped.nothing_usable(f"{task} data {spec}", expected)
    return items, skipped, spec
