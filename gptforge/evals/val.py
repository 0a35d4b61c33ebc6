"""Held-out loss, perplexity and bits-per-byte, on a prepared split or on any text file.

Bits-per-byte is the number to compare across tokenizers: total nats of the scored tokens / ln 2 / the UTF-8
bytes those tokens stand for (counted with `decode_bytes`, so it is exact even when a token ends inside a
character). End-of-text separators in prepared data contribute their nats (predicting a document boundary is
information the model must carry) but no bytes (they are not text).

Striding: the token stream is conditioned on a leading end-of-text token, so the very first token is scored
too. The first window scores `block_size` tokens; each following window scores the next `stride` tokens with
the `block_size - stride` tokens before them as context, so every token is scored exactly once and (after
the first window) with at least `block_size - stride` tokens of context. The default stride is half the
context for text files (the Hugging Face perplexity recipe) and the whole context for prepared splits
(non-overlapping windows).

The trainer's validation loss is this same computation (`score_windows` over the first windows of the val
split, `gptforge.training.validator`), with the context set to the run's seq_len: for a run with seq_len equal to
the model's context, `gptforge eval --task val --limit N --batch-size B` on a checkpoint gives the val_loss the
trainer logged at that step when N and B are its `eval_batches x micro_batch_size` and `micro_batch_size`,
and both ran in the same precision (the trainer evaluates under its training autocast, bf16 where the
hardware has it; `eval` in the loaded dtype). tests/test_training_validator.py checks the two agree to 1e-6.

Chat data (`gptforge prepare --chat`) is scored as SFT validates it, not as a token stream: the val split's
conversations packed into rows of the model's context (seed 0, the validator's), the loss averaged over the
targets the loss mask trains (the assistant's replies and their `<|im_end|>`) and nothing else. Why: that is
the number `gptforge sft` logs as val_loss, so a user comparing the two gets the same number (for a run whose
seq_len is the model's context, with `--limit` rows and `--batch-size` as for plain data), while the loss on
the prompts, which the model was never trained to write, would mix in a number nobody asked for. `--limit`
counts packed rows; `--stride` does not apply (every row is scored whole). The shard list comes from the
manifest (as the loaders read it), never from a glob: a chat directory's `val_mask_000000.bin` matches
`val_*.bin` and would otherwise be read as tokens.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np

from ..data.readers import TEXT_ENCODING
from ..errors import UserError
from ..layout import MANIFEST_FILE as MANIFEST, TOKENIZER_DIR
from .result import TaskResult
from .scoring import Request, score_requests

if TYPE_CHECKING:
    from ..model import GPT
    from ..tokenizer import Tokenizer

WINDOWS_PER_CALL = 64  # windows handed to the scorer at a time: bounds memory on long splits


@dataclass(frozen=True)
class ValSource:
    """A prepared dataset directory (with `split`; `shards` its token shards as the manifest lists them,
    `chat` when it holds conversations with loss masks) or a plain UTF-8 text file."""

    path: Path
    prepared: bool
    split: str = "val"
    shards: tuple[Path, ...] = ()
    chat: bool = False


def resolve_val_source(data: str | None, split: str = "val") -> ValSource:
    """Check `--data` for the val task before any model is loaded."""
    from ..layout import CHAT_DATA_KIND

    if not data:
        raise UserError("the val task needs --data: a prepared dataset directory (with manifest.json) or a text file")
    path = Path(data)
    if not path.exists():
        raise UserError(f"val data {path} does not exist; pass a prepared dataset directory or a text file")
    if path.is_dir():
        if not (path / MANIFEST).is_file():
            raise UserError(f"val data {path} is a directory without {MANIFEST}; pass a directory made by "
                            "`gptforge prepare` or a text file")
        from ..data.prepare import read_manifest

        manifest = read_manifest(path)
        info = manifest.get("splits", {}).get(split) if isinstance(manifest.get("splits"), dict) else None
        entries = info.get("shards") if isinstance(info, dict) else None
        if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("file"), str)
                                                    for e in entries):
            raise UserError(f"val data {path}: {MANIFEST} lists no {split} split; prepare the data again "
                            "(gptforge prepare) or pass a text file")
        if not any(e.get("tokens") for e in entries):
            raise UserError(f"val data {path} has an empty {split} split; prepare it with a validation fraction "
                            "or pass a text file")
        return ValSource(path, True, split, tuple(path / e["file"] for e in entries),
                         manifest.get("kind") == CHAT_DATA_KIND)
    if path.stat().st_size == 0:
        raise UserError(f"val data {path} is empty; pass a text file with something to score")
    return ValSource(path, False, split)


def _check_data_tokenizer(source: ValSource, tokenizer: "Tokenizer") -> None:
    """Refuse data prepared with another kind of tokenizer, or holding ids the model's tokenizer lacks (read
    from the shard headers: no token is read)."""
    from ..data.shards import check_vocab

    manifest_tokenizer = source.path / TOKENIZER_DIR / "tokenizer_config.json"
    if manifest_tokenizer.is_file():
        kind = json.loads(manifest_tokenizer.read_text()).get("kind")
        if kind and kind != tokenizer.kind:
            raise UserError(f"val data {source.path} was prepared with a {kind} tokenizer but the model uses "
                            f"{tokenizer.kind}; prepare the data with the model's tokenizer")
    for shard in source.shards:
        check_vocab(shard, tokenizer.vocab_size, "the model's tokenizer")


def _prepared_tokens(source: ValSource, tokenizer: "Tokenizer") -> np.ndarray:
    from ..data.shards import open_shard

    _check_data_tokenizer(source, tokenizer)
    parts = [np.asarray(open_shard(p)) for p in source.shards]
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if tokens.size and int(tokens.max()) >= tokenizer.vocab_size:
        raise UserError(f"val data {source.path}: token id {int(tokens.max())} is outside the model's tokenizer "
                        f"(vocab {tokenizer.vocab_size}); prepare the data with the model's tokenizer")
    return tokens


def load_val_tokens(source: ValSource, tokenizer: "Tokenizer") -> np.ndarray:
    """The token stream to score (prepared shards as stored; a text file encoded with the model's tokenizer).
    Chat data is not a stream (see the module docstring): `evaluate_chat_val` scores it."""
    if source.chat:
        raise UserError(f"val data {source.path} holds conversations (prepare --chat), which are scored per packed "
                        "row on the assistant's tokens, not as a token stream; use evaluate_chat_val")
    if source.prepared:
        tokens = _prepared_tokens(source, tokenizer)
    else:
        try:
            text = source.path.read_text(encoding=TEXT_ENCODING)
        except UnicodeDecodeError as e:
            raise UserError(f"val data {source.path} is not UTF-8 text ({e}); convert it or pass another file") \
                from None
        tokens = np.asarray(tokenizer.encode(text), dtype=np.int64)
    if tokens.size == 0:
        raise UserError(f"val data {source.path}: nothing to score (0 tokens)")
    return tokens


def windows(n_tokens: int, block_size: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(context_start, score_start, score_end) over a stream of `n_tokens` + 1 (a leading eot at index 0):
    every index 1..n_tokens is scored once, each window's input at most `block_size` long."""
    if not 1 <= stride <= block_size:
        raise UserError(f"--stride must be between 1 and the model's context {block_size}, got {stride}")
    start, end = 1, min(n_tokens, block_size) + 1
    while start < end:
        yield max(0, end - 1 - block_size), start, end
        start, end = end, min(end + stride, n_tokens + 1)


def count_windows(n_tokens: int, block_size: int, stride: int) -> int:
    first = min(n_tokens, block_size)
    return 1 + math.ceil((n_tokens - first) / stride)


def with_eot(tokens: Sequence[int] | np.ndarray, eot_id: int) -> np.ndarray:
    """The stream `windows` indexes: a leading end-of-text token, so the first real token is scored too."""
    return np.concatenate([[eot_id], np.asarray(tokens, dtype=np.int64)])


def score_windows(model: "GPT", stream: np.ndarray, spans: Iterable[tuple[int, int, int]], batch_size: int,
                  progress: Callable[[int], None] | None = None,
                  count_bytes: Callable[[list[int]], int] | None = None) -> tuple[float, int, int]:
    """(total nats, tokens scored, bytes) of the (context_start, score_start, score_end) `spans` of `stream`.

    The one implementation of held-out loss: `evaluate_val` and the trainer's validator both call it.
    Windows go to the scorer `WINDOWS_PER_CALL` at a time, which bounds memory on long splits."""
    total_nats = 0.0
    n_tokens = n_bytes = 0
    pending: list[tuple[int, int, int]] = []

    def flush() -> None:
        nonlocal total_nats, n_tokens, n_bytes
        requests = [Request(stream[c:s].tolist(), stream[s:e].tolist()) for c, s, e in pending]
        for request, score in zip(requests, score_requests(model, requests, batch_size, progress)):
            total_nats -= score.logprob
            n_tokens += score.n_tokens
            if count_bytes is not None:
                n_bytes += count_bytes(request.continuation)
        pending.clear()

    for span in spans:
        pending.append(span)
        if len(pending) >= WINDOWS_PER_CALL:
            flush()
    if pending:
        flush()
    return total_nats, n_tokens, n_bytes


def evaluate_val(model: "GPT", tokenizer: "Tokenizer", tokens: Sequence[int] | np.ndarray, stride: int | None = None,
                 batch_size: int = 16, limit: int | None = None, prepared: bool = False,
                 progress: Callable[[int], None] | None = None) -> TaskResult:
    """loss (mean nats per token), ppl and bpb of `tokens`; `limit` caps the number of windows scored."""
    block_size = model.config.block_size
    stride = stride or (block_size if prepared else max(1, block_size // 2))
    stream = with_eot(tokens, tokenizer.eot_id)
    spans = windows(len(stream) - 1, block_size, stride)
    if limit is not None:
        spans = itertools.islice(spans, limit)
    special = set(tokenizer.special_tokens.values())
    total_nats, n_tokens, n_bytes = score_windows(
        model, stream, spans, batch_size, progress,
        count_bytes=lambda ids: len(tokenizer.decode_bytes([t for t in ids if t not in special])))
    loss = total_nats / n_tokens
    metrics = {"loss": loss, "ppl": math.exp(loss)}
    if n_bytes:
        metrics["bpb"] = total_nats / math.log(2) / n_bytes
    details = {"tokens": n_tokens, "bytes": n_bytes, "nats": total_nats, "stride": stride}
    return TaskResult("val", metrics, n_tokens, "", details=details)


def count_chat_rows(source: ValSource, block_size: int, limit: int | None = None) -> int:
    """Packed rows `evaluate_chat_val` scores (at most `limit`)."""
    from ..data.chat_loader import ChatLoader

    rows = ChatLoader(source.path, source.split, block_size, 1).sequences_per_epoch
    return min(rows, limit) if limit else rows


def _masked_loss(model: "GPT", x: "torch.Tensor", y: "torch.Tensor") -> "torch.Tensor":
    """The model's own masked loss (`model(x, y)`: the fused head + loss reads the head's exact weight), or,
    for a model whose head is quantized (`eval --quantize`), the same mean through that head, on the scored
    positions only and in row chunks (the full logits of a batch would not fit)."""
    import torch
    import torch.nn.functional as F

    from ..generation.quantize import QuantizedLinear
    from ..model import IGNORE_INDEX

    if not isinstance(model.lm_head, QuantizedLinear):
        return model(x, y, return_logits=False)[1]
    scored = y != IGNORE_INDEX
    hidden, targets = model.hidden_states(x)[scored], y[scored]
    total = sum(F.cross_entropy(model.head(hidden[c:c + 256]).float(), targets[c:c + 256], reduction="sum")
                for c in range(0, len(targets), 256))
    return torch.as_tensor(total) / len(targets)


def evaluate_chat_val(model: "GPT", tokenizer: "Tokenizer", source: ValSource, batch_size: int = 16,
                      limit: int | None = None, stride: int | None = None,
                      progress: Callable[[int], None] | None = None) -> TaskResult:
    """loss, ppl and bpb over the trained targets of chat data's `source.split` (the module docstring says why
    these and how they match SFT's val_loss); `limit` caps the packed rows scored.

    The loss is the model's own masked loss (`model(x, y)`), weighted by each batch's scored targets, as
    the trainer's validator computes it. Bytes are those of the scored targets that are not special tokens
    (`<|im_end|>` costs nats, like end-of-text in plain data, but is not text)."""
    import torch

    from ..data.chat_loader import ChatLoader
    from ..model import IGNORE_INDEX

    if stride is not None:
        raise UserError(f"--stride: val data {source.path} holds conversations, which are scored a whole packed "
                        "row at a time; leave --stride out")
    _check_data_tokenizer(source, tokenizer)
    loader = ChatLoader(source.path, source.split, model.config.block_size, batch_size)  # seed 0: the validator's
    special = set(tokenizer.special_tokens.values())
    device = model.transformer.wte.weight.device
    total = loader.sequences_per_epoch if limit is None else min(limit, loader.sequences_per_epoch)
    nats, n_tokens, n_bytes, rows = 0.0, 0, 0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, y in loader.iter_sequential(batch_size):
                if rows >= total:
                    break
                x, y = x[: total - rows], y[: total - rows]
                rows += x.shape[0]
                scored = int((y != IGNORE_INDEX).sum())
                if scored:
                    nats += float(_masked_loss(model, x.to(device), y.to(device))) * scored
                    n_tokens += scored
                    targets = y[y != IGNORE_INDEX].tolist()
                    n_bytes += len(tokenizer.decode_bytes([t for t in targets if t not in special]))
                if progress is not None:
                    progress(x.shape[0])
    finally:
        model.train(was_training)
    if not n_tokens:
        raise UserError(f"val data {source.path}: nothing to score (no assistant tokens in the {source.split} split "
                        f"at a context of {model.config.block_size})")
    loss_value = nats / n_tokens
    metrics = {"loss": loss_value, "ppl": math.exp(loss_value)}
    if n_bytes:
        metrics["bpb"] = nats / math.log(2) / n_bytes
    details = {"tokens": n_tokens, "bytes": n_bytes, "nats": nats, "rows": rows, "masked": True}
    return TaskResult("val", metrics, n_tokens, "", details=details)
