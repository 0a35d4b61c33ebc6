"""Tokenizers behind one interface: GPT-2 (tiktoken), character-level, and byte-level BPE of your own.

`get_tokenizer("gpt2")` or `get_tokenizer(DIR)` gives a `Tokenizer`; `CharTokenizer.train(texts)` and
`train_bpe(texts, vocab_size)` build one from a corpus; `tok.save(DIR)` / `load_tokenizer(DIR)` persist it
in a directory with `tokenizer_config.json` ({"kind": ...}) plus the kind's files.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..layout import CHAT_TEMPLATE_FILE
from .base import CONFIG_FILE, EOT, AllowedSpecial, Tokenizer, read_json
from .bpe import BPETokenizer, train_bpe
from .char import UNK, CharTokenizer
from .gpt2 import GPT2Tokenizer, cache_dir, fetch_gpt2_ranks, find_gpt2_ranks

KINDS: dict[str, type] = {"gpt2": GPT2Tokenizer, "char": CharTokenizer, "bpe": BPETokenizer}


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Rebuild a tokenizer saved with `Tokenizer.save`, or raise a UserError naming what is wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"tokenizer directory {directory} does not exist; pass a directory written by "
                        "`gptforge tokenizer train` or Tokenizer.save, or --tokenizer gpt2")
    config = read_json(directory / CONFIG_FILE, "tokenizer config")
    kind = config.get("kind") if isinstance(config, dict) else None
    if kind not in KINDS:
        raise UserError(f"{directory / CONFIG_FILE}: unknown tokenizer kind {kind!r}; expected one of "
                        f"{', '.join(KINDS)}")
    tokenizer = KINDS[kind].load(directory, config)
    template = directory / CHAT_TEMPLATE_FILE
    if template.is_file():
        tokenizer.chat_template = template.read_text(encoding="utf-8")
    return tokenizer


def get_tokenizer(spec: str | Path) -> Tokenizer:
    """"gpt2" (GPT-2's BPE from a local ranks file) or a saved tokenizer directory."""
    if str(spec) == "gpt2":
        return GPT2Tokenizer()
    if str(spec) in ("char", "bpe"):
        raise UserError(f"a {spec} tokenizer is built from a corpus: `gptforge tokenizer train` (bpe), or pass "
                        f"--tokenizer {spec} to `gptforge prepare`; then use the saved directory")
    path = Path(spec)
    if path.is_dir():
        return load_tokenizer(path)
    raise UserError(f"tokenizer {str(spec)!r} is neither 'gpt2' nor an existing tokenizer directory")


__all__ = ["AllowedSpecial", "BPETokenizer", "CharTokenizer", "EOT", "GPT2Tokenizer", "KINDS", "Tokenizer", "UNK",
           "cache_dir", "fetch_gpt2_ranks", "find_gpt2_ranks", "get_tokenizer", "load_tokenizer", "train_bpe"]
