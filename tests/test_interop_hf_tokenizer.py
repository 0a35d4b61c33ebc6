"""Reading Hugging Face tokenizer files: a tokenizer.json we cannot encode with is refused in one line."""

from __future__ import annotations

import json

import pytest

from gptforge.errors import UserError
from gptforge.interop.hf_tokenizer import read_hf_tokenizer

transformers = pytest.importorskip("transformers")


def test_empty_bpe_vocabulary_written_by_transformers_is_refused(tmp_path):
    """transformers 5 saves GPT2TokenizerFast(vocab_file=..., merges_file=...) with an empty model.vocab;
    read as it is that would be a tokenizer of size 1."""
    vocab = {c: i for i, c in enumerate("abcdefghij")} | {"<|endoftext|>": 10}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n", encoding="utf-8")
    fast = transformers.GPT2TokenizerFast(vocab_file=str(tmp_path / "vocab.json"),
                                          merges_file=str(tmp_path / "merges.txt"))
    fast.save_pretrained(tmp_path / "hf")
    saved = json.loads((tmp_path / "hf" / "tokenizer.json").read_text(encoding="utf-8"))
    if saved["model"]["vocab"]:
        pytest.skip("this transformers version writes the vocabulary; the defect does not arise")
    with pytest.raises(UserError, match=r"tokenizer\.json: its BPE vocabulary is empty.*pass .*--tokenizer") as info:
        read_hf_tokenizer(tmp_path / "hf")
    assert "\n" not in str(info.value)


def test_byte_level_bpe_missing_byte_tokens_is_refused_and_a_full_one_loads(tmp_path):
    from gptforge.interop.hf_tokenizer import write_hf_tokenizer
    from gptforge.tokenizer import train_bpe

    tok = train_bpe(["the quick brown fox jumps over the lazy dog " * 20], vocab_size=300)
    write_hf_tokenizer(tok, tmp_path)
    loaded = read_hf_tokenizer(tmp_path)
    assert loaded is not None and loaded.encode("the lazy fox") == tok.encode("the lazy fox")
    data = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["vocab"] = {t: i for t, i in data["model"]["vocab"].items() if t != "Ā"}  # byte 0 gone
    data["model"]["merges"] = []
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(UserError, match="lacks 1 of the 256 byte tokens"):
        read_hf_tokenizer(tmp_path)
