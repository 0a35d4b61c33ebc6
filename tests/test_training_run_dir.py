"""The run directory's policy: one owner at a time, --fresh keeps the previous run until the new one has a
checkpoint and touches nothing when the new run cannot start, and the logs follow the checkpoint resumed."""

from __future__ import annotations

import json
import os

import pytest
from _train_helpers import cli_args, make_corpus, tiny_config

from gptforge.cli import main
from gptforge.errors import UserError
from gptforge.layout import METRICS_FILE, SAMPLES_FILE, list_checkpoints, verify_checkpoint
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
    assert directory.open(tiny_config(run.parent / "data", run), resume=None, fresh=True) is None
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
        directory.open(tiny_config(run.parent / "data", run), resume=None, fresh=True)
        (run / METRICS_FILE).write_text('{"step": 1}\n')
        directory.close()
    assert [s for s, _ in list_checkpoints(run / PREVIOUS_RUN_DIR)] == [2, 4]


def test_resume_with_no_valid_checkpoint_starts_over_keeping_the_old_run_until_a_new_checkpoint(finished_run,
                                                                                                   tmp_path):
    """The logs went at once, before the new run had anything to show; the damaged checkpoints stay in
    checkpoints/ under another name (a resume or pruning would otherwise rank them above the new ones)."""
    run = _copy(finished_run, tmp_path)
    for _, path in list_checkpoints(run):  # every checkpoint damaged
        (path / "model.safetensors").write_bytes(b"garbage")
    (run / SAMPLES_FILE).write_text("=== step 4 (512 tokens) ===\nold\n")
    old_metrics = (run / METRICS_FILE).read_text()
    directory = RunDirectory(run, log=lambda m: None)
    try:
        assert directory.open(tiny_config(run.parent / "data", run), resume="auto", fresh=False) is None
        assert not (run / METRICS_FILE).exists() and not (run / SAMPLES_FILE).exists()
        aside = run / PREVIOUS_RUN_DIR
        assert (aside / METRICS_FILE).read_text() == old_metrics and (aside / SAMPLES_FILE).exists()
        assert not list_checkpoints(run)
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_2.corrupt", "step_4.corrupt"]
        directory.discard_previous()  # the new run's first checkpoint exists
        assert not aside.exists() and (run / "checkpoints" / "step_4.corrupt" / "model.safetensors").exists()
    finally:
        directory.close()


def test_existing_checkpoints_need_resume_or_fresh(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    directory = RunDirectory(run, log=lambda m: None)
    with pytest.raises(UserError, match="--resume .*--fresh"):
        directory.open(tiny_config(run.parent / "data", run), resume=None, fresh=False)
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


def test_resume_auto_past_a_damaged_newest_checkpoint_keeps_what_it_writes(data, finished_run, tmp_path):
    """With step_4 damaged and keep_checkpoints=1, the checkpoint written at step 3 was pruned at once (step 4
    ranks above it) and a later --resume auto found nothing valid."""
    run = _copy(finished_run, tmp_path)
    (run / "checkpoints" / "step_4" / "model.safetensors").write_bytes(b"garbage")
    said = []
    config = tiny_config(data, run, **{"train.max_steps": 3, "train.checkpoint_every": 1,
                                       "train.keep_checkpoints": 1})
    result = train(config, resume="auto", log=said.append)
    assert result.resumed_from == 2 and result.step == 3
    assert [s for s, _ in list_checkpoints(run)] == [3] and verify_checkpoint(run / "checkpoints" / "step_3") is None
    assert (run / "checkpoints" / "step_4.corrupt" / "model.safetensors").read_bytes() == b"garbage"
    assert any("step_4 is unusable" in m and "renamed to step_4.corrupt" in m for m in said), said


def test_resume_from_an_older_checkpoint_sets_damaged_newer_ones_aside(data, finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    (run / "checkpoints" / "step_4" / "optimizer.safetensors").write_bytes(b"garbage")
    config = tiny_config(data, run, **{"train.max_steps": 3, "train.checkpoint_every": 1})
    result = train(config, resume=str(run / "checkpoints" / "step_2"), log=lambda m: None)
    assert result.step == 3 and [s for s, _ in list_checkpoints(run)] == [2, 3]
    assert (run / "checkpoints" / "step_4.corrupt").is_dir()


def test_resume_from_an_older_checkpoint_while_newer_valid_ones_exist_is_refused(data, finished_run, tmp_path,
                                                                                 capsys):
    """Continuing from step 2 beside a valid step_4: --resume auto would later load step 4 and the new work
    would be lost (with keep_checkpoints low, pruned as soon as written)."""
    run = _copy(finished_run, tmp_path)
    before = _snapshot(run)
    assert main(["train", "--out", str(run), "--resume", str(run / "checkpoints" / "step_2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "newer valid checkpoints (step_4)" in err[0], err
    assert f"move them out of {run / 'checkpoints'}" in err[0] and "another --out" in err[0]
    assert _snapshot(run) == before


class Killed(BaseException):
    """Stands for a SIGKILL: nothing in the product catches it (only the lock is released, as the kernel would)."""


def _killed_at_rename(monkeypatch, n):
    real = os.rename
    calls = []

    def rename(src, dst, *args, **kwargs):
        calls.append(src)
        if len(calls) == n:
            raise Killed
        return real(src, dst, *args, **kwargs)
    monkeypatch.setattr(os, "rename", rename)


def test_a_fresh_killed_while_moving_the_run_aside_loses_nothing(data, finished_run, tmp_path, monkeypatch):
    """--fresh moved the run aside file by file: killed half-way, the next --fresh took the half in
    .previous-run for the run worth keeping and deleted the rest (the logs still in the run directory)."""
    run = _copy(finished_run, tmp_path)
    (run / SAMPLES_FILE).write_text("=== step 4 (512 tokens) ===\nold\n")
    before = _snapshot(run)
    config = tiny_config(data, run)
    for attempt in range(2):
        with monkeypatch.context() as patch:
            _killed_at_rename(patch, 3)
            with pytest.raises(Killed):
                RunDirectory(run, log=lambda m: None).open(config, resume=None, fresh=True)
        if attempt == 0:  # a resume after the kill finds the run whole again
            directory = RunDirectory(run, log=lambda m: None)
            assert directory.open(config, resume="auto", fresh=False) == run / "checkpoints" / "step_4"
            directory.close()
            assert {k: v for k, v in _snapshot(run).items() if k != "config.json"} == \
                {k: v for k, v in before.items() if k != "config.json"}
    directory = RunDirectory(run, log=lambda m: None)
    directory.open(config, resume=None, fresh=True)
    directory.close()
    aside = run / PREVIOUS_RUN_DIR
    assert [s for s, _ in list_checkpoints(aside)] == [2, 4]
    assert (aside / SAMPLES_FILE).read_bytes() == before[SAMPLES_FILE]
    assert (aside / METRICS_FILE).read_bytes() == before[METRICS_FILE]
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]


def test_leftovers_of_a_killed_process_are_cleaned_or_put_back_at_start(data, finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    tokenizer = _snapshot(run / "tokenizer")
    (run / ".tmp-config.json.abcd1234").write_text("{half")  # an interrupted config.json write
    (run / ".tmp-tokenizer.k2j4h5g6").mkdir()  # an interrupted tokenizer copy
    old = run / ".tmp-tokenizer.old.zz99yy88"  # a tokenizer replace cut between its two renames
    old.mkdir()
    (run / "tokenizer").rename(old / "x")
    (run / ".tmp-notours.abcd1234").write_text("the user's")
    directory = RunDirectory(run, log=lambda m: None)
    try:
        directory.open(tiny_config(data, run), resume="auto", fresh=False)
    finally:
        directory.close()
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".tmp-")) == [".tmp-notours.abcd1234"]
    assert _snapshot(run / "tokenizer") == tokenizer  # the run's own, back in place
