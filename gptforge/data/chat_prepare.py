"""`gptforge prepare --chat`: conversations -> token shards, loss-mask shards and conversation lengths.

Each record of a JSONL / Parquet / `hf:` source (or `builtin:pystdlib-qa`) is read as one conversation in
one of the formats of `gptforge.data.chat_formats`, checked, rendered in ChatML and encoded by
`gptforge.chat.tokens.encode_chat` (ids plus a mask that is 1 on what the assistant wrote). Bad records are
counted, reported with their line numbers and skipped; a source with no usable conversation is an error.

Conversations are stored whole and in order: per split, token shards (`train_000000.bin`), mask shards of
exactly the same sizes (`train_mask_000000.bin`, uint8), and for every conversation its token count and the
position of its first trained token (`train_conversations.npy`). Packing them into rows happens in the
loader (`gptforge.data.chat_loader`), for the run's own sequence length and afresh every epoch; `prepare`
reports what packing at `context` gives (rows, padding, conversations truncated or dropped), so a starved
packer is visible before training.

The directory is written atomically (as `gptforge prepare`'s), with the tokenizer the ids belong to: the
base model's tokenizer plus the two chat markers.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import __version__
from ..atomic import write_text
from ..errors import UserError
from ..layout import (CHAT_DATA_KIND, MANIFEST_FILE, RUN_CONFIG_FILE, TOKENIZER_DIR, chat_index_file,
                      chat_mask_prefix)
from ..outputs import PREPARED_DATA, check_output
from .chat_formats import FORMATS, BadRecord, Messages, detect_format, to_messages
from .chat_packing import pack_report
from .readers import ReadReport, is_record_file, read_records, repair_warnings
from .prepare import (DEFAULT_SHARD_TOKENS, DEFAULT_VAL_FRACTION, MANIFEST_FORMAT, MANIFEST_VERSION, SPLITS,
                      prepared_output, split_of)
from .shards import ShardWriter, dtype_for_vocab
from .workers import WorkerPool

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer
    from .sources import Source

DEFAULT_CONTEXT = 1024
SAMPLE_PROMPTS = 3  # conversations whose first question training answers in samples.txt (val ones first)
CHUNK = 256  # conversations per worker task


@dataclass
class RecordStats:
    """Records read, usable conversations, formats by source; what was skipped is in `report` (where: why)."""

    report: ReadReport = field(default_factory=ReadReport)
    conversations: int = 0
    formats: dict[str, str] = field(default_factory=dict)

    @property
    def bad(self) -> int:
        return self.report.count

    @property
    def records(self) -> int:
        return self.conversations + self.bad


# ------------------------------------------------------------------------------------------- sources


def check_chat_source(spec: str) -> "Source":
    """Resolve one chat source up front (a typo fails before anything is read): record files, hf: or the
    built-in question/answer set."""
    from .pystdlib_qa import SOURCE as QA_SOURCE
    from .sources import Source, resolve_source

    if spec == QA_SOURCE:
        return Source(spec, "chat-builtin")
    source = resolve_source(spec)
    if source.kind == "hf":
        return source
    files = tuple(p for p in source.files if is_record_file(p))
    if not files:
        raise UserError(f"source {spec}: chat data must be .jsonl, .json, .parquet, hf:NAME or {QA_SOURCE} "
                        "(one conversation per record)")
    return Source(spec, source.kind, files)


def iter_records(spec: str, report: ReadReport) -> Iterator[tuple[str, Any]]:
    """(where, record) of every record of one chat source, through `gptforge.data.readers` (malformed
    lines are skipped and counted in `report` there)."""
    from .pystdlib_qa import qa_records

    source = check_chat_source(spec)
    if source.kind == "chat-builtin":
        for number, record in enumerate(qa_records(), 1):
            yield f"{spec} record {number}", record
        return
    if source.kind == "hf":
        yield from read_records(spec, report, what="chat source")
        return
    for path in source.files:
        yield from read_records(path, report, what="chat source")


def read_conversations(sources: list[str], fmt: str | None, stats: RecordStats) -> Iterator[Messages]:
    """The usable conversations of `sources`, in order; bad records go to `stats.report`. `fmt` None: each
    source takes the format of its first record that has one."""
    if fmt is not None and fmt not in FORMATS:
        raise UserError(f"--chat-format {fmt}: expected one of {', '.join(FORMATS)} (or leave it out to detect)")
    report = stats.report
    for spec in sources:
        source_fmt = fmt
        before, skipped = stats.conversations, report.count
        for where, record in iter_records(spec, report):
            if source_fmt is None:
                source_fmt = detect_format(record)
                if source_fmt is None:
                    report.add(where, f"no known conversation format (keys: {', '.join(sorted(record))}); "
                               f"expected one of {', '.join(FORMATS)}")
                    continue
                stats.formats[spec] = source_fmt
            try:
                messages = to_messages(record, source_fmt)
            except BadRecord as e:
                report.add(where, str(e))
                continue
            stats.conversations += 1
            yield messages
        if stats.conversations == before:
            first = report.examples[0].removesuffix("; skipped") if report.count > skipped and report.examples else None
            what = (f"{report.count - skipped} bad record(s) skipped" + (f", first: {first}" if first else "")
                    if report.count > skipped else "it has no records")
            raise UserError(f"source {spec}: no usable conversation ({what}); fix the records or force the "
                            "format with --chat-format")


# ------------------------------------------------------------------------------------------- tokenizer


def chat_tokenizer(spec: str) -> tuple["Tokenizer", int | None]:
    """The tokenizer named by `spec`, with the chat markers added, and the base model's context when `spec`
    names a model.

    `spec` is what `gptforge sft --model` takes (a run directory, a checkpoint directory such as
    RUN/checkpoints/step_N, a Hugging Face directory), its tokenizer found as `load_model` finds it, so the
    `--tokenizer BASE` that sft's errors suggest is always accepted and gives the tokenizer sft checks the data
    against; or a tokenizer directory, or gpt2. `char`, `bpe` and `bpe:N` (only as such, not a directory that
    happens to be named bpe8k/) are refused: they train a new tokenizer, and chat data must use the base's."""
    from ..chat.tokens import add_chat_tokens
    from ..tokenizer import get_tokenizer

    spec = str(spec)
    path = Path(spec)
    if path.is_dir() and _is_model_dir(path):
        tokenizer, context = _model_tokenizer(spec, path)
    elif not path.is_dir() and (spec in ("char", "bpe") or spec.startswith("bpe:")):
        raise UserError(f"--tokenizer {spec}: chat data is tokenized with the base model's tokenizer; pass the "
                        "base run (--tokenizer runs/NAME), its tokenizer directory, or gpt2")
    else:
        tokenizer, context = get_tokenizer(spec), None
    return add_chat_tokens(tokenizer), context


def _is_model_dir(path: Path) -> bool:
    """A directory `--model` accepts: a run (its config.json, checkpoints or not yet), a checkpoint, or an HF
    model directory (config.json too); a tokenizer directory has none of these."""
    from ..layout import CHECKPOINTS_DIR, WEIGHTS_FILE, is_sharded_checkpoint

    return ((path / RUN_CONFIG_FILE).is_file() or (path / CHECKPOINTS_DIR).is_dir()
            or (path / WEIGHTS_FILE).is_file() or is_sharded_checkpoint(path))


def _model_tokenizer(spec: str, path: Path) -> tuple["Tokenizer", int | None]:
    """(tokenizer, context) of the model directory `path`: an HF directory's own tokenizer files and
    n_positions; otherwise `loading.find_tokenizer_dir` (path/tokenizer, or the run's for RUN/checkpoints/
    step_N) and the run's seq_len (else the checkpoint's block size)."""
    from ..layout import CHECKPOINTS_DIR, WEIGHTS_FILE
    from ..loading import is_hf_dir, find_tokenizer_dir  # load_model's own tests, so both agree
    from ..tokenizer import load_tokenizer

    if is_hf_dir(path):
        from ..interop.hf import hf_model_config
        from ..interop.hf_tokenizer import read_hf_tokenizer

        tokenizer = read_hf_tokenizer(path)
        if tokenizer is None:
            raise UserError(f"--tokenizer {spec}: gptforge cannot reproduce this Hugging Face model's tokenizer "
                            "(only GPT-2's vocabulary and gptforge's own exports), so it cannot be fine-tuned into "
                            "a chat model; use a model with GPT-2's tokenizer")
        return tokenizer, hf_model_config(path).block_size
    found = find_tokenizer_dir(path)
    if found is None:
        raise UserError(f"--tokenizer {spec}: no {TOKENIZER_DIR}/ saved with this model; pass the run it was "
                        f"trained in, its {TOKENIZER_DIR} directory, or gpt2")
    run_dir = path.resolve().parent.parent if path.resolve().parent.name == CHECKPOINTS_DIR else path
    context = _run_context(run_dir / RUN_CONFIG_FILE)
    if context is None and (path / WEIGHTS_FILE).is_file():
        from ..weights import read_config

        context = read_config(path / WEIGHTS_FILE).block_size
    return load_tokenizer(found), context


def _run_context(config_file: Path) -> int | None:
    """The sequence length a run trained at (its model's context when unset); None when unknown."""
    try:
        config = json.loads(config_file.read_text())
        return config["train"].get("seq_len") or config["model"]["block_size"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


# ------------------------------------------------------------------------------------------- encoding

_worker_tokenizer: "Tokenizer | None" = None


def _init_worker(tokenizer_dir: str) -> None:
    """Load the saved tokenizer once per worker (signals: see gptforge.data.workers)."""
    global _worker_tokenizer
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ..tokenizer import load_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_dir)


def encode_conversations(conversations: list[Messages], tokenizer: "Tokenizer | None" = None
                         ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, mask) of each conversation (ids in the shard dtype)."""
    from ..chat.tokens import encode_chats

    tokenizer = tokenizer or _worker_tokenizer
    assert tokenizer is not None, "worker not initialised"
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    return [(np.asarray(ids, dtype=dtype), mask) for ids, mask in encode_chats(tokenizer, conversations)]


def sample_prompt(messages: Messages) -> dict[str, Any]:
    """The conversation up to its first reply (what a model is asked) and that reply (the reference)."""
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return {"messages": messages[:first], "reference": messages[first]["content"]}


def _chunks(items: Iterable[Messages], size: int) -> Iterator[list[Messages]]:
    chunk: list[Messages] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _encoded(chunks: Iterator[list[Messages]], tokenizer: "Tokenizer", tokenizer_dir: Path, workers: int
             ) -> Iterator[tuple[list[Messages], list[tuple[np.ndarray, np.ndarray]]]]:
    """(chunk, encode_conversations(chunk)) in order, encoded in `workers` processes (1: this one)."""
    if workers <= 1:
        for chunk in chunks:
            yield chunk, encode_conversations(chunk, tokenizer)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with WorkerPool(workers, encode_conversations, _init_worker, (str(tokenizer_dir),),
                    what="tokenizer worker") as pool:
        pending: collections.deque = collections.deque()  # chunks sent, in order: the pool keeps that order

        def sent(chunks: Iterator[list[Messages]]) -> Iterator[list[Messages]]:
            for chunk in chunks:
                pending.append(chunk)
                yield chunk

        for encoded in pool.map(sent(chunks)):
            yield pending.popleft(), encoded


# ------------------------------------------------------------------------------------------- prepare


class _SplitWriter:
    """Tokens, masks (same shard sizes) and conversation lengths of one split."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.tokens = ShardWriter(directory, split, dtype, shard_tokens)
        self.masks = ShardWriter(directory, chat_mask_prefix(split), np.uint8, shard_tokens)
        self.lengths: list[int] = []
        self.first_trained: list[int] = []
        self.trained = 0
        self._ids: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []

    def add(self, ids: np.ndarray, mask: np.ndarray) -> None:
        self._ids.append(ids)
        self._masks.append(mask)
        self.lengths.append(int(ids.size))
        self.first_trained.append(int(np.argmax(mask)))  # every usable conversation has a trained token
        self.trained += int(mask.sum())

    def flush(self) -> None:
        """Write what `add` collected as one array each (a write per conversation costs more than encoding)."""
        if self._ids:
            self.tokens.write(np.concatenate(self._ids))
            self.masks.write(np.concatenate(self._masks))
            self._ids, self._masks = [], []

    def index(self) -> np.ndarray:
        """(conversations, 2) int64: token count and position of the first trained token of each."""
        return np.stack([np.asarray(self.lengths, dtype=np.int64),
                         np.asarray(self.first_trained, dtype=np.int64)], axis=1).reshape(-1, 2)


def prepare_chat(sources: list[str], tokenizer_spec: str, out_dir: str | os.PathLike, *, fmt: str | None = None,
                 context: int | None = None, val_fraction: float = DEFAULT_VAL_FRACTION, workers: int | None = None,
                 seed: int = 0, force: bool = False, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                 progress: bool = False) -> dict[str, Any]:
    """Read, check, encode and store the conversations of `sources` in `out_dir`; return the manifest.

    `context`: the row length packing is reported for (default: the base run's, else 1024); training packs
    for its own sequence length.
    """
    out_dir = Path(out_dir)
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction {val_fraction}: must be at least 0 and below 1 (e.g. 0.05)")
    if not sources:
        raise UserError("no sources given; name a .jsonl or .parquet file of conversations, hf:NAME or "
                        "builtin:pystdlib-qa")
    workers = workers if workers is not None else 1  # ~1M tokens/s in one process; --workers N for more
    if workers < 1:
        raise UserError(f"--workers {workers}: must be at least 1")
    if context is not None and context < 2:
        raise UserError(f"--context {context}: must be at least 2 tokens")
    for spec in sources:
        check_chat_source(spec)
    inputs = {"SOURCE": sources, "--tokenizer": tokenizer_spec}
    check_output(out_dir, PREPARED_DATA, replace=force, inputs=inputs)  # before the tokenizer work; again, locked
    started = time.monotonic()
    tokenizer, run_context = chat_tokenizer(tokenizer_spec)
    context = context or run_context or DEFAULT_CONTEXT
    stats = RecordStats()
    with prepared_output(out_dir, force, inputs) as tmp:
        tokenizer_dir = tmp / TOKENIZER_DIR
        tokenizer.save(tokenizer_dir)
        dtype = dtype_for_vocab(tokenizer.vocab_size)
        writers = {name: _SplitWriter(tmp, name, dtype, shard_tokens) for name in SPLITS}
        conversations = read_conversations(sources, fmt, stats)
        index = 0
        held_out: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLITS}
        # closing: the workers stop when this block is left, by an error or a signal too
        encoded_chunks = contextlib.closing(_encoded(_chunks(conversations, CHUNK), tokenizer, tokenizer_dir,
                                                     workers))
        with encoded_chunks as chunks:
            for chunk, encoded in chunks:
                for messages, (ids, mask) in zip(chunk, encoded):
                    split = SPLITS[split_of(index, seed, val_fraction)]
                    writers[split].add(ids, mask)
                    if len(held_out[split]) < SAMPLE_PROMPTS:
                        held_out[split].append(sample_prompt(messages))
                    index += 1
                for writer in writers.values():
                    writer.flush()
                if progress:
                    seconds = max(time.monotonic() - started, 1e-9)
                    tokens = sum(sum(w.lengths) for w in writers.values())
                    print(f"\rprepare --chat: {index:,} conversations, {tokens:,} tokens, "
                          f"{tokens / seconds:,.0f} tok/s", end="", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
        if not writers["train"].lengths:
            raise UserError(f"sources {' '.join(sources)}: every conversation went to the val split; lower "
                            "--val-fraction or add conversations")
        splits = {}
        for name, writer in writers.items():
            token_shards, mask_shards = writer.tokens.close(), writer.masks.close()
            index_rows = writer.index()
            np.save(tmp / chat_index_file(name), index_rows, allow_pickle=False)
            splits[name] = {"tokens": int(index_rows[:, 0].sum()), "conversations": len(index_rows),
                            "trained_tokens": writer.trained,
                            "shards": [{"file": f, "tokens": n} for f, n in token_shards],
                            "mask_shards": [{"file": f, "tokens": n} for f, n in mask_shards],
                            "index": chat_index_file(name)}
        train_index = writers["train"].index()
        samples = (held_out["val"] + held_out["train"])[:SAMPLE_PROMPTS]  # held-out first
        manifest = _manifest(sources, tokenizer_spec, tokenizer, dtype, splits, stats, fmt, context, samples,
                             pack_report(train_index[:, 0], train_index[:, 1], context + 1), val_fraction, seed,
                             shard_tokens,
                             time.monotonic() - started)
        write_text(tmp / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    return manifest


def tokenizer_fingerprint(tokenizer: "Tokenizer") -> str:
    """sha256 over the files `tokenizer.save` writes: equal exactly when two tokenizers encode alike (same
    kind, vocabulary, merges, special tokens and template)."""
    import hashlib
    import tempfile

    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix="gptforge-tok-") as tmp:
        saved = tokenizer.save(Path(tmp) / "t")
        for path in sorted(saved.iterdir()):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _manifest(sources: list[str], tokenizer_spec: str, tokenizer: "Tokenizer", dtype: np.dtype,
              splits: dict[str, Any], stats: RecordStats, fmt: str | None, context: int,
              samples: list[dict[str, Any]], packing: dict[str, Any],
              val_fraction: float, seed: int, shard_tokens: int, seconds: float) -> dict[str, Any]:
    warnings = []
    if val_fraction > 0 and not splits["val"]["conversations"]:
        warnings.append(f"the val split is empty: no conversation was drawn at --val-fraction {val_fraction}")
    if stats.bad:
        warnings.append(f"skipped {stats.bad} bad record(s): " + "; ".join(stats.report.examples[:3])
                        + (" ..." if stats.bad > 3 else ""))
    report = stats.report
    warnings += repair_warnings(report.invalid_utf8, report.invalid_utf8_examples, report.lone_surrogates,
                                report.lone_surrogate_examples)
    if packing["truncated"] or packing["dropped"]:
        warnings.append(f"at context {context}: {packing['truncated']} conversation(s) longer than the context "
                        f"will be truncated, {packing['dropped']} dropped (nothing to train on within the context)")
    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "kind": CHAT_DATA_KIND,
        "gptforge_version": __version__,
        "tokenizer": {"spec": str(tokenizer_spec), "kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
                      "eot_id": tokenizer.eot_id, "dir": TOKENIZER_DIR,
                      "fingerprint": tokenizer_fingerprint(tokenizer)},
        "dtype": dtype.name,
        "splits": splits,
        "counts": {"tokens": sum(s["tokens"] for s in splits.values()), "documents": stats.conversations},
        "chat": {"format": fmt or "detect", "formats": stats.formats, "records": stats.records,
                 "conversations": stats.conversations, "bad_records": stats.bad,
                 "bad_examples": stats.report.examples,
                 "context": context, "packing": packing, "sample_prompts": samples},
        "sources": [str(s) for s in sources],
        "val_fraction": val_fraction,
        "seed": seed,
        "shard_tokens": shard_tokens,
        "seconds": round(seconds, 3),
        "warnings": warnings,
    }


def chat_summary(manifest: dict[str, Any], out_dir: str | os.PathLike) -> str:
    """A few lines for the user: counts, what was skipped (with line numbers), packing at the context."""
    chat, splits, tok = manifest["chat"], manifest["splits"], manifest["tokenizer"]
    pack = chat["packing"]
    seconds = max(manifest["seconds"], 1e-9)
    formats = ", ".join(sorted(set(chat["formats"].values()))) or chat["format"]
    lines = [f"prepared chat data {out_dir}: {chat['conversations']:,} conversations ({formats}) -> "
             f"{splits['train']['conversations']:,} train / {splits['val']['conversations']:,} val, "
             f"{manifest['counts']['tokens']:,} tokens ({splits['train']['trained_tokens']:,} train tokens "
             f"trained on), {tok['kind']} tokenizer with chat markers (vocab {tok['vocab_size']:,}) in "
             f"{manifest['seconds']:.1f} s ({manifest['counts']['tokens'] / seconds:,.0f} tok/s)",
             f"packing at context {chat['context']}: {pack['rows']:,} rows, padding {100 * pack['padding']:.1f}%, "
             f"{pack['truncated']} truncated, {pack['dropped']} dropped"]
    if chat["bad_records"]:
        lines.append(f"skipped {chat['bad_records']} bad record(s):")
        lines += [f"  {e}" for e in chat["bad_examples"]]
        if chat["bad_records"] > len(chat["bad_examples"]):
            lines.append(f"  ... and {chat['bad_records'] - len(chat['bad_examples'])} more")
    lines += [f"warning: {w}" for w in manifest["warnings"] if not w.startswith("skipped")]
    return "\n".join(lines)
