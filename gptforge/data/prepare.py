"""Tokenize sources into train/val token shards with many processes, in flat memory, all or nothing.

The main process streams document pieces (gptforge.data.sources), assigns each to train or val
(gptforge.data.split: a seeded hash per piece, or the last fraction of the text for one text file or a
corpus of few documents), groups them into tasks of about half a million characters and keeps only a small
window of tasks in flight; worker processes tokenize them; results come back in order and are appended to
shards of at most `shard_tokens` tokens. Memory therefore depends on the window, not on the corpus.

The output directory is built under a temporary name and renamed into place only when complete (manifest
last), so an interrupted run leaves nothing a later run could mistake for prepared data, and `force`
replaces an existing directory only once the new one is whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np

from .._version import __version__
from ..atomic import write_text
from ..errors import UserError
from ..layout import MANIFEST_FILE, TOKENIZER_DIR
from ..outputs import PREPARED_DATA, Inputs, check_output, owned_output
from .readers import repair_warnings
from .shards import ShardWriter, dtype_for_vocab
from .sources import DocumentReader, Source, SourceStats, resolve_sources, single_document_chars
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


@contextlib.contextmanager
def prepared_output(out_dir: Path, force: bool, inputs: Inputs | None = None) -> Iterator[Path]:
    """Own `out_dir` for one prepare (`gptforge.outputs.owned_output`): one prepare at a time, temporaries of
    killed runs cleared, prepared data replaced only with `force` and never anything else, and a temporary
    directory that becomes `out_dir` only when the block completes."""
    with owned_output(out_dir, PREPARED_DATA, replace=force, inputs=inputs, command="prepare") as tmp:
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
    inputs = {"SOURCE": sources, "--tokenizer": tokenizer_spec}
    check_output(out_dir, PREPARED_DATA, replace=force, inputs=inputs)  # before any work; checked again, locked
    resolved = resolve_sources(sources, glob)
    started = time.monotonic()

    with prepared_output(out_dir, force, inputs) as tmp:
        tokenizer = build_tokenizer(tokenizer_spec, resolved, glob, text_field)
        tokenizer_dir = tmp / TOKENIZER_DIR
        tokenizer.save(tokenizer_dir)
        dtype = dtype_for_vocab(tokenizer.vocab_size)
        writers = _SplitWriters(ShardWriter(tmp, "train", dtype, shard_tokens),
                                ShardWriter(tmp, "val", dtype, shard_tokens))
        reader = DocumentReader(resolved, glob, text_field)
        plan = SplitPlan(seed, val_fraction, single_document_chars(resolved))
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
    warnings += repair_warnings(counts["invalid_utf8_replacements"], counts["invalid_utf8_examples"],
                                counts["lone_surrogates"], counts["lone_surrogate_examples"],
                                files=counts["invalid_utf8_files"])
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
             f"({tok['kind']} tokenizer, vocab {tok['vocab_size']:,}, {manifest['dtype']}) "
             f"in {manifest['seconds']:.1f} s"]
    if manifest.get("split"):
        lines.append(f"val split: {manifest['split']['detail']}")
    lines += [f"warning: {w}" for w in manifest["warnings"]]
    return "\n".join(lines)
