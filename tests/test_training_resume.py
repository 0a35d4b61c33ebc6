"""Exact resume: a real subprocess SIGKILLed at a random step (and one killed while writing a checkpoint),
resumed with --resume auto, ends bitwise identical to a run that never stopped."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptforge.layout import latest_valid_checkpoint, list_checkpoints

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 24
SETTINGS = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "model.dropout=0.1",
            "train.micro_batch_size=4", "train.tokens_per_step=256", f"train.max_steps={MAX_STEPS}",
            "train.warmup_steps=4", "train.lr=3e-3", "train.checkpoint_every=3", "train.keep_checkpoints=3",
            "train.log_every=1", "train.eval_every=10", "train.eval_batches=2", "train.sample_every=1000",
            "train.deterministic=true", "train.device=cpu"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from gptforge.data.prepare import prepare
    root = tmp_path_factory.mktemp("resume_data")
    text = "".join(f"def f{i}(x):\n    return x * {i % 7} + {i % 5}\n\n" for i in range(600))
    (root / "corpus.txt").write_text(text)
    prepare([str(root / "corpus.txt")], "char", root / "data", workers=1)
    return root / "data"


# `python -c SLOW_SAVE STEP ARGS...`: gptforge's CLI with the checkpoint writer of step STEP made slow after the
# weights are written (a monkeypatch inside the child), so the test can kill it half-way through a save.
SLOW_SAVE = """
import importlib, sys, time
ckpt = importlib.import_module("gptforge.training.checkpoint")
from gptforge.cli import main
step, real = sys.argv[1], ckpt.save_weights
def slow(model, path, *args, **kwargs):
    real(model, path, *args, **kwargs)
    if f"step_{step}" in str(path):
        time.sleep(60)
ckpt.save_weights = slow
sys.exit(main(sys.argv[2:]))
"""


def _cmd(data_dir: Path, out: Path, resume: bool = False, slow_save_step: int | None = None,
         optimizer: str = "adamw") -> list[str]:
    launcher = ["-m", "gptforge"] if slow_save_step is None else ["-c", SLOW_SAVE, str(slow_save_step)]
    cmd = [sys.executable, *launcher, "train", "--data", str(data_dir), "--out", str(out)]
    for s in [*SETTINGS, f"train.optimizer={optimizer}"]:
        cmd += ["--set", s]
    return cmd + (["--resume", "auto"] if resume else [])


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{MAX_STEPS}" / "model.safetensors"))


def _assert_identical(a: Path, b: Path, context: str = "") -> None:
    """`context` goes into every failure message (e.g. the random kill step, to reproduce a failure)."""
    wa, wb = _final_weights(a), _final_weights(b)
    assert wa.keys() == wb.keys(), context
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs after resume {context}"
    rows_a = [json.loads(l) for l in (a / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(l) for l in (b / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed", "mfu")} for r in rows]
    assert strip(rows_a) == strip(rows_b), f"metrics differ {context}"  # same curve, no duplicated or torn rows


@pytest.fixture(scope="module")
def reference_runs(data_dir, tmp_path_factory):
    """optimizer -> the run directory of an uninterrupted run with it (trained once per module)."""
    runs: dict[str, Path] = {}

    def get(optimizer: str) -> Path:
        if optimizer not in runs:
            out = tmp_path_factory.mktemp(f"reference-{optimizer}") / "run"
            subprocess.run(_cmd(data_dir, out, optimizer=optimizer), env=_env(), check=True, capture_output=True,
                           timeout=300)
            runs[optimizer] = out
        return runs[optimizer]
    return get


@pytest.fixture(scope="module")
def reference_run(reference_runs) -> Path:
    return reference_runs("adamw")


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the training subprocess")
        time.sleep(0.02)


KILL_STEP_ENV = "GPTFORGE_TEST_KILL_STEP"


def _logged_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(l).get("step", 0) for l in path.read_text().splitlines() if l.endswith("}")]
    return max(steps, default=0)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_sigkill_at_random_step_then_resume_is_bitwise_identical(data_dir, reference_runs, tmp_path, optimizer):
    """With Muon the checkpoint carries its momentum buffers beside AdamW's moments."""
    # A different step each run covers more kill points over time; a failure names its step, and
    # GPTFORGE_TEST_KILL_STEP=N replays it.
    kill_at = int(os.environ.get(KILL_STEP_ENV) or random.Random().randint(4, MAX_STEPS - 3))
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(data_dir, out, optimizer=optimizer), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _wait_for(lambda: _logged_step(out) >= kill_at, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    context = f"(killed once step {kill_at} was logged, last logged step {_logged_step(out)}; " \
              f"replay with {KILL_STEP_ENV}={kill_at})"
    print(context)
    assert _logged_step(out) < MAX_STEPS, f"the run finished before it could be killed {context}"
    resumed = subprocess.run(_cmd(data_dir, out, resume=True, optimizer=optimizer), env=_env(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, f"{context}\n{resumed.stderr}"
    assert "resuming" in resumed.stdout, context
    _assert_identical(reference_runs(optimizer), out, context)


def test_kill_during_checkpoint_write_resumes_from_previous(data_dir, reference_run, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(data_dir, out, slow_save_step=9), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = lambda: any(p.name.startswith(".tmp-step_9") for p in (out / "checkpoints").glob(".tmp-*")
                          if (p / "model.safetensors").exists())
    _wait_for(partial, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [s for s, _ in list_checkpoints(out)] == [3, 6]
    assert latest_valid_checkpoint(out) == out / "checkpoints" / "step_6"
    resumed = subprocess.run(_cmd(data_dir, out, resume=True), env=_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "from step_6" in resumed.stdout
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the killed save's leftovers are cleaned up
    _assert_identical(reference_run, out)


def test_sigterm_saves_a_checkpoint_and_exits_130(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(data_dir, out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(lambda: _logged_step(out) >= 4, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130
    steps = [s for s, _ in list_checkpoints(out)]
    assert steps and steps[-1] >= 4 and steps[-1] < MAX_STEPS
    assert b"--resume auto" in stdout


STORM_STEPS = 60
STORM_KILLS = 12


def _storm_cmd(data_dir: Path, out: Path, resume: bool) -> list[str]:
    return _cmd(data_dir, out, resume) + ["--set", f"train.max_steps={STORM_STEPS}"]


@pytest.mark.slow
def test_sigkill_storm_then_resume_is_bitwise_identical(data_dir, tmp_path):
    """Twelve SIGKILLs at random moments (start-up, mid-step, mid-checkpoint, by time or by step), each
    followed by `--resume auto`; the run that finally completes equals one that never stopped, bit for bit."""
    reference = tmp_path / "reference"
    subprocess.run(_storm_cmd(data_dir, reference, resume=False), env=_env(), check=True, capture_output=True,
                   timeout=600)
    rng = random.Random(int(os.environ.get("GPTFORGE_TEST_STORM_SEED") or random.randrange(10**6)))
    out, kills, attempts = tmp_path / "run", [], 0
    while len(kills) < STORM_KILLS and attempts < 4 * STORM_KILLS:
        attempts += 1
        start_step = _logged_step(out)
        if start_step >= STORM_STEPS - 2:
            break
        proc = subprocess.Popen(_storm_cmd(data_dir, out, resume=True), env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if rng.random() < 0.5:  # by time: lands anywhere, start-up and checkpoint writes included
            deadline = time.monotonic() + rng.uniform(0.3, 4.0)
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
        else:  # by step: a few steps past where this attempt resumed
            target = min(STORM_STEPS - 2, start_step + rng.randint(1, 6))
            _wait_for(lambda: _logged_step(out) >= target, proc, timeout=300)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills.append(_logged_step(out))
        else:
            assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
    context = f"(kills after logged steps {kills})"
    print(context)
    assert len(kills) >= 10, f"too few kills landed {context}"
    final = subprocess.run(_storm_cmd(data_dir, out, resume=True), env=_env(), capture_output=True, text=True,
                           timeout=600)
    assert final.returncode == 0, f"{context}\n{final.stderr}"
    wa = load_file(str(reference / "checkpoints" / f"step_{STORM_STEPS}" / "model.safetensors"))
    wb = load_file(str(out / "checkpoints" / f"step_{STORM_STEPS}" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs {context}"
    rows = lambda run: [{k: v for k, v in json.loads(l).items() if k not in ("tokens_per_s", "elapsed", "mfu")}
                        for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows(reference) == rows(out), f"metrics differ {context}"
