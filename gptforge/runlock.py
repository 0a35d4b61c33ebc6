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
                 lock_name: str = LOCK_FILE):
        self.directory = Path(directory)
        self.path = self.directory / lock_name
        self.what = what
        self.option = option
        self._fd: int | None = None

    def acquire(self) -> "DirectoryLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise UserError(f"{self.option} {self.directory}: this {self.what} is in use by another gptforge "
                            f"process (PID {holder}); wait for it to finish or stop it, or choose another "
                            f"{self.option}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            # The file stays: unlinking it would let a third process lock a fresh inode while a second
            # one still waits on the old one.
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
