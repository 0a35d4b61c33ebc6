"""`gptforge eval` end to end: a checkpoint with its tokenizer, several tasks, the JSON file; bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from gptforge.cli import main
from gptforge.config import ModelConfig
from gptforge.model import GPT
from gptforge.weights import save_weights

HS = {"activity_label": "Cooking", "ctx_a": "A man cracks eggs into a bowl.", "ctx_b": "he",
      "endings": ["whisks them.", "flies away.", "sings loudly.", "reads a book."], "label": 0}


def test_cli_runs_several_tasks_and_writes_json(tmp_path, gpt2_ranks, capsys):
    from gptforge.evals.runner import run_tasks
    from gptforge.tokenizer import get_tokenizer
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50257, block_size=64, n_layer=1, n_head=2, n_embd=16)).eval()
    tok = get_tokenizer("gpt2")
    ckpt = tmp_path / "ckpt"
    save_weights(model, ckpt / "model.safetensors")
    tok.save(ckpt / "tokenizer")
    hs = tmp_path / "hs.jsonl"
    hs.write_text(json.dumps(HS) + "\n" + json.dumps(dict(HS, label=1)) + "\n")
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    out = tmp_path / "r.json"
    rc = main(["eval", "--model", str(ckpt), "--task", "hellaswag", "--task", "val", "--data", f"hellaswag={hs}",
               "--data", f"val={text}", "--json", str(out), "--batch-size", "3"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "hellaswag  acc_norm" in printed and "val        bpb" in printed
    doc = json.loads(out.read_text())
    expected = run_tasks(model, tok, ["hellaswag", "val"], {"hellaswag": str(hs), "val": str(text)})
    for result in expected:
        for name, value in result.flat_metrics().items():
            assert doc["metrics"][name] == pytest.approx(value, rel=1e-6)
    assert doc["model"] == str(ckpt) and doc["tasks"]["hellaswag"]["n"] == 2


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "gptforge", "eval", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = run_cli("--model", "gpt2", "--task", "hellaswag", "--data", str(empty))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert f"hellaswag data file {empty} is empty" in proc.stderr


def test_cli_several_tasks_need_task_prefixed_data(tmp_path):
    proc = run_cli("--model", "gpt2", "--task", "hellaswag", "--task", "lambada", "--data", str(tmp_path))
    assert proc.returncode == 2 and "--data TASK=PATH" in proc.stderr
