"""`gptforge prepare --chat` end to end: what it writes, and each bad input as one line, exit 2, nothing
written."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from gptforge.chat.tokens import encode_chat
from gptforge.data.chat_prepare import prepare_chat
from gptforge.data.shards import open_shard
from gptforge.tokenizer import CharTokenizer, load_tokenizer

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
ALPACA = {"instruction": "say", "input": "", "output": "ok"}


@pytest.fixture
def tok_dir(tmp_path):
    CharTokenizer.train(["abcdefghijklmnopqrstuvwxyz ?!\n"]).save(tmp_path / "tok")
    return tmp_path / "tok"


def _write(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def test_writes_tokens_masks_and_lengths_and_reports_bad_lines(tmp_path, tok_dir, capsys):
    src = _write(tmp_path / "c.jsonl", [GOOD, {"messages": [{"role": "system", "content": "only"}]}, "{oops", GOOD])
    manifest = prepare_chat([str(src)], str(tok_dir), tmp_path / "out", val_fraction=0, workers=1, context=64)
    out = tmp_path / "out"
    tok = load_tokenizer(out / "tokenizer")
    ids, mask = encode_chat(tok, GOOD["messages"])
    assert np.array_equal(open_shard(out / "train_000000.bin"), np.array(ids * 2))
    assert np.array_equal(open_shard(out / "train_mask_000000.bin"), np.concatenate([mask, mask]))
    assert np.load(out / "train_conversations.npy").tolist() == [[len(ids), int(np.argmax(mask))]] * 2
    chat = manifest["chat"]
    assert manifest["kind"] == "chat" and (chat["records"], chat["conversations"], chat["bad_records"]) == (4, 2, 2)
    assert any("line 2: only a system message" in e for e in chat["bad_examples"])
    assert any("line 3: not valid JSON" in e for e in chat["bad_examples"])
    assert chat["packing"]["rows"] == 1 and chat["packing"]["padding"] == pytest.approx(1 - 2 * len(ids) / 65)
    assert manifest["tokenizer"]["vocab_size"] == tok.vocab_size == load_tokenizer(tok_dir).vocab_size + 2


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "gptforge", "prepare", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize("lines, message", [
    ([], "file is empty"),
    (["not json", {"messages": "nope"}, {"prompt": 3, "completion": "x"}], "no usable conversation, 3 bad record"),
    ([{"messages": [{"role": "system", "content": "You are helpful."}]}], "only a system message"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, tok_dir, lines, message):
    src = tmp_path / "c.jsonl"
    src.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    result = _cli(src, "--chat", "--tokenizer", tok_dir, "--out", tmp_path / "out", "--quiet", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr and str(src) in result.stderr
    assert not (tmp_path / "out").exists()


def test_format_forced_and_cli_summary(tmp_path, tok_dir):
    src = _write(tmp_path / "a.jsonl", [ALPACA, ALPACA, GOOD])
    result = _cli(src, "--chat", "--chat-format", "alpaca", "--tokenizer", tok_dir, "--out", tmp_path / "out",
                  "--val-fraction", "0", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "2 conversations (alpaca)" in result.stdout and "line 3: no 'instruction' field" in result.stdout
    assert "padding" in result.stdout
