"""Tokenizer files that transformers' AutoTokenizer loads, giving the same ids as our tokenizers.

Every kind is written as a `tokenizer.json` built with the `tokenizers` library (the format
`PreTrainedTokenizerFast` reads), plus `tokenizer_config.json`/`special_tokens_map.json` naming
`<|endoftext|>` as bos/eos/unk (pad is left unset, as in GPT-2):
- gpt2: byte-level BPE. tiktoken stores only merge *ranks*; the merge list Hugging Face needs is recovered
  by replaying BPE on each token with only lower-ranked merges allowed (it must end in exactly two parts,
  which is the merge that made the token). Tokens are spelled through GPT-2's byte-to-unicode table.
  `vocab.json` + `merges.txt` are written too, for tools that read GPT-2's original files.
- char: a word-level vocabulary of single characters, after a pre-tokenizer that isolates every code
  point; unseen characters become `<|unk|>` as in ours.
- bpe: already a `tokenizers` byte-level BPE; its tokenizer.json is written with the special tokens
  registered.
Special-token text: ours treats it as ordinary text unless allowed, AutoTokenizer recognises it (the
transformers convention lm-eval expects); ids agree on all other text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..tokenizer.bpe import byte_encoder

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

HF_TOKENIZER_JSON = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
HF_SPECIAL_MAP = "special_tokens_map.json"
GPT2_VOCAB_JSON = "vocab.json"
GPT2_MERGES_TXT = "merges.txt"
HF_CHAT_TEMPLATE = "chat_template.jinja"  # transformers' name, the same as ours (layout.CHAT_TEMPLATE_FILE)
EOT = "<|endoftext|>"


def byte_token(token: bytes) -> str:
    """`token`'s bytes spelled through GPT-2's byte -> character table, as HF vocab files write them."""
    table = byte_encoder()
    return "".join(table[b] for b in token)


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The ordered merge list equivalent to tiktoken `ranks` (merge i creates the token of rank 256+i)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best_rank, best_i = None, -1
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best_rank is None or r < best_rank):
                    best_rank, best_i = r, i
            if best_rank is None:
                break
            parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        if len(parts) != 2:
            raise ValueError(f"BPE ranks are inconsistent: token {token!r} (rank {rank}) is not one merge of "
                             "lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


def _special_tokens(tokenizer: "Tokenizer") -> list[tuple[str, int]]:
    return sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])


def _register_specials(hf_tok: Any, tokenizer: "Tokenizer") -> None:
    """Add our special tokens as `tokenizers` special tokens and check they kept our ids."""
    from tokenizers import AddedToken

    hf_tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, _ in _special_tokens(tokenizer)])
    for token, i in _special_tokens(tokenizer):
        if hf_tok.token_to_id(token) != i:
            raise UserError(f"special token {token} would get id {hf_tok.token_to_id(token)} in the Hugging Face "
                            f"tokenizer instead of {i}; this tokenizer cannot be exported")


def gpt2_hf_tokenizer(tokenizer: "Tokenizer") -> tuple[Any, dict[str, int], list[tuple[str, str]]]:
    """`tokenizers.Tokenizer` for a gpt2-kind tokenizer, with its vocab and merges (strings)."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors

    from ..tokenizer.gpt2 import read_ranks

    ranks = read_ranks(tokenizer.ranks_path)
    vocab = {byte_token(t): r for t, r in ranks.items()}
    vocab.update(dict(_special_tokens(tokenizer)))
    merges = [(byte_token(a), byte_token(b)) for a, b in merges_from_ranks(ranks)]
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    # GPT-2's own pre-tokenizer: the same regex as tiktoken's r50k pattern, no prefix space.
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    _register_specials(hf, tokenizer)
    return hf, vocab, merges


def char_hf_tokenizer(tokenizer: "Tokenizer") -> Any:
    """`tokenizers.Tokenizer` for a char-kind tokenizer: every code point is one word of a WordLevel vocab."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(tokenizer.chars)}
    vocab.update(dict(_special_tokens(tokenizer)))
    hf = HFTokenizer(models.WordLevel(vocab=vocab, unk_token=tokenizer.unk_token))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    hf.decoder = decoders.Fuse()
    _register_specials(hf, tokenizer)
    return hf


def bpe_hf_tokenizer(tokenizer: "Tokenizer") -> Any:
    """The `tokenizers.Tokenizer` a bpe-kind tokenizer already is, with our special tokens registered."""
    from tokenizers import Tokenizer as HFTokenizer

    inner = getattr(tokenizer, "hf_tokenizer", None)
    if inner is None:
        raise UserError("this bpe tokenizer does not expose its Hugging Face tokenizers object; cannot export it")
    hf = HFTokenizer.from_str(inner.to_str())
    _register_specials(hf, tokenizer)
    return hf


def _chat_template(tokenizer: "Tokenizer") -> str | None:
    """The chat template to export: the tokenizer's own (None for a base model, markers or not)."""
    from ..chat.session import chat_template

    return chat_template(tokenizer)


def write_hf_tokenizer(tokenizer: "Tokenizer", directory: str | Path, model_max_length: int | None = None) -> None:
    """Write transformers tokenizer files for `tokenizer` into `directory` (which the caller writes
    atomically as a whole)."""
    directory = Path(directory)
    specials = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    extra: dict[str, Any] = {}
    if tokenizer.kind == "gpt2":
        hf, vocab, merges = gpt2_hf_tokenizer(tokenizer)
        (directory / GPT2_VOCAB_JSON).write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (directory / GPT2_MERGES_TXT).write_text(
            "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
        extra = {"add_prefix_space": False}
    elif tokenizer.kind == "char":
        hf = char_hf_tokenizer(tokenizer)
        specials["unk_token"] = tokenizer.unk_token
    elif tokenizer.kind == "bpe":
        hf = bpe_hf_tokenizer(tokenizer)
    else:
        raise UserError(f"tokenizer kind {tokenizer.kind!r} has no Hugging Face export; use gpt2, char or bpe")
    hf.save(str(directory / HF_TOKENIZER_JSON))
    template = _chat_template(tokenizer)
    if template is not None:
        # transformers 5 reads chat_template.jinja, older versions the tokenizer_config key: write both
        (directory / HF_CHAT_TEMPLATE).write_text(template, encoding="utf-8")
        extra["chat_template"] = template
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, **extra,
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": model_max_length or 1_000_000_000_000_000_019_884_624_838_656,
              "gptforge_kind": tokenizer.kind}
    (directory / HF_TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")
    (directory / HF_SPECIAL_MAP).write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------
# Import


def _read_json(path: Path) -> Any:
    """The parsed JSON in `path`, or None when it is missing, unreadable or not JSON.

    Tokenizer files are optional for an HF model: a broken one means "no tokenizer we can reproduce"
    (the model still loads and the user can pass --tokenizer), never a crash.
    """
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _json_model_vocab(data: Any) -> dict[str, Any] | None:
    """tokenizer.json's model.vocab table, or None when the file does not have that shape."""
    model = data.get("model") if isinstance(data, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    return vocab if isinstance(vocab, dict) else None


def _added_tokens(data: dict[str, Any], special_only: bool = False) -> dict[str, int] | None:
    """tokenizer.json's added tokens as content -> id, or None when an entry is malformed."""
    added = data.get("added_tokens") or []
    if not isinstance(added, list):
        return None
    table = {}
    for entry in added:
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str) \
                or not isinstance(entry.get("id"), int):
            return None
        if entry.get("special") or not special_only:
            table[entry["content"]] = entry["id"]
    return table


def _hf_vocab(directory: Path) -> dict[str, int] | None:
    """The token -> id table of a byte-level BPE HF tokenizer in `directory`, or None."""
    if (directory / HF_TOKENIZER_JSON).is_file():
        data = _read_json(directory / HF_TOKENIZER_JSON)
        vocab = _json_model_vocab(data)
        if vocab is None or data["model"].get("type") != "BPE":
            return None
        added = _added_tokens(data)
        return None if added is None else {**vocab, **added}
    if (directory / GPT2_VOCAB_JSON).is_file() and (directory / GPT2_MERGES_TXT).is_file():
        vocab = _read_json(directory / GPT2_VOCAB_JSON)
        return vocab if isinstance(vocab, dict) else None
    return None


def is_gpt2_vocab(vocab: dict[str, int]) -> bool:
    """Whether `vocab` is exactly GPT-2's 50,257 tokens (needs the GPT-2 ranks file to compare)."""
    from ..tokenizer.gpt2 import GPT2_EOT_ID, find_gpt2_ranks, read_ranks

    if len(vocab) != GPT2_EOT_ID + 1 or vocab.get(EOT) != GPT2_EOT_ID:
        return False
    ranks = read_ranks(find_gpt2_ranks(allow_download=False))
    return all(vocab.get(byte_token(t)) == r for t, r in ranks.items())


def read_hf_tokenizer(directory: str | Path) -> "Tokenizer | None":
    """Our tokenizer for an HF directory when we can reproduce it exactly: GPT-2's vocabulary (as the gpt2
    kind, with any special tokens added after it, such as chat markers) or a char tokenizer we exported.
    None otherwise (the model still loads; pass --tokenizer). A chat template comes along."""
    directory = Path(directory)
    config = _read_json(directory / HF_TOKENIZER_CONFIG)
    tokenizer = _read_tokenizer(directory, config)
    if tokenizer is not None:
        tokenizer.chat_template = _read_chat_template(directory, config)
    return tokenizer


def _read_chat_template(directory: Path, config: Any) -> str | None:
    """chat_template.jinja, else tokenizer_config.json's chat_template key (when it is one template)."""
    try:
        return (directory / HF_CHAT_TEMPLATE).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        pass
    template = config.get("chat_template") if isinstance(config, dict) else None
    return template if isinstance(template, str) else None


def _read_tokenizer(directory: Path, config: Any) -> "Tokenizer | None":
    if isinstance(config, dict) and config.get("gptforge_kind") == "char":
        return _read_char(directory)
    vocab = _hf_vocab(directory)
    if vocab is None:
        return None
    from ..tokenizer.gpt2 import GPT2_EOT_ID

    data = _read_json(directory / HF_TOKENIZER_JSON)
    added = (_added_tokens(data, special_only=True) if isinstance(data, dict) else None) or {}
    extra = {t: i for t, i in added.items() if i > GPT2_EOT_ID}
    try:
        if sorted(extra.values()) == list(range(GPT2_EOT_ID + 1, GPT2_EOT_ID + 1 + len(extra))) \
                and is_gpt2_vocab({t: i for t, i in vocab.items() if t not in extra}):
            from ..tokenizer.gpt2 import GPT2Tokenizer
            return GPT2Tokenizer(special_tokens={EOT: GPT2_EOT_ID, **extra}) if extra else GPT2Tokenizer()
    except UserError:  # no GPT-2 ranks on this machine: fall back to the tokenizer.json itself
        pass
    return _read_bpe(directory)


def _read_bpe(directory: Path) -> "Tokenizer | None":
    """A byte-level BPE tokenizer.json with an <|endoftext|> special token is exactly our bpe kind."""
    from tokenizers import Tokenizer as HFTokenizer

    from ..tokenizer.bpe import BPETokenizer

    path = directory / HF_TOKENIZER_JSON
    if not path.is_file():
        return None
    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception:  # tokenizers raises a bare Exception on schema errors
        return None
    if type(hf.pre_tokenizer).__name__ != "ByteLevel" or EOT not in {
            t.content for t in hf.get_added_tokens_decoder().values() if t.special}:
        return None
    _check_byte_vocab(path, hf.get_vocab(with_added_tokens=False))
    return BPETokenizer(hf)


def _check_byte_vocab(path: Path, vocab: dict[str, int]) -> None:
    """Refuse a byte-level BPE that lacks some of the 256 byte tokens: it cannot encode arbitrary text.

    transformers 5 writes such a file (an empty `model.vocab`, only `<|endoftext|>` as an added token) for
    `GPT2TokenizerFast(vocab_file=..., merges_file=...)`; taken as it is, it would be a tokenizer of size 1
    that turns all text into nothing, so the user is told to name the real one instead.
    """
    missing = sum(1 for c in byte_encoder().values() if c not in vocab)
    if not missing:
        return
    what = "is empty" if not vocab else f"lacks {missing} of the 256 byte tokens"
    raise UserError(f"{path}: its BPE vocabulary {what}, so it cannot encode text (transformers 5 writes such a "
                    "file for GPT2TokenizerFast(vocab_file=..., merges_file=...)); pass the model's tokenizer "
                    "with --tokenizer (gpt2 or a tokenizer directory)")


def _read_char(directory: Path) -> "Tokenizer | None":
    """The char tokenizer we exported (a WordLevel vocabulary of single characters), or None if the
    tokenizer.json is missing or not in that shape."""
    from ..tokenizer.char import CharTokenizer

    data = _read_json(directory / HF_TOKENIZER_JSON)
    vocab = _json_model_vocab(data)
    specials = _added_tokens(data, special_only=True) if vocab is not None else None
    if specials is None or not all(isinstance(i, int) for i in vocab.values()):
        return None
    chars = [c for c, i in sorted(vocab.items(), key=lambda kv: kv[1]) if c not in specials]
    try:
        return CharTokenizer(chars, specials)
    except UserError:  # not single characters in code-point order: not a char tokenizer we wrote
        return None
