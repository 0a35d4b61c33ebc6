"""`gptforge chat`: one-shot and piped replies, and the interactive loop driven through a real
pseudo-terminal (pexpect): typing, the streamed reply, /commands, readline history, Ctrl-C mid-reply."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from chat_models import chat_tokenizer, random_chat_model, save_chat_checkpoint, scripted_model

from gptforge.chat import ChatSession
from gptforge.generation import SamplingConfig

GREEDY = SamplingConfig(temperature=0, max_new_tokens=512)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny chat model whose greedy replies end after a few dozen characters (see chat_models)."""
    tok = chat_tokenizer("char")
    model = random_chat_model(tok, end_at=list(range(60, 2048, 25)), block_size=2048)
    path = save_chat_checkpoint(tmp_path_factory.mktemp("chat") / "ckpt", model, tok)
    return path, model, tok


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}


def _run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "gptforge", "chat", *args], input=stdin, capture_output=True,
                          text=True, env=_env(), timeout=120)


def _expected(model, tok, *messages, system=None):
    session = ChatSession(model, tok, GREEDY, system=system)
    return [session.ask(m) for m in messages]


def test_one_reply_with_p_and_from_piped_stdin(chat_model):
    path, model, tok = chat_model
    [reply] = _expected(model, tok, "hello there", system="Be brief.")
    assert reply
    proc = _run("--model", path, "--temperature", "0", "--system", "Be brief.", "-p", "hello there")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == reply + "\n"
    piped = _run("--model", path, "--temperature", "0", "--system", "Be brief.", stdin="hello there\n")
    assert piped.returncode == 0 and piped.stdout == proc.stdout


def test_a_base_model_is_one_line_naming_sft(tmp_path):
    from gptforge.tokenizer import CharTokenizer

    base = CharTokenizer.train(["hello world"])
    path = save_chat_checkpoint(tmp_path / "base", random_chat_model(chat_tokenizer("char"), end_at=10), base)
    proc = _run("--model", path, "-p", "hi")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "gptforge sft" in proc.stderr and "Traceback" not in proc.stderr


def test_a_base_model_whose_tokenizer_merely_has_the_markers_is_one_line_naming_sft(tmp_path):
    """`gptforge tokenizer train --special-token '<|im_start|>' ...` gives a base model the markers but no
    chat template: it was never taught to answer, so chat refuses it as it refuses any base model."""
    from gptforge.chat.tokens import CHAT_TOKENS
    from gptforge.tokenizer import CharTokenizer

    base = CharTokenizer.train(["hello world"])
    base.add_special_tokens(CHAT_TOKENS)
    path = save_chat_checkpoint(tmp_path / "base", random_chat_model(chat_tokenizer("char"), end_at=10), base)
    proc = _run("--model", path, "-p", "hi")
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "a base model" in proc.stderr and "gptforge sft" in proc.stderr


def test_an_empty_message_is_one_line(chat_model):
    for args, stdin in ((("-p", ""), None), (("-p", " \n "), None), ((), "\n")):
        proc = _run("--model", chat_model[0], *args, stdin=stdin)
        assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
        assert "empty" in proc.stderr


def test_control_characters_of_a_reply_are_shown_escaped(tmp_path):
    from chat_models import CORPUS
    from gptforge.commands.chat import printable
    assert printable("a\x1b[2Jb\tc\nd\re\x07\x7f\x9b") == "a\\x1b[2Jb\tc\nd\\re\\x07\\x7f\\x9b"
    tok = chat_tokenizer("char", CORPUS + "\x1b")
    escape, end = tok.encode("\x1b")[0], tok.special_tokens["<|im_end|>"]
    prompt = len(ChatSession(scripted_model(tok.vocab_size, {}), tok, GREEDY).prompt_ids("hi"))
    model = scripted_model(tok.vocab_size, {p: escape for p in range(prompt - 1, prompt + 2)} | {prompt + 2: end},
                           block_size=64)
    assert ChatSession(model, tok, GREEDY).ask("hi") == "\x1b" * 3  # the conversation keeps the raw text
    proc = _run("--model", save_chat_checkpoint(tmp_path / "m", model, tok), "--temperature", "0", "-p", "hi")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "\\x1b" * 3 + "\n"


def test_a_huge_message_is_refused_without_encoding_it_whole(chat_model, monkeypatch):
    """A 5 MB message used to be tokenized whole (a BPE: ~1 GB and ~15 s) only to be refused as too long."""
    from gptforge.errors import UserError
    path, model, tok = chat_model
    session = ChatSession(model, tok, GREEDY)
    encoded = []
    original = type(tok)._encode_ordinary
    monkeypatch.setattr(type(tok), "_encode_ordinary", lambda self, text: encoded.append(len(text)) or
                        original(self, text))
    with pytest.raises(UserError, match="too long"):
        session.send("word " * 1_000_000)
    assert max(encoded, default=0) < 100_000


def test_bad_sampling_option_is_one_line(chat_model):
    proc = _run("--model", chat_model[0], "--top-p", "0", "-p", "hi")
    assert proc.returncode == 2 and "--top-p" in proc.stderr and proc.stderr.count("\n") == 1


pexpect = pytest.importorskip("pexpect")


def _reply_of(child):
    """The text printed between the echoed input line and the next prompt."""
    child.expect_exact("\r\n> ")
    return child.before


def test_terminal_conversation_commands_and_history(chat_model, tmp_path, terminal):
    path, model, tok = chat_model
    first, second = _expected(model, tok, "hello", "the fox?")
    [fresh] = _expected(model, tok, "the fox?")
    child = terminal("chat", "--model", path, "--temperature", "0", env=_env(), prompt="> ")
    child.sendline("hello")
    child.expect_exact("hello\r\n")  # the terminal echoes the typed line
    assert _reply_of(child) == first.replace("\n", "\r\n")
    child.sendline("the fox?")
    child.expect_exact("the fox?\r\n")
    assert _reply_of(child) == second.replace("\n", "\r\n")
    child.sendline("/reset")
    child.expect_exact("[new conversation]")
    child.expect_exact("> ")
    child.send("\x1b[A\r")  # readline: up arrow recalls "/reset"; the one before is "the fox?"
    child.expect_exact("[new conversation]")
    child.expect_exact("> ")
    child.send("\x1b[A\x1b[A\r")
    child.expect_exact("the fox?\r\n")
    assert _reply_of(child) == fresh.replace("\n", "\r\n")  # a new conversation: the earlier turns are gone
    child.sendline("/undo")
    child.expect_exact("[last exchange removed]")
    child.sendline("/nonsense")
    child.expect_exact("unknown command /nonsense")
    child.sendline(f"/save {tmp_path / 'talk.jsonl'}")
    child.expect_exact("[saved to")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert json.loads((tmp_path / "talk.jsonl").read_text(encoding="utf-8")) == {"messages": []}


def test_ctrl_c_stops_the_reply_not_the_program_and_ctrl_d_quits(tmp_path, terminal):
    tok = chat_tokenizer("char")
    model = random_chat_model(tok, end_at=100_000, block_size=8192)  # replies only end at --max-new-tokens
    path = save_chat_checkpoint(tmp_path / "ckpt", model, tok)
    child = terminal("chat", "--model", path, "--temperature", "0", "--max-new-tokens", "8000", env=_env(),
                     prompt="> ")
    child.sendline("hello")
    child.expect_exact("hello\r\n")
    child.expect(".{20}")  # the reply is streaming (the terminal's buffer soon blocks the writer: it waits)
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact("> ")  # still running, back at the prompt
    child.sendline("/save " + str(tmp_path / "talk.jsonl"))
    child.expect_exact("[saved to")
    child.expect_exact("> ")
    child.sendintr()  # at the prompt: only clears the line
    child.expect_exact("> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    messages = json.loads((tmp_path / "talk.jsonl").read_text(encoding="utf-8"))["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert 10 <= len(messages[1]["content"]) < 8000  # the part that was shown, not a whole reply
