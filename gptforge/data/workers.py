"""Worker processes that apply one function to a stream of items, results in order, and that can always be
stopped: by a signal to the parent alone, to the whole process group, or at normal completion.

Why not multiprocessing.Pool: its workers share one task queue and one result queue, each guarded by a
lock that is a process-shared semaphore. A worker that dies while holding one (a group SIGTERM, the OOM
killer) leaves it held forever, and Pool.terminate() then waits for it; a worker that dies mid-task loses
the task, so the parent waits forever for its result; and Pool's handler thread forks replacements for
workers that died, which can miss the group's signal, sit on the task queue's lock and deadlock terminate().
Here each worker has its own socket pair and nothing else is shared, so a dead worker is only a closed
socket (EOF) and stopping is SIGKILL plus waitpid, which cannot block on anything a worker holds.

Each worker has at most one item in flight: the parent sends an item only to a worker that is waiting for
one, so neither side ever blocks writing to the other while the other is writing too (items and results are
larger than a socket buffer). Results that finish out of order wait in the parent; at most 2 items per
worker are in flight or waiting, so memory stays flat.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Iterable, Iterator

from ..errors import UserError

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel SIGKILLs this worker when the parent dies, however it dies (SIGKILL included), so a
    worker never outlives its prepare, even while busy with an item. The request covers only a death after
    it is made: a parent already gone by then (this process reparented) is checked for, and this worker
    leaves. Everywhere, the parent's death also closes the parent's end of this worker's socket, which ends
    the worker at its next read (`_worker_main` closes its inherited copy of that end so that EOF can come)."""
    if sys.platform == "linux":
        try:
            import ctypes
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1: PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)  # the parent died before the request: nobody will read our answers


def _worker_main(conn: Connection, parent_ends: list[Connection], parent: int, func: Callable[[Any], Any],
                 initializer: Callable[..., None] | None, initargs: tuple) -> None:
    """Run in the worker: answer each item with (True, func(item)) or (False, the exception).

    `parent_ends` are the parent's ends of this worker's socket and of earlier workers' ones, inherited by
    the fork: each is closed at once, since a socket's peer sees EOF only when every copy of the other end
    is closed (this worker keeping its own parent's end would never see the parent's death; keeping an
    earlier worker's would hide that worker's death from the parent)."""
    # Ctrl-C goes to the whole foreground group: the parent handles it and kills us. SIGTERM keeps its
    # default action (a worker dies at once and holds nothing another process needs). Both were blocked by
    # the parent around the fork, so no inherited handler of the parent ever runs here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    for end in parent_ends:
        end.close()
    _die_with_parent(parent)
    setup_error: BaseException | None = None
    try:
        if initializer is not None:
            initializer(*initargs)
    except Exception as e:  # reported with the first item, where the parent is listening
        setup_error = e
    while True:
        try:
            item = conn.recv()
        except (EOFError, OSError):  # the parent closed our socket or died
            return
        if setup_error is not None:
            reply: tuple[bool, Any] = (False, setup_error)
        else:
            try:
                reply = (True, func(item))
            except Exception as e:
                reply = (False, e)
        try:
            try:
                conn.send(reply)
            except (TypeError, AttributeError, ValueError) as e:  # an exception that cannot be pickled
                conn.send((False, RuntimeError(f"{type(reply[1]).__name__}: {reply[1]} ({e})")))
        except OSError:  # the parent is gone
            return


class WorkerDied(UserError):
    """A worker process ended without answering (killed from outside, e.g. by the out-of-memory killer)."""


class WorkerPool:
    """`workers` processes running `func`, started at construction, stopped (SIGKILL) by close().

    Start it before any thread is started in this process, so forking is safe.
    """

    def __init__(self, workers: int, func: Callable[[Any], Any], initializer: Callable[..., None] | None = None,
                 initargs: tuple = (), what: str = "worker") -> None:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        self.what = what
        self.processes: list[Any] = []
        self.conns: list[Connection] = []
        self.busy: dict[int, int] = {}  # worker -> index of the item it is working on
        # Block Ctrl-C and SIGTERM while forking: a signal then is handled by the parent once they are
        # unblocked below, and never by a child still running the parent's handler on a copy of its stack
        # (which would unwind the parent's clean-up in the child: remove its temporary output, its lock).
        blocked = hasattr(signal, "pthread_sigmask")
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS) if blocked else set()
        try:
            for _ in range(workers):
                parent_end, child_end = context.Pipe(duplex=True)
                process = context.Process(target=_worker_main, daemon=True,
                                          args=(child_end, [*self.conns, parent_end], os.getpid(), func,
                                                initializer, initargs))
                try:
                    process.start()
                finally:
                    child_end.close()  # only the worker holds it: its death is EOF here
                self.processes.append(process)
                self.conns.append(parent_end)
        except BaseException:
            self.close()
            raise
        finally:
            if blocked:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def map(self, items: Iterable[Any]) -> Iterator[Any]:
        """func(item) for each item, in order; a worker's exception is raised here, in its item's turn.

        One map at a time: a map left unfinished leaves answers on their way, so the pool must be closed."""
        if self.busy:
            raise RuntimeError("a previous map() of this pool was left unfinished; close the pool")
        source = iter(items)
        window = 2 * len(self.processes)
        idle = list(range(len(self.processes)))
        busy = self.busy
        done: dict[int, tuple[bool, Any]] = {}  # index -> (ok, result or error), finished ahead of its turn
        sent = 0
        exhausted = False
        next_index = 0  # of the next result to yield
        while True:
            while idle and not exhausted and sent - next_index < window:
                try:
                    item = next(source)
                except StopIteration:
                    exhausted = True
                    break
                worker = idle.pop()
                self._send(worker, item)
                busy[worker] = sent
                sent += 1
            if next_index in done:
                ok, value = done.pop(next_index)
                if not ok:
                    raise value
                yield value
                next_index += 1
                continue
            if not busy:  # every item sent was answered and yielded, and no more will come
                return
            for conn in wait([self.conns[w] for w in busy]):
                worker = self.conns.index(conn)  # type: ignore[arg-type]
                done[busy.pop(worker)] = self._receive(worker)
                idle.append(worker)

    def _send(self, worker: int, item: Any) -> None:
        try:
            self.conns[worker].send(item)
        except OSError:
            raise self._died(worker) from None

    def _receive(self, worker: int) -> tuple[bool, Any]:
        try:
            return self.conns[worker].recv()
        except (EOFError, OSError):
            raise self._died(worker) from None

    def _died(self, worker: int) -> WorkerDied:
        process = self.processes[worker]
        process.join()  # it closed its socket, so it is exiting; waiting can be interrupted by a signal
        code = process.exitcode
        how = f"was killed by {signal.Signals(-code).name}" if code and code < 0 else f"exited with code {code}"
        return WorkerDied(f"{self.what} process {process.pid} {how} without finishing its work; if memory ran "
                          "out, use fewer --workers")

    def close(self) -> None:
        """Kill every worker (SIGKILL: immediate, nothing to wait for but the kernel) and reap it."""
        for conn in self.conns:
            conn.close()
        for process in self.processes:
            if process.exitcode is None:
                try:
                    process.kill()
                except OSError:
                    pass
        for process in self.processes:
            process.join()
        self.conns, self.processes = [], []

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
