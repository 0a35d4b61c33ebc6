"""Shared test fixtures: tiny configs, a small text fixture, and GPT-2's ranks found the way users find them.

The suite is self-contained: it reads nothing outside the repository. Text comes from `tests/data/`
(see its README); GPT-2's BPE ranks are looked up as the product looks them up (`$GPTFORGE_GPT2_RANKS`,
then the cache `$GPTFORGE_CACHE` or `~/.cache/gptforge`), and when absent the `gpt2_ranks` fixture runs
`gptforge tokenizer fetch-gpt2` once (through pip, into the cache), so the next session finds them.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
#: ~40 KB: Shakespeare (public domain) plus a paragraph written for the tests with digits, tabs, accents,
#: non-Latin scripts and emoji.
TEXT_FIXTURE = TESTS / "data" / "shakespeare.txt"

torch.set_num_threads(min(2, torch.get_num_threads()))


def fixture_text(min_chars: int = 0) -> str:
    """The text fixture, repeated whole until it is at least `min_chars` long."""
    text = TEXT_FIXTURE.read_text(encoding="utf-8")
    return text * max(1, -(-min_chars // len(text)))


def _find_gpt2_ranks() -> Path | None:
    """The ranks file the product would use offline, or None (never downloads)."""
    from gptforge.errors import UserError
    from gptforge.tokenizer.gpt2 import find_gpt2_ranks

    try:
        return find_gpt2_ranks(allow_download=False)
    except UserError:
        return None


def _pin_gpt2_ranks(path: Path) -> None:
    # Tests that point HOME or GPTFORGE_CACHE elsewhere (and their subprocesses) still find the same file.
    from gptforge.tokenizer.gpt2 import ENV_RANKS
    os.environ[ENV_RANKS] = str(path)


_ranks = _find_gpt2_ranks()
if _ranks is not None:
    _pin_gpt2_ranks(_ranks)


@pytest.fixture(autouse=True, scope="session")
def _own_quantized_cache(tmp_path_factory):
    """The quantized weights a test's `--quantize` stores (gptforge.generation.quantized_cache) go to a folder
    of this session's own, never the user's cache; commands the tests spawn inherit it."""
    from gptforge.generation.quantized_cache import ENV

    os.environ[ENV] = str(tmp_path_factory.mktemp("quantized-cache"))
    yield
    del os.environ[ENV]


@pytest.fixture(autouse=True)
def _empty_working_directory(tmp_path_factory, monkeypatch):
    """Every test (and every command it spawns) starts in an empty directory of its own, so what the user's
    checkout holds (the README's main job leaves data/pystdlib, data/pystdlib-qa and runs/ in it) can never
    change a result, and no test can write into the checkout by a relative path."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(autouse=True)
def _collectable_after_each_test():
    """sample and chat freeze the collector's objects (gc.freeze: a CLI process keeps them until exit); in the
    one long test process that would keep every earlier test's garbage alive, so each test gives them back."""
    yield
    gc.unfreeze()


@pytest.fixture
def tiny_config():
    from gptforge.config import ModelConfig
    return ModelConfig(vocab_size=101, block_size=32, n_layer=2, n_head=2, n_embd=16)


@pytest.fixture(scope="session")
def gpt2_ranks() -> Path:
    """A verified gpt2.tiktoken: found where users keep it, else fetched once per machine through pip."""
    path = _find_gpt2_ranks()
    if path is None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run([sys.executable, "-m", "gptforge", "tokenizer", "fetch-gpt2"], capture_output=True,
                              text=True, env=env, timeout=900)
        path = _find_gpt2_ranks()
        if path is None:
            reason = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            pytest.skip(f"GPT-2 ranks unavailable: `gptforge tokenizer fetch-gpt2` failed ({reason})")
    _pin_gpt2_ranks(path)
    return path


@pytest.fixture
def tiny_run(tmp_path) -> Path:
    """A run as the trainer leaves it, written by the trainer's own checkpoint and metrics writers:
    config.json, a char tokenizer/, checkpoints at steps 100, 200, 300 (the newest then damaged; step N has
    N * 512 tokens), train loss 4 - N/100 at each and val loss 4.5 - N/100 at 100 and 200."""
    import dataclasses
    import json

    from gptforge.config import ModelConfig, RunConfig
    from gptforge.model import GPT
    from gptforge.tokenizer import CharTokenizer
    from gptforge.training.checkpoint import save_checkpoint
    from gptforge.training.metrics import MetricsLogger

    tok = CharTokenizer.train(["hello world, the quick brown fox"])
    model_config = ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)
    config = RunConfig()
    config = dataclasses.replace(config, model=model_config,
                                 train=dataclasses.replace(config.train, max_steps=300, out_dir=str(tmp_path / "run")),
                                 data=dataclasses.replace(config.data, path="data/mine"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    tok.save(run / "tokenizer")
    torch.manual_seed(0)
    model = GPT(model_config)
    optimizer = torch.optim.AdamW(model.parameters())
    logger = MetricsLogger(run)
    for step in (100, 200, 300):
        save_checkpoint(run, step, model, optimizer, {"step": step, "tokens": step * 512})
        logger.log({"step": step, "tokens": step * 512, "loss": 4.0 - step / 100, "lr": 1e-3})
        if step < 300:
            logger.log({"step": step, "tokens": step * 512, "val_loss": 4.5 - step / 100, "val_ppl": 1.0})
    (run / "checkpoints" / "step_300" / "model.safetensors").write_bytes(b"truncated")
    return run


def _sigint_as_in_a_terminal() -> None:
    """Ctrl-C reaches a spawned command as it would at a terminal. A shell that runs the tests in the background
    (`pytest &`, some CI runners) leaves SIGINT ignored; children inherit that through exec, and Python then
    installs no KeyboardInterrupt handler, so the command would never see the test's Ctrl-C."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def terminal():
    """spawn("chat", *args, env=..., prompt="> ") runs `gptforge COMMAND` in a real pseudo-terminal (pexpect)
    and waits for its prompt; every child is closed (killed if need be) when the test ends, pass or fail,
    so a failed terminal test leaves no process behind for later tests to trip over."""
    pexpect = pytest.importorskip("pexpect")
    children = []

    def spawn(command: str, *args: str, env: dict[str, str], prompt: str):
        child = pexpect.spawn(sys.executable, ["-m", "gptforge", command, *args], env=env, encoding="utf-8",
                              timeout=60, dimensions=(50, 200), preexec_fn=_sigint_as_in_a_terminal)
        children.append(child)
        child.expect_exact(prompt)
        return child

    yield spawn
    for child in children:
        child.close(force=True)
