"""Checkpoint writing and reading as the trainer does it: a full disk is one line with the previous checkpoint
intact, and a state.json that passes its checksum but lacks what a resume needs is one line naming it."""

from __future__ import annotations

import errno
import hashlib
import json

import pytest
import torch
from _train_helpers import cli_args, make_corpus

from gptforge.cli import main
from gptforge.layout import CHECKSUMS_FILE, STATE_FILE, checkpoint_dir, latest_valid_checkpoint, list_checkpoints
from gptforge.training import checkpoint as ckpt
from gptforge.training.checkpointer import Checkpointer
from gptforge.training.optim import build_optimizer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def test_disk_full_while_checkpointing_is_one_line_and_keeps_the_previous(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real = ckpt.save_file

    def full_at_step_4(tensors, filename, metadata=None):  # the optimizer-state writer
        if "step_4" in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", full_at_step_4)
    assert main(cli_args(data, out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(checkpoint_dir(out, 4)) in err and "No space left on device" in err and "step_2" in err
    assert [s for s, _ in list_checkpoints(out)] == [2]
    assert latest_valid_checkpoint(out) == checkpoint_dir(out, 2)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


def _rewrite_state(path, change):
    state = json.loads((path / STATE_FILE).read_text())
    change(state)
    (path / STATE_FILE).write_text(json.dumps(state))
    sums = json.loads((path / CHECKSUMS_FILE).read_text())
    sums[STATE_FILE] = hashlib.sha256((path / STATE_FILE).read_bytes()).hexdigest()
    (path / CHECKSUMS_FILE).write_text(json.dumps(sums))


@pytest.mark.parametrize("change", [lambda s: s.pop("loader"), lambda s: s.pop("step"),
                                    lambda s: s.update(rng={"python": 3}), lambda s: s.update(tokens="many")])
def test_state_json_with_wrong_keys_is_one_line_naming_it(data, tmp_path, capsys, change):
    out = tmp_path / "run"
    assert main(cli_args(data, out)) == 0
    _rewrite_state(checkpoint_dir(out, 4), change)
    capsys.readouterr()
    assert main(cli_args(data, out, **{"train.max_steps": 6}) + ["--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(checkpoint_dir(out, 4) / STATE_FILE) in err, err


def test_checkpointer_round_trip_restores_weights_and_optimizer(tmp_path, tiny_config):
    from gptforge.config import TrainConfig
    from gptforge.model import GPT
    torch.manual_seed(0)
    model = GPT(tiny_config)
    opt = build_optimizer(model, TrainConfig(), torch.device("cpu"))
    model(torch.randint(0, 101, (2, 8)), torch.randint(0, 101, (2, 8)))[1].backward()
    opt.step()
    saver = Checkpointer(tmp_path, "none", model, opt, tiny_config, keep=2, log=lambda m: None)
    path = saver.save(7, {"step": 7})
    other = GPT(tiny_config)
    other_opt = build_optimizer(other, TrainConfig(), torch.device("cpu"))
    loader = Checkpointer(tmp_path, "none", other, other_opt, tiny_config, keep=2, log=lambda m: None)
    assert loader.load(path) == {"step": 7} and loader.last == path
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], other_opt.state_dict()["state"][0]["exp_avg"])
