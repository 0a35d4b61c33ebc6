"""The run-directory lock: exclusive, names the holder's PID, and released by the kernel on SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from gptforge.errors import UserError
from gptforge.runlock import DirectoryLock

HOLD = """
import sys, time
from gptforge.runlock import DirectoryLock
DirectoryLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def _holder(directory):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_owner_is_refused_with_the_holders_pid(tmp_path):
    proc = _holder(tmp_path / "run")
    try:
        with pytest.raises(UserError) as info:
            DirectoryLock(tmp_path / "run", what="run directory", option="--out").acquire()
        message = str(info.value)
        assert f"PID {proc.pid}" in message and "--out" in message and "\n" not in message
    finally:
        proc.kill()
        proc.wait()


def test_sigkill_releases_the_lock(tmp_path):
    proc = _holder(tmp_path / "run")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 5
    while True:
        try:
            lock = DirectoryLock(tmp_path / "run").acquire()
            break
        except UserError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert lock.held
    lock.release()
    assert not lock.held


def test_context_manager_releases(tmp_path):
    with DirectoryLock(tmp_path / "d"):
        with pytest.raises(UserError):
            DirectoryLock(tmp_path / "d").acquire()
    with DirectoryLock(tmp_path / "d") as again:
        assert again.held
