"""Tokenizers: references are tiktoken's own r50k_base, hand-computed vocabularies/merges, and exact bytes."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import warnings
from pathlib import Path

import pytest

from gptforge.cli import main
from gptforge.errors import UserError
from gptforge.tokenizer import (EOT, UNK, BPETokenizer, CharTokenizer, GPT2Tokenizer, get_tokenizer, load_tokenizer,
                                train_bpe)
from gptforge.tokenizer import gpt2 as gpt2_module

UNICODE_TEXT = "Grüße, naïve café — Привет мир! 日本語のテキスト。 Ελληνικά; עברית ‎العربية\tend\r\n"
CODE_TEXT = 'def f(x: int) -> int:\n    """Doc."""\n    return {"a": [x ** 2, 0x1F]}  # ok\n\n\tif x != 3: pass\n'
EMOJI_TEXT = "Emoji 🙂👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷 and math ∑∫√ — done."
ROUND_TRIP_TEXTS = [UNICODE_TEXT, CODE_TEXT, EMOJI_TEXT, "", " ", "   leading and trailing spaces   ",
                    "I'll we've they're it's DON'T 1234567 3.14159"]
VARIED_TEXT = "".join(ROUND_TRIP_TEXTS) + " <|endoftext|> text after\n\n\n  \u00a0nbsp  \x00nul"

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n" * 2,
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.\n",
    "Grüße aus München! Привет, мир. 日本語も少し。",
] * 10


@pytest.fixture(scope="module")
def bpe_tok() -> BPETokenizer:
    return train_bpe(iter(CORPUS), vocab_size=400, special_tokens=[EOT, "<|im_start|>"])


@pytest.fixture(scope="module")
def char_tok() -> CharTokenizer:
    return CharTokenizer.train(iter(ROUND_TRIP_TEXTS + [VARIED_TEXT, "<|im_start|>"]))


@pytest.fixture
def gpt2_tok(gpt2_ranks) -> GPT2Tokenizer:
    return GPT2Tokenizer(gpt2_ranks)


@pytest.fixture(params=["gpt2", "char", "bpe"])
def any_tok(request, char_tok, bpe_tok):
    """A fresh tokenizer of each kind (fresh so tests may add special tokens).

    The GPT-2 ranks file is requested only for the gpt2 case: without it just that case skips, and the
    char and bpe cases still run.
    """
    if request.param == "gpt2":
        return GPT2Tokenizer(request.getfixturevalue("gpt2_ranks"))
    if request.param == "char":
        return CharTokenizer(char_tok.chars)
    return BPETokenizer(type(bpe_tok.hf_tokenizer).from_str(bpe_tok.hf_tokenizer.to_str()))


# ---- GPT-2 -------------------------------------------------------------------------------------------------


def test_gpt2_hello_world_and_layout(gpt2_tok):
    assert gpt2_tok.encode("Hello world") == [15496, 995]
    assert (gpt2_tok.kind, gpt2_tok.vocab_size, gpt2_tok.eot_id) == ("gpt2", 50257, 50256)
    assert gpt2_tok.eot_token == EOT and gpt2_tok.special_tokens == {EOT: 50256}


def test_gpt2_agrees_with_tiktoken_r50k(gpt2_ranks, tmp_path, monkeypatch):
    """tiktoken's own r50k_base definition, loading the same ranks from its cache (it verifies their hash)."""
    import tiktoken
    import tiktoken.registry

    url = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
    shutil.copyfile(gpt2_ranks, tmp_path / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # build afresh from our cache dir
    reference = tiktoken.get_encoding("r50k_base")
    ours = GPT2Tokenizer(gpt2_ranks)
    ids = ours.encode(VARIED_TEXT)
    assert ids == reference.encode_ordinary(VARIED_TEXT)
    assert len(ids) > 100
    assert ours.encode(VARIED_TEXT, allowed_special=True) == reference.encode(VARIED_TEXT, allowed_special="all")
    assert ours.decode_bytes(ids) == reference.decode_bytes(ids)


def test_gpt2_ranks_parse_to_every_line_of_the_file(gpt2_ranks):
    # The reference: each `base64(token) rank` line decoded on its own (parse_ranks splits the file once).
    import base64
    data = gpt2_ranks.read_bytes()
    expected = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines())}
    ranks = gpt2_module.parse_ranks(data, str(gpt2_ranks))
    assert ranks == expected and len(ranks) == 50_256
    assert ranks[b"!"] == 0 and ranks[b" the"] == 262


def test_gpt2_saved_directory_is_self_contained(gpt2_ranks, tmp_path, monkeypatch):
    tok = GPT2Tokenizer(gpt2_ranks)
    tok.save(tmp_path / "tok")
    assert (tmp_path / "tok" / "gpt2.tiktoken").read_bytes() == gpt2_ranks.read_bytes()
    monkeypatch.delenv("GPTFORGE_GPT2_RANKS", raising=False)
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("GPTFORGE_OFFLINE", "1")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.encode(VARIED_TEXT) == tok.encode(VARIED_TEXT)


def test_gpt2_ranks_search_order(gpt2_ranks, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("GPTFORGE_CACHE", str(cache))
    monkeypatch.setenv("GPTFORGE_OFFLINE", "1")
    monkeypatch.setenv("GPTFORGE_GPT2_RANKS", str(gpt2_ranks))
    assert gpt2_module.find_gpt2_ranks() == gpt2_ranks
    monkeypatch.delenv("GPTFORGE_GPT2_RANKS")
    with pytest.raises(UserError, match="gptforge tokenizer fetch-gpt2.*GPTFORGE_GPT2_RANKS"):
        get_tokenizer("gpt2")
    cache.mkdir()
    shutil.copyfile(gpt2_ranks, cache / "gpt2.tiktoken")
    assert get_tokenizer("gpt2").ranks_path == cache / "gpt2.tiktoken"


def test_gpt2_bad_ranks_files(gpt2_ranks, tmp_path, monkeypatch):
    monkeypatch.setenv("GPTFORGE_GPT2_RANKS", str(tmp_path / "nope.tiktoken"))
    with pytest.raises(UserError, match="nope.tiktoken is not a file"):
        get_tokenizer("gpt2")
    garbled = tmp_path / "garbled.tiktoken"
    data = bytearray(gpt2_ranks.read_bytes())
    data[1000:1010] = b"!!!!!!!!!!"
    garbled.write_bytes(bytes(data))
    monkeypatch.setenv("GPTFORGE_GPT2_RANKS", str(garbled))
    with pytest.raises(UserError, match="garbled.tiktoken is damaged"):
        get_tokenizer("gpt2")
    truncated = tmp_path / "truncated.tiktoken"
    truncated.write_bytes(gpt2_ranks.read_bytes()[:5000])
    with pytest.raises(UserError, match="truncated.tiktoken is damaged"):
        GPT2Tokenizer(truncated)


def _fake_sdist(path: Path, member_data: bytes) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in (("openai_whisper-1/setup.py", b"x"),
                           ("openai_whisper-1/whisper/assets/gpt2.tiktoken", member_data)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_fetch_gpt2_extracts_and_verifies(gpt2_ranks, tmp_path, monkeypatch):
    """The pip step is replaced by a prepared archive; extraction, hashing and atomic storing are real."""
    sdist = _fake_sdist(tmp_path / "openai_whisper-1.tar.gz", gpt2_ranks.read_bytes())
    monkeypatch.setattr(gpt2_module, "_pip_download_whisper", lambda directory: sdist)
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "cache"))
    path = gpt2_module.fetch_gpt2_ranks()
    assert path == tmp_path / "cache" / "gpt2.tiktoken"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == gpt2_module.GPT2_RANKS_SHA256
    bad = _fake_sdist(tmp_path / "bad.tar.gz", gpt2_ranks.read_bytes()[:-10])
    monkeypatch.setattr(gpt2_module, "_pip_download_whisper", lambda directory: bad)
    with pytest.raises(UserError, match="damaged"):
        gpt2_module.fetch_gpt2_ranks(force=True, dest=tmp_path / "other" / "gpt2.tiktoken")
    assert not (tmp_path / "other" / "gpt2.tiktoken").exists()
    assert path.read_bytes() == gpt2_ranks.read_bytes()


@pytest.mark.slow
def test_fetch_gpt2_through_pip_for_real(tmp_path):
    """Needs the package index: downloads the openai-whisper sdist."""
    path = gpt2_module.fetch_gpt2_ranks(dest=tmp_path / "gpt2.tiktoken")
    assert GPT2Tokenizer(path).encode("Hello world") == [15496, 995]


# ---- char --------------------------------------------------------------------------------------------------


def test_char_vocabulary_by_hand():
    tok = CharTokenizer.train(x for x in ["ba", "c", ""])
    assert tok.chars == ["a", "b", "c"]
    assert tok.special_tokens == {EOT: 3, UNK: 4} and tok.vocab_size == 5
    assert tok.encode("cab") == [2, 0, 1]
    assert tok.decode([1, 0, 3]) == "ba" + EOT


def test_char_unseen_characters_become_unk_and_are_counted():
    tok = CharTokenizer.train(["abc"])
    with pytest.warns(UserWarning, match="'z'.*<\\|unk\\|>"):
        ids = tok.encode("azbzy")
    assert ids == [0, tok.unk_id, 1, tok.unk_id, tok.unk_id]
    assert tok.unknown_chars == {"z": 2, "y": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per tokenizer, then only counted
        tok.encode("q")
    assert tok.unknown_chars["q"] == 1


# ---- BPE ---------------------------------------------------------------------------------------------------


def test_bpe_learns_the_most_frequent_pair():
    """Pre-tokens of "ab ab ab" are ab, Ġab, Ġab: pair (a,b) occurs 3 times, (Ġ,a) twice -> one merge 'ab'."""
    tok = train_bpe(["ab ab ab"], vocab_size=256 + 1 + 1, min_frequency=1)
    assert tok.vocab_size == 258
    assert [tok.decode_bytes([i]) for i in tok.encode("abc ab")] == [b"ab", b"c", b" ", b"ab"]


def test_bpe_saved_file_is_a_standard_hf_tokenizer(bpe_tok, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    bpe_tok.save(tmp_path / "tok")
    hf = HFTokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    text = UNICODE_TEXT + CODE_TEXT
    assert hf.encode(text).ids == bpe_tok.encode(text)
    assert hf.decode(bpe_tok.encode(text)) == text


# ---- every kind --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(any_tok, text):
    ids = any_tok.encode(text)
    assert all(0 <= i < any_tok.vocab_size for i in ids)
    assert any_tok.decode(ids) == text
    assert any_tok.decode_bytes(ids) == text.encode("utf-8")


def test_decode_bytes_keeps_partial_utf8(any_tok):
    ids = any_tok.encode(EMOJI_TEXT + UNICODE_TEXT)
    pieces = [any_tok.decode_bytes([i]) for i in ids]
    assert b"".join(pieces) == (EMOJI_TEXT + UNICODE_TEXT).encode("utf-8")
    partial = []
    for piece in pieces:
        try:
            piece.decode("utf-8")
        except UnicodeDecodeError:
            partial.append(piece)
    if any_tok.kind == "char":
        assert partial == []
    else:  # byte-level kinds split rare characters into bytes; the cut pieces must survive exactly
        assert partial


def test_special_tokens_only_when_allowed(any_tok):
    text = f"a{EOT}b"
    plain = any_tok.encode(text)
    assert any_tok.eot_id not in plain
    assert any_tok.decode(plain) == text
    allowed = any_tok.encode(text, allowed_special=True)
    assert allowed == any_tok.encode("a") + [any_tok.eot_id] + any_tok.encode("b")
    assert any_tok.encode(text, allowed_special={EOT}) == allowed
    assert any_tok.encode(text, allowed_special="all") == allowed
    assert any_tok.decode(allowed) == text
    with pytest.raises(UserError, match="<\\|nope\\|>"):
        any_tok.encode(text, allowed_special={"<|nope|>"})


def test_add_special_tokens_and_save_load(any_tok, tmp_path):
    old_size = any_tok.vocab_size
    marker = "<|im_start|>"
    existing = any_tok.special_tokens.get(marker)
    ids = any_tok.add_special_tokens([marker, EOT])
    assert ids[EOT] == any_tok.eot_id
    if existing is None:
        assert ids[marker] == old_size and any_tok.vocab_size == old_size + 1
    text = f"{marker}user\nhi{EOT}"
    with_special = any_tok.encode(text, allowed_special={marker})
    assert with_special[0] == ids[marker] and any_tok.eot_id not in with_special
    assert any_tok.encode(text, allowed_special=True)[-1] == any_tok.eot_id
    assert ids[marker] not in any_tok.encode(text)
    any_tok.save(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.special_tokens == any_tok.special_tokens
    assert loaded.encode(text, allowed_special=True) == any_tok.encode(text, allowed_special=True)


def test_save_load_gives_identical_ids(any_tok, tmp_path):
    any_tok.save(tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["kind"] == any_tok.kind
    loaded = get_tokenizer(str(tmp_path / "tok"))
    assert type(loaded) is type(any_tok)
    assert (loaded.vocab_size, loaded.eot_id, loaded.special_tokens) == \
        (any_tok.vocab_size, any_tok.eot_id, any_tok.special_tokens)
    for text in ROUND_TRIP_TEXTS + [VARIED_TEXT]:
        assert loaded.encode(text) == any_tok.encode(text)
    with pytest.raises(UserError, match="already exists"):
        any_tok.save(tmp_path / "tok")
    any_tok.save(tmp_path / "tok", overwrite=True)


def test_encode_batch_matches_encode(any_tok):
    texts = ROUND_TRIP_TEXTS + [VARIED_TEXT]
    assert any_tok.encode_batch(texts) == [any_tok.encode(t) for t in texts]
    assert any_tok.encode_batch(iter(texts), allowed_special=True) == \
        [any_tok.encode(t, allowed_special=True) for t in texts]


def test_decode_rejects_ids_outside_vocabulary(any_tok):
    with pytest.raises(ValueError, match="outside"):
        any_tok.decode([any_tok.vocab_size])


# ---- bad input ---------------------------------------------------------------------------------------------


def test_bad_tokenizer_directories(tmp_path, char_tok):
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="tokenizer_config.json is missing"):
        load_tokenizer(tmp_path / "empty")
    char_tok.save(tmp_path / "tok")
    config_path = tmp_path / "tok" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "kind": "wordpiece"}))
    with pytest.raises(UserError, match="unknown tokenizer kind 'wordpiece'"):
        load_tokenizer(tmp_path / "tok")
    config_path.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_tokenizer(tmp_path / "tok")
    with pytest.raises(UserError, match="neither 'gpt2' nor"):
        get_tokenizer(str(tmp_path / "missing"))


def test_bpe_vocab_size_too_small_and_empty_corpus():
    with pytest.raises(UserError, match="too small.*at least 258"):
        train_bpe(CORPUS, vocab_size=257, special_tokens=[EOT, "<|pad|>"])
    with pytest.raises(UserError, match="empty corpus"):
        train_bpe(iter([]), vocab_size=300)
    with pytest.raises(UserError, match="empty corpus"):
        train_bpe(["", ""], vocab_size=300)
    with pytest.raises(UserError, match="empty corpus"):
        CharTokenizer.train(iter(["", ""]))


# ---- CLI ---------------------------------------------------------------------------------------------------


def test_cli_train_encode_and_errors(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(CORPUS), encoding="utf-8")
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "300", "--out", str(out),
                 "--special-token", "<|im_start|>"]) == 0
    tok = load_tokenizer(out)
    assert tok.kind == "bpe" and tok.vocab_size == 300 and "<|im_start|>" in tok.special_tokens
    capsys.readouterr()
    assert main(["tokenizer", "encode", "--tokenizer", str(out), "the fox"]) == 0
    assert capsys.readouterr().out.split() == [str(i) for i in tok.encode("the fox")]
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "300", "--out", str(out)]) == 2
    assert "is not empty; choose a new directory or pass --overwrite" in capsys.readouterr().err
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "100", "--out", str(tmp_path / "t2")]) == 2
    assert "too small" in capsys.readouterr().err
    assert main(["tokenizer", "train", str(corpus), "--kind", "char", "--out", str(tmp_path / "c")]) == 0
    assert load_tokenizer(tmp_path / "c").decode(load_tokenizer(tmp_path / "c").encode("the fox")) == "the fox"


def test_encode_ordinary_array_equals_encode(any_tok):
    import numpy as np
    array = any_tok.encode_ordinary_array(VARIED_TEXT)  # special-token text stays plain text
    assert array.dtype == np.uint32
    assert array.tolist() == any_tok.encode(VARIED_TEXT)
    assert any_tok.encode_ordinary_array("").tolist() == []


def test_bpe_training_sees_long_runs_cut_and_capped():
    """Text without whitespace must not grow the trainer's memory with its size (issue 10 #12): runs of
    64+ letters, digits or symbols reach the trainer cut into 64-character pieces, and only up to a budget."""
    from gptforge.tokenizer.bpe import _LongRunLimiter

    limiter = _LongRunLimiter(budget=100, size=64)
    assert list(limiter("plain words stay whole, even long ones: antidisestablishmentarianism")) == \
        ["plain words stay whole, even long ones: antidisestablishmentarianism"]
    assert list(limiter("short words " + "x" * 150 + " tail")) == ["short words ", "x" * 64, "x" * 36, " tail"]
    assert limiter.dropped == 50 and limiter.budget == 0
    assert list(limiter("7" * 70 + "=" * 80)) == []  # budget spent: digits and symbols runs are left out
    assert limiter.dropped == 200


def test_bpe_trained_on_a_whitespace_free_blob_still_round_trips():
    from gptforge.tokenizer import train_bpe

    rng = __import__("numpy").random.default_rng(0)
    blob = "".join(rng.choice(list("abcdefgh"), size=20_000))
    tokenizer = train_bpe(["some ordinary text here " * 20, blob], vocab_size=300)
    assert tokenizer.decode(tokenizer.encode(blob)) == blob
    assert len(tokenizer.encode(blob)) < 0.8 * len(blob)  # merges were learned from the (capped) blob too


def test_a_long_text_is_encoded_in_pieces_to_exactly_the_tokens_of_the_whole(monkeypatch):
    """One 5 MB text used to be one HF Encoding (~800 MB, 12 s on one thread): the bpe kind now cuts it
    where GPT-2's pre-tokenizer splits anyway and encodes the pieces in parallel, to the same ids."""
    from conftest import fixture_text

    from gptforge.tokenizer import bpe as bpe_module
    from gptforge.tokenizer import train_bpe
    from gptforge.tokenizer.base import split_at_safe_cuts

    tok = train_bpe([fixture_text()], vocab_size=400)
    # every kind of whitespace run and a stretch without any, around the cut points
    text = fixture_text(60_000) + "  double  spaces \n\n x\t\ty \r\n" * 300 + "z" * 5000 + " end\n"
    whole = tok._plain.encode(text, add_special_tokens=False).ids
    monkeypatch.setattr(bpe_module, "LONG_TEXT_CHARS", 1000)
    calls = []
    original = type(tok)._encode_ordinary_batch
    monkeypatch.setattr(type(tok), "_encode_ordinary_batch", lambda self, texts: calls.append(len(texts)) or
                        original(self, texts))
    assert tok.encode(text) == whole and calls and calls[0] > 50
    pieces = split_at_safe_cuts(text, 1000)
    assert "".join(pieces) == text and all(len(p) >= 1000 for p in pieces[:-1])
    assert split_at_safe_cuts("x" * 5000, 1000) == ["x" * 5000]
