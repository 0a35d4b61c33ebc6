"""gptforge.data.workers: results in order whatever order workers finish in, errors and dead workers reported,
and no process left behind however the pool ends."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from gptforge.data.workers import WorkerDied, WorkerPool
from gptforge.errors import UserError


def live_children(pid: int | None = None) -> list[int]:
    """PIDs of the live (not zombie) child processes of `pid` (default: this process), from /proc."""
    pid = os.getpid() if pid is None else pid
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError):
            continue
        if int(ppid) == pid and state != "Z":
            found.append(int(stat.parent.name))
    return sorted(found)


@pytest.fixture
def hard_timeout():
    """A hang fails the test after 30 s instead of stalling the suite (SIGALRM interrupts a blocked wait)."""
    def expired(signum, frame):
        raise TimeoutError("the pool did not finish within 30 s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


pytestmark = pytest.mark.usefixtures("hard_timeout")


def slow_square(x: int) -> int:
    time.sleep(0.002 * ((x * 7) % 5))  # later items often finish first
    return x * x


def fails_on_three(x: int) -> int:
    if x == 3:
        raise UserError(f"item {x}: bad")
    return x


def broken_setup() -> None:
    raise UserError("setup: no tokenizer here")


def first_at_once(x: int) -> int:
    time.sleep(0 if x == 0 else 10)  # close() kills the workers: the test does not wait for this
    return x


def reports_pid(x: int) -> int:
    time.sleep(0.05)
    return os.getpid()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="counts processes through /proc")
class TestWorkerPool:
    def test_results_come_in_order_and_nothing_is_left(self):
        before = live_children()
        with WorkerPool(3, slow_square) as pool:
            assert len(live_children()) == len(before) + 3
            assert list(pool.map(range(40))) == [x * x for x in range(40)]
            assert list(pool.map([])) == []
            assert list(pool.map(range(5))) == [0, 1, 4, 9, 16]  # the pool is reusable
        assert live_children() == before

    def test_a_workers_error_is_raised_here_with_its_message(self):
        before = live_children()
        with WorkerPool(2, fails_on_three) as pool:
            results = pool.map(range(10))
            assert [next(results) for _ in range(3)] == [0, 1, 2]
            with pytest.raises(UserError, match="item 3: bad"):
                next(results)
        assert live_children() == before

    def test_an_initializer_error_is_raised_with_the_first_result(self):
        with WorkerPool(2, slow_square, broken_setup) as pool:
            with pytest.raises(UserError, match="setup: no tokenizer here"):
                list(pool.map(range(4)))
        assert live_children() == []

    def test_a_killed_worker_is_reported_not_waited_for(self):
        """multiprocessing.Pool loses a dead worker's task and waits for its result forever."""
        with WorkerPool(2, reports_pid) as pool:
            results = pool.map(range(50))
            victim = next(results)
            os.kill(victim, signal.SIGKILL)
            with pytest.raises(WorkerDied, match=rf"worker process {victim} was killed by SIGKILL"):
                list(results)
        assert live_children() == []

    def test_stopping_in_the_middle_kills_the_workers(self):
        with WorkerPool(2, slow_square) as pool:
            results = pool.map(range(1000))
            next(results)
            workers = live_children()
            assert len(workers) == 2
        assert live_children() == []  # close() kills and reaps, the generator left half-way

    def test_workers_ignore_ctrl_c_and_die_on_sigterm(self):
        with WorkerPool(1, reports_pid) as pool:
            (pid,) = pool.map([0])
            os.kill(pid, signal.SIGINT)  # the terminal sends it to the group: the parent handles it
            assert list(pool.map([1])) == [pid]
            os.kill(pid, signal.SIGTERM)
            with pytest.raises(WorkerDied, match="was killed by SIGTERM"):
                list(pool.map([2]))

    def test_a_map_left_unfinished_is_not_mixed_into_the_next(self):
        with WorkerPool(2, first_at_once) as pool:
            results = pool.map(range(10))
            assert next(results) == 0  # item 1 is still being worked on: its answer would come to the next map
            with pytest.raises(RuntimeError, match="left unfinished"):
                next(pool.map(range(3)))


ORPHANED_POOL = """
import ctypes, os, sys, time
def no_prctl(*args, **kwargs):
    raise OSError("prctl unavailable")  # as on any OS but Linux: only the socket can tell a worker
if sys.argv[1] == "socket-only":
    ctypes.CDLL = no_prctl
from gptforge.data.workers import WorkerPool
def echo(x):
    return os.getpid()
pool = WorkerPool(2, echo)
print(" ".join(str(pid) for pid in sorted(set(pool.map(range(8))))), flush=True)
time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="watches processes through /proc")
@pytest.mark.parametrize("how", ["socket-only", "linux"])
def test_workers_leave_when_their_parent_is_killed(how):
    """SIGKILL of the parent: no clean-up runs there, so the workers must notice by themselves (the kernel's
    parent-death signal on Linux; everywhere, EOF on their socket, which they only see if no copy of the
    parent's end is left open in the worker itself)."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    parent = subprocess.Popen([sys.executable, "-c", ORPHANED_POOL, how], stdout=subprocess.PIPE, text=True,
                              env=env)
    workers: list[int] = []
    try:
        workers = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(workers) >= 1 and all(alive(pid) for pid in workers)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in workers if alive(pid)], "workers outlived their killed parent"
    finally:
        parent.kill()
        parent.wait()
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_worker_whose_parent_is_already_gone_leaves_at_once(monkeypatch):
    """The parent-death signal is armed only after the fork: a parent that died before that never sends it,
    so the worker checks that its parent is still the one that started it (here it looks reparented)."""
    monkeypatch.setattr(os, "getppid", lambda: 1)  # inherited by the forked workers
    with WorkerPool(1, slow_square) as pool:
        with pytest.raises(WorkerDied, match="exited with code 1"):
            list(pool.map(range(3)))
