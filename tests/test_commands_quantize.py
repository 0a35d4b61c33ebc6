"""--quantize int8|int4 (commands/_options.py), shared by sample, chat, serve and eval: each command quantizes
the model it runs, eval scores the quantized model itself, and a device other than the CPU is one line."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from chat_models import chat_tokenizer, random_chat_model, save_chat_checkpoint

import gptforge.generation
from gptforge.cli import main
from gptforge.evals.runner import run_tasks
from gptforge.generation import SamplingConfig, generate_text, prepare_for_decoding
from gptforge.generation.quantize import QuantizedLinear
from gptforge.loading import load_model, resolve_model_source


@pytest.fixture
def prepared(monkeypatch):
    """The models the commands prepare: (quantize, model, weights_file) as each was prepared."""
    seen = []
    real = gptforge.generation.prepare_for_decoding

    def spy(model, quantize=None, compile=False, weights_file=None):
        seen.append((quantize, real(model, quantize=quantize, compile=compile, weights_file=weights_file),
                     weights_file))
        return model

    monkeypatch.setattr(gptforge.generation, "prepare_for_decoding", spy)
    return seen


def test_sample_quantizes_and_generates_what_the_api_does(tiny_run, capsys, prepared):
    argv = ["sample", "--model", str(tiny_run), "hello", "--max-new-tokens", "10", "--temperature", "0",
            "--seed", "1", "--no-stop-at-eot", "--json", "--quantize", "int4"]
    assert main(argv) == 0
    text = json.loads(capsys.readouterr().out)["samples"][0]["text"]
    (kind, model, weights_file), = prepared
    assert kind == "int4" and isinstance(model.lm_head, QuantizedLinear) and model.lm_head.kind == "int4"
    # the file it loaded, so the quantized copy is cached for the next run (test_generation_quantized_cache)
    assert weights_file == resolve_model_source(str(tiny_run)).weights and weights_file.is_file()
    expected_model, tokenizer = load_model(str(tiny_run))
    prepare_for_decoding(expected_model, quantize="int4")
    config = SamplingConfig(max_new_tokens=10, temperature=0.0, stop_at_eot=False)
    assert text == generate_text(expected_model, tokenizer, ["hello"], config, seed=1)[0]


def test_chat_quantizes(tmp_path, capsys, prepared):
    tok = chat_tokenizer()
    spec = save_chat_checkpoint(tmp_path / "chat", random_chat_model(tok, end_at=30), tok)
    assert main(["chat", "--model", spec, "-p", "hi", "--max-new-tokens", "4", "--quantize", "int8"]) == 0
    assert [(kind, weights_file.parent) for kind, _, weights_file in prepared] == [("int8", tmp_path / "chat")]
    assert isinstance(prepared[0][1].transformer.h[0].mlp.c_fc, QuantizedLinear)


def test_eval_scores_the_quantized_model(tiny_run, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world, the quick brown fox " * 8)
    losses = {}
    for kind in (None, "int4"):
        out = tmp_path / f"{kind}.json"
        quantize = ["--quantize", kind] if kind else []
        assert main(["eval", "--model", str(tiny_run), "--task", "val", "--data", str(text), "--json", str(out),
                     "--no-progress", *quantize]) == 0
        doc = json.loads(out.read_text())
        assert doc["quantize"] == kind and doc["device"] == "cpu"
        losses[kind] = doc["tasks"]["val"]["metrics"]["loss"]
    model, tokenizer = load_model(str(tiny_run))
    quantized = prepare_for_decoding(copy.deepcopy(model), quantize="int4")
    (expected,) = run_tasks(quantized, tokenizer, ["val"], {"val": str(text)})
    assert losses["int4"] == pytest.approx(expected.metrics["loss"], rel=1e-6)
    assert losses["int4"] != pytest.approx(losses[None], rel=1e-6)


@pytest.mark.parametrize("command", ["sample", "chat", "serve", "eval"])
def test_quantize_off_the_cpu_is_one_line(command, tmp_path, capsys, monkeypatch):
    import gptforge.devices

    monkeypatch.setattr(gptforge.devices, "resolve_device", lambda name: torch.device("cuda"))
    argv = {"sample": ["sample", "--model", "char-small", "hi"], "chat": ["chat", "--model", "x", "-p", "hi"],
            "serve": ["serve", "--model", "char-small"],
            "eval": ["eval", "--model", "char-small", "--task", "val", "--data", str(tmp_path)]}[command]
    assert main([*argv, "--quantize", "int8", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--quantize int8: the int8/int4 kernels run on CPU only" in err[0]
