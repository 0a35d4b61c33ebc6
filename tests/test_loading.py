"""`load_model`'s tokenizer lookup: the run's own tokenizer is found, an unrelated ./tokenizer is not."""

from __future__ import annotations

import pytest
import torch

from gptforge.config import ModelConfig
from gptforge.loading import find_tokenizer_dir, load_model
from gptforge.model import GPT
from gptforge.tokenizer import CharTokenizer
from gptforge.weights import save_weights


@pytest.fixture
def weights_and_tokenizer():
    tok = CharTokenizer.train(["abcdef ghij"])
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=16)), tok


def test_run_layout_finds_the_run_tokenizer(tmp_path, monkeypatch, weights_and_tokenizer):
    model, tok = weights_and_tokenizer
    run = tmp_path / "runs" / "r1"
    step = run / "checkpoints" / "step_10"
    save_weights(model, step / "model.safetensors")
    tok.save(run / "tokenizer")
    assert find_tokenizer_dir(step) == run / "tokenizer"
    _, loaded = load_model(str(step))
    assert loaded is not None and loaded.encode("abc") == tok.encode("abc")
    _, from_file = load_model(str(step / "model.safetensors"))
    assert from_file is not None and from_file.vocab_size == tok.vocab_size
    monkeypatch.chdir(run / "checkpoints")  # a relative step_10 still knows its parent is checkpoints/
    assert find_tokenizer_dir(step.relative_to(run / "checkpoints")).resolve() == (run / "tokenizer").resolve()


def test_own_tokenizer_wins_and_stray_one_is_ignored(tmp_path, monkeypatch, weights_and_tokenizer):
    model, tok = weights_and_tokenizer
    monkeypatch.chdir(tmp_path)
    CharTokenizer.train(["xyz"]).save(tmp_path / "tokenizer")  # unrelated, in the working directory
    save_weights(model, tmp_path / "ckpt" / "model.safetensors")
    save_weights(model, tmp_path / "sub" / "x.safetensors")
    assert find_tokenizer_dir(tmp_path / "ckpt") is None
    assert load_model("ckpt")[1] is None
    assert load_model("sub/x.safetensors")[1] is None
    tok.save(tmp_path / "ckpt" / "tokenizer")
    tok.save(tmp_path / "sub" / "tokenizer")
    assert load_model("ckpt")[1].encode("abc") == tok.encode("abc")
    assert load_model("sub/x.safetensors")[1].encode("abc") == tok.encode("abc")
