"""Tokenize sources into train/val token shards with many processes, in flat memory, all or nothing.

The main process streams document pieces (gptforge.data.sources), assigns each to train or val
(gptforge.data.split: a seeded hash per piece, or the last fraction of the text for a corpus of few
documents), groups them into tasks of about half a million characters and keeps only a small window of tasks in
flight; worker processes tokenize them; results come back in order and are appended to shards of at most
`shard_tokens` tokens. Memory therefore depends on the window, not on the corpus.

The output directory is built under a temporary name and renamed into place only when complete (manifest
last), so an interrupted run leaves nothing a later run could mistake for prepared data, and `force`
replaces an existing directory only once the new one is whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np

from .._version import __version__
from ..atomic import TMP_PREFIX, atomic_directory, write_text
from ..errors import UserError
from ..layout import MANIFEST_FILE, TOKENIZER_DIR, data_lock_file
from ..runlock import DirectoryLock
from .shards import ShardWriter, dtype_for_vocab
from .sources import DocumentReader, Source, SourceStats, resolve_sources
from .split import SplitPlan, split_of  # noqa: F401  (split_of: chat_prepare draws conversations with it)
from .workers import WorkerPool

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

MANIFEST_FORMAT = "gptforge-prepared"
MANIFEST_VERSION = 1
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_VAL_FRACTION = 0.05
TASK_CHARS = 1 << 19
TOKENIZER_FORMS = "gpt2, char, bpe:VOCAB_SIZE or a saved tokenizer directory"


# ------------------------------------------------------------------------------------------- tokenizer


def build_tokenizer(spec: str, sources: list[Source], glob: str | None = None,
                    text_field: str = "text") -> "Tokenizer":
    """The tokenizer `spec` names; `char` and `bpe:N` are trained by a first streaming pass over the sources."""
    from ..tokenizer import CharTokenizer, get_tokenizer, train_bpe

    spec = str(spec)
    if spec == "char":
        return CharTokenizer.train(DocumentReader(sources, glob, text_field).documents())
    if spec.startswith("bpe:") or spec == "bpe":
        size = spec[4:]
        if not size.isdigit():
            raise UserError(f"--tokenizer {spec}: write bpe:VOCAB_SIZE, e.g. bpe:16384")
        from ..numeric import VOCAB_SIZE
        vocab_size = VOCAB_SIZE.parse(size, f"--tokenizer {spec}")  # before a pass over the corpus
        return train_bpe(DocumentReader(sources, glob, text_field).documents(), vocab_size)
    if spec == "gpt2" or Path(spec).is_dir():
        return get_tokenizer(spec)
    raise UserError(f"--tokenizer {spec}: not {TOKENIZER_FORMS} (no such directory)")


# ------------------------------------------------------------------------------------------- workers

_worker_tokenizer: "Tokenizer | None" = None


def _init_worker(tokenizer_dir: str) -> None:
    """Load the saved tokenizer once per worker (signals: see gptforge.data.workers)."""
    global _worker_tokenizer
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ..tokenizer import load_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_dir)


Task = list[tuple[str, int, bool]]  # (text, split, ends a document)


def encode_task(task: Task, tokenizer: "Tokenizer | None" = None) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of a task's pieces for (train, val), end-of-text after each document's last piece."""
    tokenizer = tokenizer or _worker_tokenizer
    assert tokenizer is not None, "worker not initialised"
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    eot = tokenizer.eot_id
    parts: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    end_of_text = np.array([eot], dtype=dtype)
    for text, split, last in task:
        parts[split].append(tokenizer.encode_ordinary_array(text).astype(dtype, copy=False))
        if last:
            parts[split].append(end_of_text)
    return tuple(np.concatenate(p) if p else np.zeros(0, dtype) for p in parts)  # type: ignore[return-value]


def _tasks(units: Iterable[tuple[str, int, bool]], task_chars: int = TASK_CHARS) -> Iterator[Task]:
    task: Task = []
    size = 0
    for text, split, last in units:
        task.append((text, split, last))
        size += len(text)
        if size >= task_chars:
            yield task
            task, size = [], 0
    if task:
        yield task


class EncoderPool:
    """Worker processes that run encode_task, results in order, at most 2 tasks per worker in flight
    (gptforge.data.workers: stops promptly on any signal and leaves no process behind).

    Created before any thread is started here (tqdm's monitor), so forking is safe; workers == 1 encodes
    in this process.
    """

    def __init__(self, workers: int, tokenizer: "Tokenizer", tokenizer_dir: Path) -> None:
        self.tokenizer = tokenizer
        self.pool: WorkerPool | None = None
        if workers > 1:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # HF tokenizers and fork: see their docs
            self.pool = WorkerPool(workers, encode_task, _init_worker, (str(tokenizer_dir),),
                                   what="tokenizer worker")

    def map(self, tasks: Iterable[Task]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if self.pool is None:
            return (encode_task(task, self.tokenizer) for task in tasks)
        return self.pool.map(tasks)

    def __enter__(self) -> "EncoderPool":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.close()


# ------------------------------------------------------------------------------------------- progress


class Progress:
    """A tqdm bar over input bytes (rate and ETA) with tokens/s beside it; silent when disabled."""

    def __init__(self, total_bytes: int | None, enabled: bool) -> None:
        self.bar = None
        self.start = time.monotonic()
        self.tokens = 0
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="prepare",
                            file=sys.stderr, dynamic_ncols=True, smoothing=0.1)

    def update(self, done_bytes: int, tokens: int) -> None:
        self.tokens += tokens
        if self.bar is None:
            return
        self.bar.update(max(0, done_bytes - self.bar.n))
        elapsed = max(time.monotonic() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens / elapsed / 1e3:,.0f}k tok/s, {self.tokens:,} tokens", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _total_bytes(sources: list[Source]) -> int | None:
    if any(s.kind == "hf" for s in sources):
        return None
    return sum(p.stat().st_size for s in sources for p in s.files)


# ------------------------------------------------------------------------------------------- prepare


@dataclass
class _SplitWriters:
    train: ShardWriter
    val: ShardWriter

    def __getitem__(self, split: int) -> ShardWriter:
        return self.val if split else self.train


def _check_out_dir(out_dir: Path, force: bool) -> bool:
    """Whether an existing out_dir may be replaced; refuse a non-empty one unless forced, and one that no
    rename can replace."""
    if not out_dir.exists():
        return False
    if not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; choose a directory path")
    _check_same_filesystem(out_dir)
    if any(out_dir.iterdir()) and not force:
        raise UserError(f"--out {out_dir} is not empty; choose a new directory or pass --force to replace it")
    return True


def _check_same_filesystem(out_dir: Path) -> None:
    """Refuse an existing `out_dir` on another filesystem than its parent (a mount point, typically).

    The data is built in a temporary directory beside `out_dir`, on the parent's filesystem, and renamed
    over `out_dir` at the end; that rename fails across a filesystem boundary (EXDEV, or EBUSY for a mount
    point), which would throw the whole tokenization away. A subdirectory of the mount has no such boundary."""
    absolute = Path(os.path.abspath(out_dir))
    try:
        crosses = os.path.ismount(absolute) or os.stat(absolute).st_dev != os.stat(absolute.parent).st_dev
    except OSError:
        return  # unreadable: the lock and the temporary directory report it in their own words
    if crosses:
        raise UserError(f"--out {out_dir} is a mount point (or on another filesystem than {absolute.parent}), and "
                        "prepare replaces its output by renaming a finished directory into place, which cannot "
                        f"cross filesystems; pass a subdirectory, e.g. --out {out_dir / 'data'}")


def remove_stale_temporaries(out_dir: Path) -> list[str]:
    """Delete the temporary directories a killed prepare into `out_dir` left beside it; return their names.

    Call only while holding `out_dir`'s lock: every prepare into `out_dir` holds it while its temporary
    exists, so any temporary of `out_dir` found then belongs to a process that is gone (SIGKILL, power
    loss). The `.old` directory of an interrupted replace holds the previous data; it goes only when
    `out_dir` itself exists again (the replace had finished), so no data is deleted that is not replaced.
    """
    parent = out_dir.parent
    if not parent.is_dir():
        return []
    ours = re.compile(rf"^{re.escape(TMP_PREFIX + out_dir.name)}\.(old\.)?[a-z0-9_]{{8}}$")
    removed = []
    for child in parent.iterdir():
        match = ours.match(child.name)
        if not match or not child.is_dir() or child.is_symlink():
            continue
        if match.group(1) and not out_dir.is_dir():
            continue
        shutil.rmtree(child, ignore_errors=True)
        removed.append(child.name)
    return sorted(removed)


@contextlib.contextmanager
def prepared_output(out_dir: Path, force: bool) -> Iterator[Path]:
    """Own `out_dir` for one prepare: lock it (a second prepare into it fails in one line naming this PID),
    clear temporaries of killed runs, check it may be written, and yield a temporary directory that becomes
    `out_dir` only when the block completes (an error or a signal leaves `out_dir` as it was)."""
    lock = DirectoryLock(out_dir.parent, what="prepared-data directory", option="--out",
                         lock_name=data_lock_file(out_dir).name, shown=out_dir, remove_on_release=True)
    with lock:
        removed = remove_stale_temporaries(out_dir)
        if removed:
            print(f"gptforge prepare: removed {len(removed)} temporary director(ies) left by an interrupted "
                  f"prepare into {out_dir}", file=sys.stderr)
        replace = _check_out_dir(out_dir, force)
        with atomic_directory(out_dir, overwrite=replace) as tmp:
            yield tmp


def prepare(sources: list[str], tokenizer_spec: str, out_dir: str | os.PathLike, *, glob: str | None = None,
            text_field: str = "text", val_fraction: float = DEFAULT_VAL_FRACTION, workers: int | None = None,
            seed: int = 0, force: bool = False, shard_tokens: int = DEFAULT_SHARD_TOKENS,
            progress: bool = False) -> dict[str, Any]:
    """Tokenize `sources` into `out_dir` (shards, tokenizer/, manifest.json); return the manifest.

    `workers` defaults to the CPU count; 1 tokenizes in this process. See the module docstring for the
    memory and atomicity guarantees.
    """
    out_dir = Path(out_dir)
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction {val_fraction}: must be at least 0 and below 1 (e.g. 0.05)")
    if shard_tokens < 1:
        raise UserError(f"shard_tokens {shard_tokens}: must be positive")
    workers = workers if workers is not None else (os.cpu_count() or 1)
    if workers < 1:
        raise UserError(f"--workers {workers}: must be at least 1")
    _check_out_dir(out_dir, force)  # fail before any work; prepared_output checks again, locked
    resolved = resolve_sources(sources, glob)
    started = time.monotonic()

    with prepared_output(out_dir, force) as tmp:
        tokenizer = build_tokenizer(tokenizer_spec, resolved, glob, text_field)
        tokenizer_dir = tmp / TOKENIZER_DIR
        tokenizer.save(tokenizer_dir)
        dtype = dtype_for_vocab(tokenizer.vocab_size)
        writers = _SplitWriters(ShardWriter(tmp, "train", dtype, shard_tokens),
                                ShardWriter(tmp, "val", dtype, shard_tokens))
        reader = DocumentReader(resolved, glob, text_field)
        plan = SplitPlan(seed, val_fraction)
        tasks = _tasks(plan.assign(reader.pieces()), TASK_CHARS)
        with EncoderPool(workers, tokenizer, tokenizer_dir) as pool:
            bar = Progress(_total_bytes(resolved), progress)
            try:
                for train_tokens, val_tokens in pool.map(tasks):
                    writers.train.write(train_tokens)
                    writers.val.write(val_tokens)
                    bar.update(reader.stats.bytes_read(), train_tokens.size + val_tokens.size)
            finally:
                bar.close()
        shards = {name: getattr(writers, name).close() for name in SPLITS}
        max_ids = {**writers.train.max_ids, **writers.val.max_ids}
        if not shards["train"]:
            raise UserError(f"sources {' '.join(sources)}: every document went to the val split; "
                            "lower --val-fraction or add documents")
        manifest = _manifest(sources, tokenizer_spec, tokenizer, dtype, shards, max_ids, reader.stats, plan,
                             shard_tokens, glob, text_field, time.monotonic() - started)
        write_text(tmp / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    return manifest


def _manifest(sources: list[str], tokenizer_spec: str, tokenizer: "Tokenizer", dtype: np.dtype,
              shards: dict[str, list[tuple[str, int]]], max_ids: dict[str, int], stats: SourceStats,
              plan: SplitPlan, shard_tokens: int, glob: str | None, text_field: str,
              seconds: float) -> dict[str, Any]:
    val_fraction, seed = plan.val_fraction, plan.seed
    splits = {name: {"tokens": sum(n for _, n in files),
                     "shards": [{"file": f, "tokens": n, "max_id": max_ids[f]} for f, n in files]}
              for name, files in shards.items()}
    warnings = []
    if val_fraction > 0 and not splits["val"]["tokens"]:
        warnings.append(f"the val split is empty: no document piece was drawn at --val-fraction {val_fraction}")
    counts = stats.to_dict()
    if counts["skipped_binary_files"]:
        warnings.append(f"skipped {counts['skipped_binary_files']} binary file(s) (NUL bytes)")
    if counts["invalid_utf8_replacements"]:
        warnings.append(f"replaced {counts['invalid_utf8_replacements']} invalid UTF-8 sequence(s) in "
                        f"{counts['invalid_utf8_files']} file(s) (first: {counts['invalid_utf8_examples'][0]})")
    if counts["lone_surrogates"]:
        warnings.append(f"replaced {counts['lone_surrogates']} lone surrogate(s) by U+FFFD "
                        f"(first: {counts['lone_surrogate_examples'][0]})")
    if counts["skipped_records"]:
        warnings.append(f"skipped {counts['skipped_records']} malformed record(s) "
                        f"(first: {counts['skipped_record_examples'][0]})")
    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "gptforge_version": __version__,
        "tokenizer": {"spec": str(tokenizer_spec), "kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
                      "eot_id": tokenizer.eot_id, "dir": TOKENIZER_DIR},
        "dtype": dtype.name,
        "splits": splits,
        "counts": {"tokens": sum(s["tokens"] for s in splits.values()), **counts},
        "sources": [str(s) for s in sources],
        "glob": glob,
        "text_field": text_field,
        "val_fraction": val_fraction,
        "seed": seed,
        "split": plan.describe(),
        "shard_tokens": shard_tokens,
        "seconds": round(seconds, 3),
        "warnings": warnings,
    }


def read_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a prepared directory, or a UserError saying how to get one."""
    path = Path(data_dir) / MANIFEST_FILE
    if not path.is_file():
        raise UserError(f"{data_dir} has no {MANIFEST_FILE}; it is not (completely) prepared — run gptforge prepare")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); prepare the data again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{path} is not a gptforge prepared-data manifest; prepare the data again")
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise UserError(f"{path} has format version {manifest.get('format_version')}, this gptforge reads "
                        f"{MANIFEST_VERSION}; prepare the data again")
    return manifest


def summary(manifest: dict[str, Any], out_dir: str | os.PathLike) -> str:
    """A few lines for the user: where the data is, how much, and anything skipped or replaced."""
    counts, splits, tok = manifest["counts"], manifest["splits"], manifest["tokenizer"]
    lines = [f"prepared {out_dir}: {counts['documents']:,} documents, {counts['bytes']:,} bytes -> "
             f"{splits['train']['tokens']:,} train + {splits['val']['tokens']:,} val tokens "
             f"({tok['kind']} tokenizer, vocab {tok['vocab_size']:,}, {manifest['dtype']}) in {manifest['seconds']:.1f} s"]
    if manifest.get("split", {}).get("method") == "tail":
        lines.append(f"val split: {manifest['split']['detail']}")
    lines += [f"warning: {w}" for w in manifest["warnings"]]
    return "\n".join(lines)
