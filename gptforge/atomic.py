"""Write files and directories so that a reader never sees them half-written.

Everything gptforge writes goes to a temporary name in the same directory, is flushed to disk, and is then
renamed into place. A crash, a Ctrl-C or a full disk leaves either the old file or nothing, plus at most a
`.tmp-*` leftover that no reader mistakes for the real thing.

A full disk is also said the same way whoever was writing: safetensors reports it as a `SafetensorError` (not
an OSError), NumPy's `tofile` (the GGUF writer) as "N requested and M written". `atomic_file` and
`atomic_directory` turn every such error into `OSError(ENOSPC, ..., final path)`, which the CLI prints as one
line naming the path, and the trainer as "could not write checkpoint ...".
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterator

TMP_PREFIX = ".tmp-"


def _default_mode(directory: bool) -> int:
    """The mode open()/mkdir() would give under the current umask (mkstemp/mkdtemp use 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where the OS cannot open directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_SHORT_WRITE = re.compile(r"(\d+) requested and (\d+) written")  # numpy's tofile when fwrite falls short


def disk_full_error(e: BaseException, final: Path, written_at: Path) -> OSError | None:
    """`e` as `OSError(ENOSPC or EDQUOT, reason, final)` when it says the disk (or quota) is full, else None.

    `written_at` is where the bytes went (a file or directory that still exists), for a short write's check:
    NumPy says only how many bytes it wrote, so it counts as a full disk only where the free space left is
    below what it asked for (a short write for another reason keeps its own error)."""
    if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
        code = e.errno
    elif "os error 28" in str(e) or os.strerror(errno.ENOSPC) in str(e):  # safetensors: a Rust io::Error's text
        code = errno.ENOSPC
    elif isinstance(e, OSError) and (short := _SHORT_WRITE.fullmatch(str(e))):
        try:
            free = shutil.disk_usage(written_at).free
        except OSError:
            return None
        if free >= int(short[1]) - int(short[2]):
            return None
        code = errno.ENOSPC
    else:
        return None
    return OSError(code, f"{os.strerror(code)}; free some space and run again", str(final))


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `final`; on clean exit fsync it and rename it to `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX + final.name + ".", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # after the writer: mkstemp and some writers (safetensors) create files 0600 whatever the umask
        os.chmod(tmp, _default_mode(directory=False))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException as e:
        full = disk_full_error(e, final, final.parent)
        tmp.unlink(missing_ok=True)
        if full is not None:
            raise full from None
        raise


def write_bytes(final: str | os.PathLike, data: bytes) -> None:
    with atomic_file(final) as tmp:
        tmp.write_bytes(data)


def write_text(final: str | os.PathLike, text: str) -> None:
    write_bytes(final, text.encode("utf-8"))


def publish_tree(root: Path) -> None:
    """Give every file ordinary permissions (writers such as safetensors create 0600 files) and flush it."""
    file_mode = _default_mode(directory=False)
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            os.chmod(path, file_mode)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `final`; on clean exit fsync it and rename it to `final`.

    With `overwrite`, an existing `final` is replaced only after the new one is complete, so at every
    instant one whole version exists on disk.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + final.name + ".", dir=final.parent))
    os.chmod(tmp, _default_mode(directory=True))
    try:
        yield tmp
        publish_directory(tmp, final, overwrite)
    except BaseException as e:
        full = disk_full_error(e, final, final.parent)  # named by the directory, not a file inside its tmp
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            raise full from None
        raise


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back for the duration of the block; they are delivered when it ends.

    For a few steps that must not be separated (two renames that replace a directory): a handler that
    raises between them would leave nothing at the final path. The block swaps in Python handlers that only
    note the signal, then restores the real ones and raises the first signal noted again. Why not
    pthread_sigmask: it blocks the calling thread only, and the kernel hands a process-directed SIGTERM to
    any thread that does not block it (torch's worker threads), after which Python runs its handler in the
    main thread anyway. Only the main thread may set handlers (elsewhere the block runs as is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: noted.append(signum)) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        if noted:
            signal.raise_signal(noted[0])  # now to the real handler (a KeyboardInterrupt, the command's exit)


def publish_directory(tmp: Path, final: Path, overwrite: bool = False) -> None:
    """Make the finished directory `tmp` (next to `final`) visible as `final`: ordinary permissions, every
    file flushed, then one rename. An existing `final` (with `overwrite`) is moved aside first and removed
    after, so a reader finds the old or the new version, never a mix. Used by `atomic_directory`, and
    directly where several processes fill `tmp` (sharded checkpoints).

    Replacing takes two renames (final -> aside, tmp -> final). Ctrl-C and SIGTERM are held back between
    them, so a stop request never leaves nothing at `final`; if the second rename fails, the old version
    is moved back, so an error leaves `final` as it was."""
    publish_tree(tmp)
    if final.exists():
        if not overwrite:
            raise FileExistsError(final)
        old = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + final.name + ".old.", dir=final.parent))
        with stop_signals_deferred():
            try:
                os.replace(final, old / "x")
            except BaseException:
                os.rmdir(old)
                raise
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old / "x", final)  # the old version back: `final` is as it was
                os.rmdir(old)
                raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)
