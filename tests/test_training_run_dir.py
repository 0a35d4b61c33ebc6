"""The run directory's policy: one owner at a time, --fresh keeps the previous run until the new one has a
checkpoint and touches nothing when the new run cannot start, and the logs follow the checkpoint resumed."""

from __future__ import annotations

import json
import os

import pytest
from _train_helpers import cli_args, make_corpus, tiny_config

from gptforge.cli import main
from gptforge.errors import UserError
from gptforge.layout import METRICS_FILE, SAMPLES_FILE, list_checkpoints
from gptforge.runlock import DirectoryLock
from gptforge.training.run_dir import PREVIOUS_RUN_DIR, RunDirectory
from gptforge.training.trainer import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def finished_run(data, tmp_path_factory):
    """A finished 4-step run (checkpoints at 2 and 4) to copy from."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(tiny_config(data, out), log=lambda m: None)
    return out


def _copy(run, tmp_path):
    import shutil
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def _snapshot(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
            and p.name != ".lock"}


def test_a_second_process_on_a_locked_run_exits_2_naming_the_holder(data, tmp_path, capsys):
    out = tmp_path / "run"
    with DirectoryLock(out, what="run directory", option="--out"):
        code = main(cli_args(data, out))
    err = capsys.readouterr().err
    assert code == 2 and f"PID {os.getpid()}" in err and "--out" in err and len(err.strip().splitlines()) == 1
    assert not (out / "checkpoints").exists()


def test_fresh_that_cannot_start_touches_nothing(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    config = json.loads((run / "config.json").read_text())
    config["data"]["path"] = str(tmp_path / "gone")  # the data the run was trained on has been deleted
    (run / "config.json").write_text(json.dumps(config))
    before = _snapshot(run)
    assert main(["train", "--out", str(run), "--fresh"]) == 2
    err = capsys.readouterr().err
    assert "gone" in err and len(err.strip().splitlines()) == 1
    assert _snapshot(run) == before


def test_fresh_restarts_the_run_from_its_own_config(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    assert main(["train", "--out", str(run), "--fresh", "--set", "train.max_steps=2"]) == 0
    assert "the previous run is kept in" in capsys.readouterr().out
    assert [s for s, _ in list_checkpoints(run)] == [2]
    assert not (run / PREVIOUS_RUN_DIR).exists()  # removed once the new run had its first checkpoint
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["n_embd"] == 32 and saved["train"]["max_steps"] == 2  # the run's own settings


def test_fresh_keeps_the_previous_run_aside_until_the_first_checkpoint(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    old_metrics = (run / METRICS_FILE).read_text()
    directory = RunDirectory(run, log=lambda m: None)
    assert directory.open(tiny_config(run.parent, run), resume=None, fresh=True) is None
    try:
        aside = run / PREVIOUS_RUN_DIR
        assert [s for s, _ in list_checkpoints(aside)] == [2, 4]
        assert (aside / METRICS_FILE).read_text() == old_metrics
        assert not list_checkpoints(run) and not (run / METRICS_FILE).exists()
        directory.discard_previous()
        assert not aside.exists()
    finally:
        directory.close()


def test_a_second_fresh_after_a_failed_one_keeps_the_original_run(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    for _ in range(2):  # the first new run dies before its first checkpoint; a second --fresh follows
        directory = RunDirectory(run, log=lambda m: None)
        directory.open(tiny_config(run.parent, run), resume=None, fresh=True)
        (run / METRICS_FILE).write_text('{"step": 1}\n')
        directory.close()
    assert [s for s, _ in list_checkpoints(run / PREVIOUS_RUN_DIR)] == [2, 4]


def test_resume_with_no_valid_checkpoint_starts_the_logs_over(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    for _, path in list_checkpoints(run):  # every checkpoint damaged
        (path / "model.safetensors").write_bytes(b"garbage")
    (run / SAMPLES_FILE).write_text("=== step 4 (512 tokens) ===\nold\n")
    directory = RunDirectory(run, log=lambda m: None)
    try:
        assert directory.open(tiny_config(run.parent, run), resume="auto", fresh=False) is None
    finally:
        directory.close()
    assert not (run / METRICS_FILE).exists() and not (run / SAMPLES_FILE).exists()


def test_existing_checkpoints_need_resume_or_fresh(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    directory = RunDirectory(run, log=lambda m: None)
    with pytest.raises(UserError, match="--resume .*--fresh"):
        directory.open(tiny_config(run.parent, run), resume=None, fresh=False)
    assert not directory.lock.held  # a refused open leaves the directory unlocked


def test_a_missing_metrics_package_is_refused_before_fresh_moves_anything(data, finished_run, tmp_path, monkeypatch):
    import sys

    from gptforge.training.trainer import Trainer

    run = _copy(finished_run, tmp_path)
    before = _snapshot(run)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails: not installed
    config = tiny_config(data, run, **{"train.tensorboard": True})
    with pytest.raises(UserError, match="train.tensorboard=true needs the tensorboard package"):
        Trainer(config, fresh=True, log=lambda m: None)
    assert _snapshot(run) == before and not (run / PREVIOUS_RUN_DIR).exists()
    DirectoryLock(run, what="run directory").acquire().release()  # not left locked


def test_a_failure_setting_up_metrics_in_fit_releases_the_run_lock(data, tmp_path, monkeypatch):
    import gptforge.training.trainer as trainer_module

    def broken(*args, **kwargs):
        raise UserError("metrics backend failed")

    trainer = trainer_module.Trainer(tiny_config(data, tmp_path / "run"), log=lambda m: None)
    monkeypatch.setattr(trainer_module, "MetricsLogger", broken)
    with pytest.raises(UserError, match="metrics backend failed"):
        trainer.fit()
    assert not trainer.run_dir.lock.held
