"""`gptforge info --model`: what a run, checkpoint, weights file or preset is, from files the trainer's own
writers produced, against the values written into them."""

from __future__ import annotations

import json


from gptforge.cli import main
from gptforge.config import ModelConfig
from gptforge.describe import describe_model
from gptforge.model import GPT


def test_a_run_is_described_from_its_files(tiny_run, capsys):
    info = describe_model(str(tiny_run))
    assert info["kind"] == "run" and info["parameters"] == GPT(ModelConfig(**info["config"])).num_parameters()
    assert info["tokenizer"]["kind"] == "char" and info["data"] == "data/mine" and info["max_steps"] == 300
    assert info["checkpoint"] == str(tiny_run / "checkpoints" / "step_200")
    assert (info["step"], info["tokens"]) == (200, 200 * 512)
    assert info["last"] == {"loss": {"value": 1.0, "step": 300}, "val_loss": {"value": 2.5, "step": 200}}
    rows = {row["step"]: row for row in info["checkpoints"]}
    assert sorted(rows) == [100, 200, 300]
    assert rows[100]["problem"] is None and not rows[100]["newest_valid"]
    assert rows[200]["newest_valid"] and rows[300]["problem"] == "model.safetensors does not match its checksum " \
                                                                  "(truncated or damaged)"
    assert capsys.readouterr().err == ""  # the damaged checkpoint is in the listing, not a stderr warning

    assert main(["info", "--model", str(tiny_run)]) == 0
    text = capsys.readouterr().out
    assert "training run" in text and "1 layers, d_model 16, 2 heads x 8" in text
    assert "step 200, 102,400 tokens (stops at train.max_steps 300)" in text
    assert "train 1.0000 (step 300), val 2.5000 (step 200)" in text
    assert "step_300" in text and "unusable: model.safetensors does not match its checksum" in text
    assert main(["info", "--model", str(tiny_run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(info))


def test_a_run_without_checkpoints(tiny_run, capsys):
    import shutil
    shutil.rmtree(tiny_run / "checkpoints")
    (tiny_run / "checkpoints").mkdir()
    info = describe_model(str(tiny_run))
    assert info["checkpoint"] is None and info["checkpoints"] == []
    assert main(["info", "--model", str(tiny_run)]) == 0
    assert "no valid checkpoint yet" in capsys.readouterr().out


def test_checkpoint_weights_file_and_preset(tiny_run):
    step = tiny_run / "checkpoints" / "step_100"
    checkpoint = describe_model(str(step))
    assert checkpoint["kind"] == "checkpoint" and (checkpoint["step"], checkpoint["tokens"]) == (100, 51_200)
    assert checkpoint["tokenizer"]["kind"] == "char"  # the run's tokenizer, two levels up in the run layout
    weights = describe_model(str(step / "model.safetensors"))
    assert weights["kind"] == "weights" and weights["config"] == checkpoint["config"]
    preset = describe_model("dev-17m")
    assert preset["kind"] == "preset" and preset["parameters"] == 17_867_008 and preset["tokenizer"] is None


def test_model_with_sizing_options_is_one_line(tiny_run, capsys):
    assert main(["info", "--model", str(tiny_run), "--set", "n_layer=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--set" in err[0] and "--model" in err[0]
