"""One process owns a run (or prepared-data) directory at a time.

Why fcntl: the kernel drops the lock when its process dies, even by SIGKILL, so a crashed run never
leaves a stale lock behind that a user would have to delete by hand. The lock file records the holder's
PID so the second process can say who holds it.

    with DirectoryLock(run_dir, what="run directory", option="--out"):
        ...  # train

Under torchrun only rank 0 takes the lock (the ranks of one job are one owner).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from .errors import UserError
from .layout import LOCK_FILE


class DirectoryLock:
    """Exclusive, non-blocking lock on `directory` (created if missing), held until `release()`."""

    def __init__(self, directory: str | os.PathLike, what: str = "directory", option: str = "--out",
                 lock_name: str = LOCK_FILE, shown: str | os.PathLike | None = None,
                 remove_on_release: bool = False):
        """`shown` is the path the error message names (default `directory`: a lock file kept beside what
        it guards, as prepare's, names the guarded path). With `remove_on_release` the lock file is deleted
        when released, for locks kept outside the directory they guard, where a leftover would be litter."""
        self.directory = Path(directory)
        self.path = self.directory / lock_name
        self.what = what
        self.option = option
        self.shown = Path(shown) if shown is not None else self.directory
        self.remove_on_release = remove_on_release
        self._fd: int | None = None

    def acquire(self) -> "DirectoryLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                finally:
                    os.close(fd)
                raise UserError(f"{self.option} {self.shown}: this {self.what} is in use by another gptforge "
                                f"process (PID {holder}); wait for it to finish or stop it, or choose another "
                                f"{self.option}") from None
            # A holder that removes its file on release may have done so between our open and our lock:
            # then we hold a lock on a deleted file. Only the file still at the path counts; else retry.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            # By default the file stays. Removing it is safe only because acquire() checks that the file it
            # locked is still the one at the path (a waiter that locked the removed file retries).
            if self.remove_on_release:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
