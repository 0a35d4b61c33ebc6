"""`gptforge sample`'s interactive mode through a real pseudo-terminal (pexpect): samples stream, readline
recalls earlier prompts, Ctrl-C stops only the sample being written, Ctrl-D quits."""

from __future__ import annotations

import os

import pytest
from chat_models import chat_tokenizer, random_chat_model, save_chat_checkpoint

from gptforge.generation import SamplingConfig, generate_text

pexpect = pytest.importorskip("pexpect")


def _spawn(terminal, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    return terminal("sample", *args, env=env, prompt="prompt> ")


def test_interactive_sample_streams_recalls_history_and_survives_ctrl_c(tmp_path, terminal):
    tok = chat_tokenizer("char")
    model = random_chat_model(tok, end_at=100_000, block_size=8192)  # never ends by itself
    path = save_chat_checkpoint(tmp_path / "ckpt", model, tok)
    expected = generate_text(model, tok, "hello", SamplingConfig(temperature=0, max_new_tokens=12))[0]

    child = _spawn(terminal, "--model", path, "--temperature", "0", "--max-new-tokens", "12")
    child.sendline("hello")
    child.expect_exact("hello\r\n")  # the terminal's echo of the typed line
    child.expect_exact("\r\nprompt> ")
    assert child.before == ("hello" + expected).replace("\n", "\r\n")
    child.send("\x1b[A\r")  # up arrow: readline recalls "hello"
    child.expect_exact("hello\r\n")
    child.expect_exact("\r\nprompt> ")
    assert child.before == ("hello" + expected).replace("\n", "\r\n")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    child = _spawn(terminal, "--model", path, "--temperature", "0", "--max-new-tokens", "8000")
    child.sendline("hello")
    child.expect_exact("hello\r\n")
    child.expect("hello.{10}")  # the sample is being written
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact("prompt> ")  # the program goes on
    child.sendintr()  # at the prompt: only a new line
    child.expect_exact("prompt> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
