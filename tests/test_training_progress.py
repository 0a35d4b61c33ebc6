"""What a run prints: averaged windows, and silence (not an early exit) once stdout is closed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _train_helpers import cli_args, make_corpus

from gptforge.config import TrainConfig
from gptforge.layout import list_checkpoints
from gptforge.training.progress import ProgressLog, console_log
from gptforge.training.step import StepPlan

REPO = Path(__file__).resolve().parents[1]


def test_window_averages_finite_steps_and_survives_a_round_trip():
    tc = TrainConfig(micro_batch_size=2, max_steps=10)
    lines = []
    progress = ProgressLog(tc, StepPlan.of(tc, 8, 1), None, lines.append, 1.0, None)
    progress.record(16, 0.5, 2.0)
    progress.record(16, 0.5, None)  # a skipped, non-finite step: time and tokens count, its loss does not
    restored = ProgressLog(tc, StepPlan.of(tc, 8, 1), None, lines.append, 1.0, None)
    restored.load_state_dict(progress.state_dict())
    restored.record(16, 1.0, 4.0)
    restored.report(3, 48, 2.0, 1e-3, 0.5, 1, 16)
    assert lines[-1].startswith("step 3/10 | loss 3.0000 | lr 1.00e-03 | 24 tok/s")


def test_console_log_goes_silent_when_stdout_closes(monkeypatch, capsys):
    log = console_log()

    def broken(*args, **kwargs):
        raise BrokenPipeError

    monkeypatch.setattr("builtins.print", broken)
    log("first")  # swallowed, and the log is now closed
    monkeypatch.undo()
    log("second")
    assert "second" not in capsys.readouterr().out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def test_train_piped_into_a_reader_that_leaves_keeps_training(data, tmp_path):
    out = tmp_path / "run"
    args = cli_args(data, out, **{"train.max_steps": 12, "train.checkpoint_every": 12})
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gptforge", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.readline()  # like `| head -1`: read one line, then close the pipe
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err and b"BrokenPipe" not in err
    assert [s for s, _ in list_checkpoints(out)] == [12]
