"""`gptforge prepare --chat` end to end: what it writes, and each bad input as one line, exit 2, nothing
written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gptforge.chat.tokens import encode_chat
from gptforge.data.chat_prepare import prepare_chat
from gptforge.data.shards import open_shard
from gptforge.tokenizer import CharTokenizer, load_tokenizer
from test_data_workers import hard_timeout, live_children  # noqa: F401  (hard_timeout: a fixture)

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
    assert any(":2: only a system message" in e for e in chat["bad_examples"])
    assert any(":3: " in e for e in chat["bad_examples"])
    assert chat["packing"]["rows"] == 1 and chat["packing"]["padding"] == pytest.approx(1 - 2 * len(ids) / 65)
    assert manifest["tokenizer"]["vocab_size"] == tok.vocab_size == load_tokenizer(tok_dir).vocab_size + 2


def _cli(*args, capsys):
    """`gptforge prepare ARGS` in this process (as the CLI runs it): (exit code, stdout, stderr)."""
    from gptforge.cli import main

    capsys.readouterr()
    code = main(["prepare", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("lines, message", [
    ([], "file is empty"),
    (["not json", {"messages": "nope"}, {"prompt": 3, "completion": "x"}], "no usable conversation (3 bad record"),
    ([{"messages": [{"role": "system", "content": "You are helpful."}]}], "only a system message"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, tok_dir, lines, message, capsys):
    src = tmp_path / "c.jsonl"
    src.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    code, _, err = _cli(src, "--chat", "--tokenizer", tok_dir, "--out", tmp_path / "out", "--quiet", capsys=capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and message in err and str(src) in err
    assert not (tmp_path / "out").exists()


def test_format_forced_and_cli_summary(tmp_path, tok_dir, capsys):
    src = _write(tmp_path / "a.jsonl", [ALPACA, ALPACA, GOOD])
    code, out, err = _cli(src, "--chat", "--chat-format", "alpaca", "--tokenizer", tok_dir, "--out",
                          tmp_path / "out", "--val-fraction", "0", "--quiet", "--workers", "1", capsys=capsys)
    assert code == 0, err
    assert "2 conversations (alpaca)" in out and ":3: no 'instruction' field" in out and "padding" in out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="counts processes via /proc")
@pytest.mark.usefixtures("hard_timeout")
def test_parallel_workers_write_what_one_process_writes_and_leave_no_process(tmp_path, tok_dir, monkeypatch):
    import gptforge.data.chat_prepare as chat_prepare

    monkeypatch.setattr(chat_prepare, "CHUNK", 3)  # many chunks in flight, finishing out of order
    words = ["hi", "how are you?", "fine", "what is up", "nothing much", "ok then", "bye!"]
    chats = [{"messages": [{"role": "user", "content": " ".join(words[: 1 + i % 7])},
                           {"role": "assistant", "content": words[(3 * i) % 7] * (1 + i % 5)}]} for i in range(60)]
    src = _write(tmp_path / "c.jsonl", chats)
    before = live_children()
    prepare_chat([str(src)], str(tok_dir), tmp_path / "two", val_fraction=0.2, workers=2, context=64)
    assert live_children() == before
    prepare_chat([str(src)], str(tok_dir), tmp_path / "one", val_fraction=0.2, workers=1, context=64)
    files = sorted(p.name for p in (tmp_path / "one").iterdir() if p.suffix in (".bin", ".npy", ".json"))
    assert len(files) >= 4 and files == sorted(p.name for p in (tmp_path / "two").iterdir()
                                     if p.suffix in (".bin", ".npy", ".json"))
    for name in files:
        if name != "manifest.json":  # it records the time taken
            assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def _chat_tokenizer_of(data):
    return load_tokenizer(data / "tokenizer")


def test_a_tokenizer_directory_named_bpe_something_is_a_directory(tmp_path, capsys, monkeypatch):
    # `--tokenizer bpe8k` names the saved tokenizer in ./bpe8k, not the `bpe:N` spec that would train one
    CharTokenizer.train(["abcdefghijklmnopqrstuvwxyz ?!\n"]).save(tmp_path / "bpe8k")
    monkeypatch.chdir(tmp_path)
    src = _write(tmp_path / "c.jsonl", [GOOD, GOOD])
    code, _, err = _cli(src, "--chat", "--tokenizer", "bpe8k", "--out", tmp_path / "out",
                          "--val-fraction", "0", "--quiet", "--workers", "1", capsys=capsys)
    assert code == 0, err
    assert _chat_tokenizer_of(tmp_path / "out").vocab_size == load_tokenizer(tmp_path / "bpe8k").vocab_size + 2
    for spec in ("bpe:8000", "bpe", "char"):  # the forms that train a tokenizer are still refused
        code, _, err = _cli(src, "--chat", "--tokenizer", spec, "--out", tmp_path / spec, "--quiet", capsys=capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "base model's tokenizer" in err, err
        assert not (tmp_path / spec).exists()


@pytest.mark.filterwarnings("ignore:char tokenizer")  # tiny_run's has no newline
def test_a_checkpoint_path_gives_the_tokenizer_sft_loads_with_it(tiny_run, tmp_path, capsys):
    """`sft --model RUN/checkpoints/step_N` tells a user with other data to `prepare ... --tokenizer` that same
    path: it must work, and give the tokenizer sft then checks the data against."""
    import copy

    from gptforge.chat.tokens import add_chat_tokens
    from gptforge.data.chat_prepare import tokenizer_fingerprint
    from gptforge.training.sft import check_chat_data, load_base

    checkpoint = tiny_run / "checkpoints" / "step_200"
    src = _write(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hello"},
                                                      {"role": "assistant", "content": "the quick brown fox"}]}] * 3)
    code, out, err = _cli(src, "--chat", "--tokenizer", checkpoint, "--out", tmp_path / "data", "--val-fraction",
                          "0", "--quiet", "--workers", "1", capsys=capsys)
    assert code == 0, err
    assert "packing at context 16" in out  # the run's context (its model's block size: seq_len unset)
    base = load_base(str(checkpoint))
    expected = add_chat_tokens(copy.deepcopy(base.tokenizer))
    assert tokenizer_fingerprint(_chat_tokenizer_of(tmp_path / "data")) == tokenizer_fingerprint(expected)
    check_chat_data(str(tmp_path / "data"), base)  # what `gptforge sft` checks: no error


@pytest.mark.filterwarnings("ignore:char tokenizer")  # tiny_run's has no newline
def test_a_hugging_face_directory_gives_the_tokenizer_load_model_finds(tiny_run, tmp_path):
    from gptforge.chat.tokens import add_chat_tokens
    from gptforge.data.chat_prepare import tokenizer_fingerprint
    from gptforge.interop.hf import export_hf
    from gptforge.loading import load_model

    model, tok = load_model(str(tiny_run / "checkpoints" / "step_100"))
    export_hf(model, tok, tmp_path / "hf")
    _, hf_tok = load_model(str(tmp_path / "hf"))
    src = _write(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hello"},
                                                      {"role": "assistant", "content": "world"}]}] * 3)
    manifest = prepare_chat([str(src)], str(tmp_path / "hf"), tmp_path / "data", val_fraction=0, workers=1)
    assert manifest["chat"]["context"] == model.config.block_size
    assert tokenizer_fingerprint(_chat_tokenizer_of(tmp_path / "data")) == \
        tokenizer_fingerprint(add_chat_tokens(hf_tok))


def test_records_with_unhashable_or_non_text_fields_are_counted_and_skipped(tmp_path, tok_dir):
    sharegpt = lambda who: {"conversations": [{"from": who, "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    src = _write(tmp_path / "s.jsonl", [sharegpt("human"), sharegpt(["human"]), sharegpt({"a": 1}),
                                        sharegpt("human"), {"conversations": [{"from": "human", "value": ["hi"]}]}])
    manifest = prepare_chat([str(src)], str(tok_dir), tmp_path / "out", val_fraction=0, workers=1, context=64)
    chat = manifest["chat"]
    assert (chat["records"], chat["conversations"], chat["bad_records"]) == (5, 2, 3)
    assert [e.split(": ", 1)[0].rsplit(":", 1)[1] for e in chat["bad_examples"]] == ["2", "3", "5"]
    assert "turn 0 'from' is list, not a string" in chat["bad_examples"][0]
    assert manifest["splits"]["train"]["conversations"] == 2


@pytest.mark.parametrize("name", ["c.jsonl", "c.json"])
def test_a_byte_order_mark_costs_no_conversation(tmp_path, tok_dir, name):
    src = tmp_path / name
    body = (json.dumps(GOOD) + "\n") * 2 if name.endswith(".jsonl") else json.dumps([GOOD, GOOD])
    src.write_bytes("\ufeff".encode() + body.encode())
    manifest = prepare_chat([str(src)], str(tok_dir), tmp_path / "out", val_fraction=0, workers=1, context=64)
    assert (manifest["chat"]["conversations"], manifest["chat"]["bad_records"]) == (2, 0)


def test_repaired_text_is_warned_about_with_its_file_and_line_as_plain_prepare_does(tmp_path, tok_dir, capsys):
    from gptforge.data.prepare import prepare
    src = tmp_path / "c.jsonl"
    good = json.dumps(GOOD).encode()
    src.write_bytes(good + b"\n" + good.replace(b"hi", b"h\xe9") + b"\n" + good.replace(b"hi", b"\\ud800") + b"\n")
    chat = prepare_chat([str(src)], str(tok_dir), tmp_path / "chat", val_fraction=0, workers=1, context=64)
    (tmp_path / "plain").mkdir()
    text = tmp_path / "plain" / "c.jsonl"  # the same lines as plain-text records
    text.write_bytes(b'{"text": "a"}\n{"text": "h\xe9"}\n{"text": "\\ud800"}\n')
    plain = prepare([str(text)], "char", tmp_path / "out", val_fraction=0, workers=1)
    repaired = [w for w in chat["warnings"] if w.startswith("replaced")]
    assert repaired == [f"replaced 1 invalid UTF-8 sequence(s) (first: {src}:2: 1 invalid UTF-8 sequence(s) "
                        "replaced by U+FFFD)",
                        f"replaced 1 lone surrogate(s) by U+FFFD (first: {src}:3: 1 lone surrogate(s) replaced by "
                        "U+FFFD)"]
    assert [w for w in plain["warnings"] if w.startswith("replaced")] == [
        w.replace(str(src), str(text)) for w in (repaired[0].replace("(s) (first", "(s) in 1 file(s) (first"),
                                                  repaired[1])]
