"""prepare: right token counts for every source kind, a deterministic split, all-or-nothing output."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gptforge.data.prepare import prepare, read_manifest, split_of, summary
from gptforge.data.shards import check_shard_ids, open_shard
from gptforge.errors import EXIT_INTERRUPTED, UserError

from conftest import fixture_text
from test_data_workers import hard_timeout, live_children  # noqa: F401  (hard_timeout: a fixture)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def gpt2(gpt2_ranks):
    from gptforge.tokenizer import get_tokenizer
    return get_tokenizer("gpt2")


def documents(n=40, seed=0):
    """Small distinct documents of varied length, cut from the text fixture."""
    text = fixture_text()
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(text) - 3000, size=n)
    return [text[s:s + int(rng.integers(50, 3000))] for s in starts]


def split_tokens(out):
    manifest = read_manifest(out)
    return {name: np.concatenate([open_shard(out / s["file"]) for s in split["shards"]] or [np.zeros(0)])
            for name, split in manifest["splits"].items()}


def expected_split(tokenizer, docs, seed, val_fraction):
    """Each document (all shorter than a piece) encoded directly, eot after it, in the split its hash picks."""
    parts = {"train": [], "val": []}
    for i, doc in enumerate(docs):
        parts["val" if split_of(i, seed, val_fraction) else "train"] += tokenizer.encode(doc) + [tokenizer.eot_id]
    return parts


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d}) + "\n" for d in docs), encoding="utf-8")
    return path


def check_against_direct(out, tokenizer, docs, seed=0, val_fraction=0.2):
    expected = expected_split(tokenizer, docs, seed, val_fraction)
    got = split_tokens(out)
    assert got["train"].tolist() == expected["train"]
    assert got["val"].tolist() == expected["val"]
    assert 0 < len(expected["val"]) < len(expected["train"])  # the fixture really exercises both splits
    manifest = read_manifest(out)
    assert manifest["counts"]["documents"] == len(docs)
    assert manifest["counts"]["tokens"] == len(expected["train"]) + len(expected["val"])
    assert manifest["tokenizer"] == {"spec": "gpt2", "kind": "gpt2", "vocab_size": 50257, "eot_id": 50256,
                                     "dir": "tokenizer"}
    assert manifest["dtype"] == "uint16"


def test_text_files_in_a_folder_with_glob(tmp_path, gpt2):
    docs = documents()
    folder = tmp_path / "corpus"
    for i, doc in enumerate(docs):
        (folder / f"part{i // 10}").mkdir(parents=True, exist_ok=True)
        (folder / f"part{i // 10}" / f"{i:03d}.txt").write_text(doc, encoding="utf-8")
        (folder / f"part{i // 10}" / f"{i:03d}.md").write_text("not me", encoding="utf-8")
    out = tmp_path / "out"
    prepare([str(folder)], "gpt2", out, glob="*.txt", val_fraction=0.2, workers=1)
    check_against_direct(out, gpt2, docs)
    assert read_manifest(out)["counts"]["files"] == len(docs)


def test_single_text_file(tmp_path, gpt2):
    doc = documents(1)[0]
    (tmp_path / "a.txt").write_text(doc, encoding="utf-8")
    manifest = prepare([str(tmp_path / "a.txt")], "gpt2", tmp_path / "out", val_fraction=0, workers=1)
    assert split_tokens(tmp_path / "out")["train"].tolist() == gpt2.encode(doc) + [gpt2.eot_id]
    assert manifest["splits"]["val"] == {"tokens": 0, "shards": []}


def test_jsonl_with_two_workers_and_small_shards(tmp_path, gpt2):
    docs = documents()
    out = tmp_path / "out"
    manifest = prepare([str(write_jsonl(tmp_path / "d.jsonl", docs))], "gpt2", out, val_fraction=0.2, workers=2,
                       shard_tokens=1000)
    check_against_direct(out, gpt2, docs)
    assert len(manifest["splits"]["train"]["shards"]) > 3
    assert all(s["tokens"] <= 1000 for s in manifest["splits"]["train"]["shards"])


def test_parquet(tmp_path, gpt2):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = documents()
    pq.write_table(pa.table({"content": docs}), tmp_path / "d.parquet")
    out = tmp_path / "out"
    prepare([str(tmp_path / "d.parquet")], "gpt2", out, text_field="content", val_fraction=0.2, workers=1)
    check_against_direct(out, gpt2, docs)


def test_hf_dataset_via_local_files(tmp_path, gpt2, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    docs = documents()
    (tmp_path / "ds").mkdir()
    write_jsonl(tmp_path / "ds" / "train.jsonl", docs)
    out = tmp_path / "out"
    prepare([f"hf:{tmp_path / 'ds'}"], "gpt2", out, val_fraction=0.2, workers=1)
    check_against_direct(out, gpt2, docs)


def test_split_is_deterministic_and_seeded(tmp_path, gpt2):
    source = str(write_jsonl(tmp_path / "d.jsonl", documents(60)))
    runs = {}
    for name, seed, workers in (("a", 0, 1), ("b", 0, 2), ("c", 1, 1)):
        prepare([source], "gpt2", tmp_path / name, val_fraction=0.3, workers=workers, seed=seed)
        runs[name] = {f.name: f.read_bytes() for f in sorted((tmp_path / name).glob("*.bin"))}
    assert runs["a"] == runs["b"]
    assert runs["a"]["val_000000.bin"] != runs["c"]["val_000000.bin"]


def test_one_long_text_file_gets_exactly_its_tail_as_val(tmp_path, gpt2):
    """One file the size of Tiny Shakespeare (68 pieces) once had pieces drawn into val by hash, so val and
    train interleaved; as the README says (and nanoGPT splits), val is the last tenth of the text."""
    text = fixture_text(1_100_000)
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    manifest = prepare([str(tmp_path / "one.txt")], "gpt2", tmp_path / "out", val_fraction=0.1, workers=2)
    got = split_tokens(tmp_path / "out")
    assert got["train"].tolist() + got["val"].tolist() == gpt2.encode(text) + [gpt2.eot_id]
    split = manifest["split"]
    assert split["method"] == "tail" and split["detail"].startswith("one document: the last")
    assert abs(split["val_chars"] - len(text) // 10) < 300 and manifest["counts"]["documents"] == 1
    assert gpt2.decode(got["val"].tolist()[:-1]) == text[-split["val_chars"]:]
    assert f"val split: {split['detail']}" in summary(manifest, tmp_path / "out").splitlines()


def test_a_short_single_file_gets_its_last_tenth_as_val_with_exact_tokens(tmp_path, gpt2):
    """Too few pieces for a random draw (issue 10 #24): the last val_fraction of the text is val, cut where
    GPT-2's tokenization does not change, so train + val is exactly the file's tokens (as nanoGPT splits)."""
    text = fixture_text()[:40_000]  # 3 pieces
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    manifest = prepare([str(tmp_path / "a.txt")], "gpt2", tmp_path / "out", val_fraction=0.1, workers=2)
    got = split_tokens(tmp_path / "out")
    assert got["train"].tolist() + got["val"].tolist() == gpt2.encode(text) + [gpt2.eot_id]
    split = manifest["split"]
    assert split["method"] == "tail" and abs(split["val_chars"] - 4000) < 300
    assert gpt2.decode(got["val"].tolist()[:-1]) == text[-split["val_chars"]:]
    assert split["detail"].startswith("one document: ") and manifest["warnings"] == []


def test_a_few_documents_get_the_last_tenth_of_their_text_as_val(tmp_path):
    docs = [f"document number {i} " * 20 for i in range(3)]  # 3 pieces: too few for a draw at 0.1
    manifest = prepare([str(write_jsonl(tmp_path / "d.jsonl", docs))], "char", tmp_path / "out", val_fraction=0.1,
                       workers=1)
    split = manifest["split"]
    assert split["method"] == "tail" and "only 3 document piece(s)" in split["detail"]
    assert abs(split["val_chars"] - sum(map(len, docs)) // 10) < 25


def test_many_documents_are_drawn_by_hash_and_the_manifest_says_so(tmp_path):
    docs = [f"document number {i}" for i in range(100)]
    manifest = prepare([str(write_jsonl(tmp_path / "d.jsonl", docs))], "char", tmp_path / "out", val_fraction=0.05,
                       workers=1, seed=3)
    assert manifest["split"]["method"] == "hash" and manifest["split"]["seed"] == 3
    assert manifest["splits"]["val"]["tokens"] == sum(len(d) + 1 for i, d in enumerate(docs) if split_of(i, 3, 0.05))


def test_cli_one_small_file_with_default_split_has_val_tokens(tmp_path):
    (tmp_path / "notes.txt").write_text("a few lines of text\n" * 50, encoding="utf-8")
    result = run_cli("notes.txt", "--tokenizer", "char", "--out", "out", "--quiet", "--workers", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(tmp_path / "out")
    assert manifest["split"]["method"] == "tail"
    val_chars = manifest["split"]["val_chars"]  # about 5% of 1,000 characters, cut before a space
    assert 45 <= val_chars <= 55 and manifest["splits"]["val"]["tokens"] == val_chars + 1  # + end-of-text
    assert manifest["splits"]["train"]["tokens"] == 1000 - val_chars
    assert f"val split: one document: the last {val_chars} of 1,000 characters" in result.stdout


def test_char_tokenizer_is_trained_saved_and_ids_fit(tmp_path):
    from gptforge.tokenizer import load_tokenizer

    docs = ["abc abc", "cab ba", "zzz"]
    out = tmp_path / "out"
    manifest = prepare([str(write_jsonl(tmp_path / "d.jsonl", docs))], "char", out, val_fraction=0, workers=1)
    tokenizer = load_tokenizer(out / "tokenizer")
    assert tokenizer.kind == "char" and manifest["tokenizer"]["vocab_size"] == tokenizer.vocab_size
    expected = [t for d in docs for t in tokenizer.encode(d) + [tokenizer.eot_id]]
    assert split_tokens(out)["train"].tolist() == expected
    check_shard_ids(out / "train_000000.bin", tokenizer.vocab_size)
    with pytest.raises(UserError, match="outside the vocabulary"):
        check_shard_ids(out / "train_000000.bin", tokenizer.vocab_size - 3)


def test_bpe_tokenizer_is_trained_on_the_sources(tmp_path):
    from gptforge.tokenizer import load_tokenizer

    docs = documents(30)
    out = tmp_path / "out"
    manifest = prepare([str(write_jsonl(tmp_path / "d.jsonl", docs))], "bpe:400", out, val_fraction=0, workers=1)
    tokenizer = load_tokenizer(out / "tokenizer")
    assert tokenizer.kind == "bpe" and manifest["tokenizer"]["vocab_size"] == tokenizer.vocab_size <= 400
    expected = [t for d in docs for t in tokenizer.encode(d) + [tokenizer.eot_id]]
    assert split_tokens(out)["train"].tolist() == expected


def test_saved_tokenizer_directory_is_accepted(tmp_path):
    source = str(write_jsonl(tmp_path / "d.jsonl", ["hello there", "general"]))
    prepare([source], "char", tmp_path / "first", val_fraction=0, workers=1)
    manifest = prepare([source], str(tmp_path / "first" / "tokenizer"), tmp_path / "second", val_fraction=0, workers=1)
    assert manifest["tokenizer"]["kind"] == "char"
    assert (tmp_path / "first" / "train_000000.bin").read_bytes() == (tmp_path / "second" / "train_000000.bin").read_bytes()


def test_binary_and_invalid_utf8_are_reported(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_bytes(b"good text \xff here")
    (tmp_path / "src" / "b.png").write_bytes(b"\x89PNG\x00\x00\x00")
    manifest = prepare([str(tmp_path / "src")], "char", tmp_path / "out", val_fraction=0, workers=1)
    counts = manifest["counts"]
    assert counts["skipped_binary_files"] == 1 and counts["invalid_utf8_replacements"] == 1
    assert counts["documents"] == 1 and counts["invalid_utf8_files"] == 1
    assert any("binary" in w for w in manifest["warnings"]) and any("UTF-8" in w for w in manifest["warnings"])


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".tmp-"))


@pytest.mark.parametrize("make_source,message", [
    (lambda d: d / "missing.txt", "no such file"),
    (lambda d: (d / "empty.txt").write_bytes(b"") and d / "empty.txt" or d / "empty.txt", "file is empty"),
    (lambda d: (d / "f").mkdir() or (d / "f" / "a.md").write_text("x") and d / "f", "no files matching"),
    (lambda d: (d / "b").mkdir() or (d / "b" / "x.bin").write_bytes(b"\0\1") and d / "b", "no text found"),
])
def test_bad_sources_leave_nothing(tmp_path, make_source, message):
    source = make_source(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message):
        prepare([str(source)], "char", out, glob="*.txt" if message == "no files matching" else None, workers=1)
    assert not out.exists() and leftovers(tmp_path) == []


def test_out_dir_rules(tmp_path):
    source = str(write_jsonl(tmp_path / "d.jsonl", ["one doc", "two doc"]))
    out = tmp_path / "out"
    out.mkdir()
    prepare([source], "char", out, workers=1, val_fraction=0)  # an empty directory is fine
    with pytest.raises(UserError, match="not empty; .* --force"):
        prepare([source], "char", out, workers=1, val_fraction=0)
    write_jsonl(tmp_path / "d.jsonl", ["another"])
    manifest = prepare([source], "char", out, workers=1, val_fraction=0, force=True)
    assert manifest["counts"]["documents"] == 1 and read_manifest(out)["counts"]["documents"] == 1
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        prepare([source], "char", tmp_path / "file", workers=1)
    with pytest.raises(UserError, match="--val-fraction"):
        prepare([source], "char", tmp_path / "x", val_fraction=1.5)
    with pytest.raises(UserError, match="--tokenizer nope"):
        prepare([source], "nope", tmp_path / "x")
    with pytest.raises(UserError, match="bpe:VOCAB_SIZE"):
        prepare([source], "bpe:many", tmp_path / "x")


@pytest.mark.parametrize("boundary", ["mount point", "other filesystem"])
def test_out_on_another_filesystem_is_refused_before_any_work(tmp_path, monkeypatch, boundary):
    """The finished data is renamed over --out from beside it; at a mount point that rename fails (EBUSY,
    EXDEV) only after all the tokenizing, so it must be refused first."""
    import gptforge.data.prepare as prepare_module

    source = str(write_jsonl(tmp_path / "d.jsonl", ["one doc", "two doc"]))
    out = tmp_path / "mnt"
    out.mkdir()
    if boundary == "mount point":
        real_ismount = os.path.ismount
        monkeypatch.setattr(os.path, "ismount", lambda p: os.fspath(p) == str(out) or real_ismount(p))
    else:
        real_stat = os.stat

        def stat(path, *args, **kwargs):
            st = real_stat(path, *args, **kwargs)
            if os.fspath(path) == str(out):
                return os.stat_result((st.st_mode, st.st_ino, st.st_dev + 1, *tuple(st)[3:]))
            return st
        monkeypatch.setattr(os, "stat", stat)

    def no_work(*args, **kwargs):
        raise AssertionError("tokenizer work started")
    monkeypatch.setattr(prepare_module, "build_tokenizer", no_work)
    for force in (False, True):
        with pytest.raises(UserError, match=rf"--out {out} is a mount point .*pass a subfolder, e.g. --out "
                                            rf"{out / 'out'}") as e:
            prepare([source], "char", out, workers=1, force=force)
        assert "\n" not in str(e.value)
    assert list(out.iterdir()) == [] and leftovers(tmp_path) == []


@pytest.mark.usefixtures("hard_timeout")
@pytest.mark.parametrize("workers", [1, 2])
def test_interrupt_leaves_nothing_and_keeps_the_old_data(tmp_path, monkeypatch, workers):
    from gptforge.data import shards

    source = str(write_jsonl(tmp_path / "d.jsonl", documents(200)))
    out = tmp_path / "out"
    prepare([source], "char", out, workers=1, val_fraction=0)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    calls = {"n": 0}
    original = shards.ShardWriter.write

    def interrupted(self, tokens):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        original(self, tokens)

    monkeypatch.setattr(shards.ShardWriter, "write", interrupted)
    import gptforge.data.prepare as prepare_module
    monkeypatch.setattr(prepare_module, "TASK_CHARS", 2000)
    with pytest.raises(KeyboardInterrupt):
        prepare([source], "char", out, workers=workers, val_fraction=0, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert leftovers(tmp_path) == []
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        prepare([source], "char", tmp_path / "new", workers=workers, val_fraction=0)
    assert not (tmp_path / "new").exists() and leftovers(tmp_path) == []


def run_cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "gptforge", "prepare", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    result = run_cli(str(tmp_path / "nope.txt"), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gptforge prepare: error: ") and "nope.txt" in lines[0]
    assert not (tmp_path / "out").exists()


def test_cli_sigterm_after_the_output_is_in_place_does_not_say_unchanged(tmp_path, monkeypatch, capsys):
    """The final renames hold SIGTERM back, so it can be handled just after them, when --out is the new data."""
    import gptforge.data.prepare as prepare_module
    from gptforge.cli import main
    from gptforge.commands.prepare import Terminated

    def finished_then_terminated(sources, tokenizer, out, **kwargs):
        Path(out).mkdir()
        raise Terminated
    monkeypatch.setattr(prepare_module, "prepare", finished_then_terminated)
    assert main(["prepare", "d.jsonl", "--out", str(tmp_path / "out")]) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "is unchanged" not in err and f"{tmp_path / 'out'} is complete" in err


def test_cli_prepares(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", ["some text", "more text"])
    result = run_cli("d.jsonl", "--tokenizer", "char", "--out", "out", "--quiet", "--workers", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "prepared out: 2 documents" in result.stdout
    assert read_manifest(tmp_path / "out")["counts"]["documents"] == 2


def test_cli_skips_malformed_lines_and_replaces_lone_surrogates(tmp_path):
    """One bad line in a corpus costs that line, not the run; a lone surrogate becomes U+FFFD (issue 10 #8, #13)."""
    from gptforge.tokenizer import load_tokenizer

    (tmp_path / "d.jsonl").write_text('{"text": "good one"}\n{"text": broken\n{"text": "lone \\ud800 here"}\n')
    result = run_cli("d.jsonl", "--tokenizer", "char", "--out", "out", "--quiet", "--workers", "1",
                     "--val-fraction", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    counts = read_manifest(tmp_path / "out")["counts"]
    assert counts["documents"] == 2 and counts["skipped_records"] == 1 and counts["lone_surrogates"] == 1
    assert counts["skipped_record_examples"] == ["d.jsonl:2: not valid JSON (Expecting value); skipped"]
    assert counts["lone_surrogate_examples"] == ["d.jsonl:3: 1 lone surrogate(s) replaced by U+FFFD"]
    assert "warning: skipped 1 malformed record(s) (first: d.jsonl:2: not valid JSON" in result.stdout
    assert "warning: replaced 1 lone surrogate(s) by U+FFFD (first: d.jsonl:3:" in result.stdout
    tokenizer = load_tokenizer(tmp_path / "out" / "tokenizer")
    eot = tokenizer.eot_id
    assert split_tokens(tmp_path / "out")["train"].tolist() == \
        tokenizer.encode("good one") + [eot] + tokenizer.encode("lone \ufffd here") + [eot]


def test_cli_source_with_no_usable_record_is_one_line_and_leaves_nothing(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"body": "x"}\nnot json\n')
    result = run_cli("d.jsonl", "--tokenizer", "char", "--out", "out", "--quiet", "--workers", "1", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["gptforge prepare: error: source d.jsonl: no usable records (2 skipped; first: d.jsonl:1: no "
                     "field 'text' (found: body); choose one with --text-field); fix the file or choose the text "
                     "field with --text-field"]
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def make_long_line(path, megabytes):
    block = ("lorem ipsum dolor sit amet " * 40_000)[:1 << 20].encode()
    with open(path, "wb") as f:
        for _ in range(megabytes):
            f.write(block)
    return len(block) * megabytes


def test_long_single_line(tmp_path):
    size = make_long_line(tmp_path / "line.txt", 8)
    manifest = prepare([str(tmp_path / "line.txt")], "char", tmp_path / "out", workers=1, val_fraction=0.1)
    assert manifest["counts"]["tokens"] == size + 1 and manifest["counts"]["documents"] == 1


@pytest.mark.slow
def test_100mb_single_line_in_flat_memory(tmp_path):
    size = make_long_line(tmp_path / "line.txt", 100)
    result = run_cli("line.txt", "--tokenizer", "char", "--out", "out", "--quiet", "--workers", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert read_manifest(tmp_path / "out")["counts"]["tokens"] == size + 1
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # largest single process
    assert peak_mb < 700, f"peak RSS {peak_mb:.0f} MB for a 100 MB line"


# ---- owning --out: a lock, stale temporaries, SIGTERM (issue 10 #3, #11) ------------------------------------

HOLD_OUTPUT = """
import sys, time
from pathlib import Path
from gptforge.data.prepare import prepared_output
with prepared_output(Path(sys.argv[1]), False) as tmp:
    (tmp / "partial.bin").write_bytes(b"x" * 100)
    print(tmp.name, flush=True)
    time.sleep(60)
"""


def test_second_prepare_into_the_same_out_is_refused_then_cleans_up_after_a_kill(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", ["some text", "more text"])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_OUTPUT, str(tmp_path / "out")], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        tmp_name = holder.stdout.readline().strip()
        assert tmp_name.startswith(".tmp-out.")
        result = run_cli("d.jsonl", "--tokenizer", "char", "--out", "out", "--quiet", "--workers", "1", cwd=tmp_path)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            f"gptforge prepare: error: --out out: in use by another gptforge process (PID {holder.pid}); wait for "
            f"it to finish or stop it, or choose another --out"]
        assert not (tmp_path / "out").exists()
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock, the temporary stays behind
        holder.wait()
    assert leftovers(tmp_path) == [tmp_name]
    result = run_cli("d.jsonl", "--tokenizer", "char", "--out", "out", "--quiet", "--workers", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "removed 1 temporary director(ies) left by an interrupted prepare into out" in result.stderr
    assert leftovers(tmp_path) == [] and read_manifest(tmp_path / "out")["counts"]["documents"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "out"]  # the lock file went too


SLOW_PREPARE = """
import sys, time
import signal
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if the tests run in the background
import gptforge.data.prepare as p
original = p.encode_task
def slow(task, tokenizer=None):
    time.sleep(0.2)
    return original(task, tokenizer)
p.encode_task = slow
p.TASK_CHARS = 2000
import gptforge.data.chat_prepare as c
chat_original = c.encode_conversations
def slow_chat(chunk, tokenizer=None):
    time.sleep(0.2)
    return chat_original(chunk, tokenizer)
c.encode_conversations = slow_chat
c.CHUNK = 4
from gptforge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def session_processes(sid):
    """Live processes of session `sid` (the prepare and any worker it forked), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, _, session = stat.read_text().rsplit(")", 1)[1].split()[:4]
        except (OSError, ValueError):
            continue
        if int(session) == sid and state != "Z":
            found.append(int(stat.parent.name))
    return sorted(found)


@contextlib.contextmanager
def slow_prepare(tmp_path, chat=False):
    """`prepare --workers 2` (`--chat` if `chat`) in its own session, yielded once its workers are writing the
    first shard; the session is SIGKILLed on the way out, so a failing test never leaves a process behind."""
    if chat:
        from gptforge.tokenizer import CharTokenizer

        CharTokenizer.train(["abcdefghijklmnopqrstuvwxyz ?!\n"]).save(tmp_path / "tok")
        turns = [{"role": "user", "content": "how are you?"}, {"role": "assistant", "content": "fine"}]
        write_jsonl(tmp_path / "c.jsonl", [turns] * 200, field="messages")
        command = ["c.jsonl", "--chat", "--tokenizer", "tok"]
    else:
        write_jsonl(tmp_path / "d.jsonl", documents(200))
        command = ["d.jsonl", "--tokenizer", "char"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_PREPARE, "prepare", *command, "--out", "out", "--quiet",
                             "--workers", "2"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".tmp-out.*/train_000000.bin")):  # the workers are tokenizing
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        assert len(session_processes(proc.pid)) == 3  # the prepare and its 2 workers
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="counts processes through /proc")
@pytest.mark.parametrize("signum, whole_group, chat", [
    (signal.SIGTERM, False, False), (signal.SIGTERM, True, False), (signal.SIGINT, False, False),
    (signal.SIGINT, True, False), (signal.SIGTERM, True, True), (signal.SIGINT, True, True)],
    ids=["SIGTERM-parent", "SIGTERM-group", "SIGINT-parent", "SIGINT-group", "chat-SIGTERM-group",
         "chat-SIGINT-group"])
def test_a_signal_is_a_prompt_clean_exit_that_leaves_nothing(tmp_path, whole_group, signum, chat):
    """multiprocessing.Pool hung here now and then: workers dead of the group's SIGTERM were replaced by
    fresh ones that missed it, and Pool.terminate() waited on the task-queue lock one of them held."""
    inputs = ["c.jsonl", "tok"] if chat else ["d.jsonl"]
    with slow_prepare(tmp_path, chat) as proc:
        if whole_group:  # as Slurm, `kill -TERM -PGID` and a terminal's Ctrl-C do: the workers get it too
            os.killpg(proc.pid, signum)
        else:  # as `kill PID` and docker stop do
            proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=30)
        left = session_processes(proc.pid)
    assert proc.returncode == EXIT_INTERRUPTED  # as train and sft, for SIGTERM as for Ctrl-C
    said = "terminated (SIGTERM); out is unchanged" if signum == signal.SIGTERM else "interrupted"
    assert stderr.strip().splitlines() == [f"gptforge prepare: {said}"], stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == inputs
    assert left == []  # no worker outlived the prepare


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="counts processes through /proc")
def test_a_worker_killed_from_outside_is_one_line_not_a_hang(tmp_path):
    """The out-of-memory killer's SIGKILL to one worker: multiprocessing.Pool lost its task and waited forever."""
    with slow_prepare(tmp_path) as proc:
        victim = max(session_processes(proc.pid))  # a worker (forked after the prepare)
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=30)
        left = session_processes(proc.pid)
    assert proc.returncode == 2
    assert stderr.strip().splitlines() == [
        f"gptforge prepare: error: tokenizer worker process {victim} was killed by SIGKILL without finishing its "
        "work; if memory ran out, use fewer --workers"], stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"] and left == []


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="counts processes through /proc")
@pytest.mark.usefixtures("hard_timeout")
def test_a_parallel_prepare_leaves_no_process_behind(tmp_path, monkeypatch):
    import gptforge.data.prepare as prepare_module

    monkeypatch.setattr(prepare_module, "TASK_CHARS", 2000)  # many tasks in flight, finishing out of order
    docs = documents(200)
    source = str(write_jsonl(tmp_path / "d.jsonl", docs))
    before = live_children()
    prepare([source], "char", tmp_path / "two", workers=2, val_fraction=0.2)
    assert live_children() == before
    prepare([source], "char", tmp_path / "one", workers=1, val_fraction=0.2)
    two, one = split_tokens(tmp_path / "two"), split_tokens(tmp_path / "one")
    assert all(np.array_equal(two[name], one[name]) for name in ("train", "val")) and one["val"].size


@pytest.mark.parametrize("name, content, documents", [
    ("a.txt", "def f(x):\n    return x\n", 1),
    ("a.jsonl", '{"text": "one"}\n{"text": "two"}\n', 2),
])
def test_a_byte_order_mark_is_not_text_and_costs_no_record(tmp_path, name, content, documents):
    from gptforge.tokenizer import load_tokenizer
    (tmp_path / name).write_bytes("\ufeff".encode() + content.encode())
    manifest = prepare([str(tmp_path / name)], "char", tmp_path / "out", val_fraction=0, workers=1)
    assert manifest["counts"]["documents"] == documents and manifest["warnings"] == []
    text = load_tokenizer(tmp_path / "out" / "tokenizer").decode(split_tokens(tmp_path / "out")["train"].tolist())
    assert "\ufeff" not in text and text.startswith("def f" if name.endswith(".txt") else "one")
