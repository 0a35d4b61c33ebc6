"""Checks made before a run touches its directory: impossible sizes and non-finite settings are one line
each, and `--init` starts a new run from existing weights."""

from __future__ import annotations

import pytest
import torch
from _train_helpers import cli_args, make_corpus, tiny_config

from gptforge.cli import main
from gptforge.errors import UserError
from gptforge.loading import load_model
from gptforge.training.startup import check_fits_memory, load_init_weights
from gptforge.training.trainer import Trainer, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize("setting, message", [
    ("train.lr=nan", "train.lr=nan: must be a finite number"),
    ("train.lr=inf", "train.lr=inf: must be a finite number"),
    ("train.max_time=inf", "train.max_time=inf: must be a finite number"),
    ("model.dropout=nan", "model.dropout=nan: must be a finite number"),
    ("model.block_size=1000000000", "model too large for this machine"),
])
def test_impossible_settings_are_one_line_before_anything_is_written(data, tmp_path, capsys, setting, message):
    out = tmp_path / "run"
    assert main(cli_args(data, out) + ["--set", setting, "--set", "train.seq_len=32"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_memory_check_counts_sharding():
    from gptforge.config import get_preset
    config = get_preset("gpt3-175b")  # ~2.8 TB of fp32 weights, gradients and AdamW state
    with pytest.raises(UserError, match="model too large"):
        check_fits_memory(config, 1, "none", torch.device("cpu"))


def test_init_from_a_run_starts_from_its_weights(data, tmp_path, capsys):
    base = tmp_path / "base"
    train(tiny_config(data, base), log=lambda m: None)
    trained, _ = load_model(str(base))
    # the CLI takes the shape from --init (no model settings given) and trains a new run from the weights
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "tuned"), "--init", str(base),
                 "--set", "train.max_steps=2", "--set", "train.device=cpu", "--set", "train.sample_every=1000",
                 "--print-config"]) == 0
    import json
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"] == trained.config.to_dict() and printed["train"]["init_from"] == str(base)
    config = tiny_config(data, tmp_path / "tuned", **{"train.init_from": str(base)})
    trainer = Trainer(config, log=lambda m: None)
    try:
        for name, tensor in trained.state_dict().items():
            assert torch.equal(trainer.raw_model.state_dict()[name], tensor), name
    finally:
        trainer.run_dir.close()


def test_init_from_a_differently_shaped_model_names_the_fields(data, tmp_path):
    base = tmp_path / "base"
    train(tiny_config(data, base, **{"train.max_steps": 2}), log=lambda m: None)
    other = tiny_config(data, tmp_path / "x", **{"model.n_layer": 3}).model
    with pytest.raises(UserError, match="n_layer: 2 .* vs 3"):
        load_init_weights(str(base), other)


def test_ctrl_c_during_start_up_is_one_line_and_writes_nothing(data, tmp_path, capsys, monkeypatch):
    import gptforge.resolve

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gptforge.resolve, "resolve_run_config", interrupted)
    assert main(cli_args(data, tmp_path / "run")) == 130
    err = capsys.readouterr().err
    assert err.strip() == "gptforge train: interrupted during start-up; nothing was written"
    assert not (tmp_path / "run").exists()
