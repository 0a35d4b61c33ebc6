"""Sources: every kind reads the right documents in a stable order; bad input fails early and by name."""

from __future__ import annotations

import json
import sys

import pytest

from gptforge.data.sources import (PIECE_CHARS, DocumentReader, cut_pieces, iter_documents, pystdlib_files,
                                   resolve_sources)
from gptforge.errors import UserError

from conftest import fixture_text


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_text_file_is_one_document(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("hello\nworld\n", encoding="utf-8")
    assert list(iter_documents([str(path)])) == ["hello\nworld\n"]


def test_folder_recursive_sorted_with_glob_and_hidden_skipped(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "b" / "2.txt").write_text("two")
    (tmp_path / "1.txt").write_text("one")
    (tmp_path / "3.md").write_text("three")
    (tmp_path / ".hidden.txt").write_text("hidden")
    (tmp_path / ".git" / "x.txt").write_text("git")
    assert list(iter_documents([str(tmp_path)])) == ["one", "three", "two"]
    assert list(iter_documents([str(tmp_path)], glob="*.txt")) == ["one", "two"]
    assert list(iter_documents([str(tmp_path)], glob="b/*.txt")) == ["two"]


def test_jsonl_records_and_text_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a b", "body": "x"}, {"text": "c", "body": "y"}])
    with open(path, "a") as f:
        f.write("\n")  # blank lines are ignored
    assert list(iter_documents([str(path)])) == ["a b", "c"]
    assert list(iter_documents([str(path)], text_field="body")) == ["x", "y"]


def test_jsonl_bad_records_are_skipped_by_line_and_only_nothing_usable_is_an_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n[1, 2]\n{"text": 5}\n{"body": "x"}\n{"text": "fine"}\n')
    reader = DocumentReader([str(path)])
    assert list(reader.documents()) == ["ok", "fine"]
    report = reader.stats.records
    assert report.count == 4
    assert report.examples == [f"{path}:2: not valid JSON (Expecting value); skipped",
                               f"{path}:3: not a JSON object (a list); skipped",
                               f"{path}:4: field 'text' is int, not text; choose a text field with --text-field; skipped",
                               f"{path}:5: no field 'text' (found: body); choose one with --text-field; skipped"]
    counts = reader.stats.to_dict()
    assert counts["skipped_records"] == 4 and counts["documents"] == 2
    path.write_text('{"body": "x"}\n{"body": "y"}\n')
    with pytest.raises(UserError, match=rf"source {path}: no usable records \(2 skipped; first: {path}:1: no field "
                                        r"'text' \(found: body\); choose one with --text-field\); fix the file"):
        list(iter_documents([str(path)]))


def test_lone_surrogates_in_jsonl_are_replaced_and_counted_by_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a\\ud800b"}\n{"text": "fine \\ud83d\\ude00"}\n{"text": "\\udfff\\udfff"}\n')
    reader = DocumentReader([str(path)])
    assert list(reader.documents()) == ["a\ufffdb", "fine \U0001F600", "\ufffd\ufffd"]
    counts = reader.stats.to_dict()
    assert counts["lone_surrogates"] == 3
    assert counts["lone_surrogate_examples"] == [f"{path}:1: 1 lone surrogate(s) replaced by U+FFFD",
                                                 f"{path}:3: 2 lone surrogate(s) replaced by U+FFFD"]


def test_parquet_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["first doc", None, "second"], "n": [1, 2, 3]}), path)
    assert list(iter_documents([str(path)])) == ["first doc", "second"]
    with pytest.raises(UserError, match=r"no column 'body' \(found: text, n\)"):
        list(iter_documents([str(path)], text_field="body"))


def test_missing_optional_extras_say_what_to_install(tmp_path, monkeypatch):
    from gptforge.data.sources import load_hf_stream

    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1 not really")  # never opened: the import fails first
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    with pytest.raises(UserError, match=r"d\.parquet: .*pip install 'gptforge\[data\]'"):
        list(iter_documents([str(path)]))
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(UserError, match=r"pip install 'gptforge\[data\]'"):
        load_hf_stream("someone/corpus")


def test_hf_dataset_from_local_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "mydataset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"text": f"document {i}"} for i in range(5)])
    reader = DocumentReader([f"hf:{folder}"])
    assert list(reader.documents()) == [f"document {i}" for i in range(5)]
    assert reader.stats.documents == 5


def test_hf_loader_is_injectable():
    rows = [{"content": "x"}, {"content": "y z"}]
    calls = []

    def loader(name, config):
        calls.append((name, config))
        return rows

    reader = DocumentReader(["hf:someone/corpus:en"], text_field="content", hf_loader=loader)
    assert list(reader.documents()) == ["x", "y z"] and calls == [("someone/corpus", "en")]


def test_builtin_pystdlib_is_deterministic_without_tests_or_codec_tables():
    files = pystdlib_files()
    assert files == pystdlib_files() and all(p.suffix == ".py" for p in files)
    assert not any({"test", "tests", "idle_test", "encodings"} & set(p.parts) for p in files)
    size = sum(p.stat().st_size for p in files)
    assert 3e6 < size < 40e6
    assert resolve_sources(["builtin:pystdlib"])[0].files == tuple(files)


def test_missing_empty_and_unmatched_sources(tmp_path):
    with pytest.raises(UserError, match="no-such.txt: no such file or directory"):
        resolve_sources([str(tmp_path / "no-such.txt")])
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(UserError, match="empty.txt: file is empty"):
        resolve_sources([str(tmp_path / "empty.txt")])
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(UserError, match=r"no files matching --glob '\*.md'"):
        resolve_sources([str(tmp_path)], glob="*.md")
    with pytest.raises(UserError, match="builtin:nope"):
        resolve_sources(["builtin:nope"])
    with pytest.raises(UserError, match="no sources"):
        resolve_sources([])


def test_whitespace_only_source_has_no_text(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": ""}, {"text": ""}])
    with pytest.raises(UserError, match="no text found"):
        list(iter_documents([str(path)]))


def test_binary_files_are_skipped_and_counted(tmp_path):
    (tmp_path / "a.txt").write_text("text")
    (tmp_path / "b.bin").write_bytes(b"\x89PNG\x00\x01" * 100)
    reader = DocumentReader([str(tmp_path)])
    assert list(reader.documents()) == ["text"]
    assert reader.stats.skipped_binary_files == 1
    assert reader.stats.skipped_binary_examples == [str(tmp_path / "b.bin")]
    only_binary = tmp_path / "bin"
    only_binary.mkdir()
    (only_binary / "c.dat").write_bytes(b"\x00" * 10)
    with pytest.raises(UserError, match=r"no text found \(1 binary file\(s\) skipped"):
        list(iter_documents([str(only_binary)]))


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"caf\xc3\xa9 \xff\xfe ok \xc3")  # valid é, two bad bytes, a cut-off sequence at the end
    reader = DocumentReader([str(path)])
    assert list(reader.documents()) == ["caf\u00e9 \ufffd\ufffd ok \ufffd"]
    assert reader.stats.invalid_utf8_files == 1 and reader.stats.invalid_utf8_replacements == 3


def test_multibyte_characters_across_read_blocks(tmp_path):
    text = "é" * 1_500_000  # 3 MB: several 1 MiB reads, each splitting a 2-byte character
    path = tmp_path / "a.txt"
    path.write_text(text, encoding="utf-8")
    reader = DocumentReader([str(path)])
    assert "".join(reader.documents()) == text and reader.stats.invalid_utf8_replacements == 0


def test_long_document_comes_in_bounded_pieces(tmp_path):
    path = tmp_path / "long.txt"
    words = " ".join(f"w{i}" for i in range(100_000))
    path.write_text(words)
    pieces = list(DocumentReader([str(path)]).pieces())
    assert len(pieces) > 5 and all(len(p.text) <= PIECE_CHARS for p in pieces)
    assert "".join(p.text for p in pieces) == words
    assert [p.first for p in pieces] == [True] + [False] * (len(pieces) - 1)
    assert [p.last for p in pieces] == [False] * (len(pieces) - 1) + [True]


def test_cuts_keep_gpt2_tokens_exact(gpt2_ranks):
    from gptforge.tokenizer import get_tokenizer

    tokenizer = get_tokenizer("gpt2")
    text = fixture_text()
    pieces, rest = cut_pieces(text, 400)
    pieces.append(rest)
    assert len(pieces) > 90 and "".join(pieces) == text
    assert [t for p in pieces for t in tokenizer.encode(p)] == tokenizer.encode(text)


def test_cut_without_whitespace_is_hard():
    pieces, rest = cut_pieces("x" * 10_000, 4096)
    assert [len(p) for p in pieces] == [4096, 4096] and len(rest) == 10_000 - 8192
