import contextlib
import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from gptforge import atomic


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    atomic.write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_directory_replaced_only_when_complete(tmp_path):
    target = tmp_path / "ckpt"
    with atomic.atomic_directory(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(FileExistsError):
        with atomic.atomic_directory(target) as tmp:
            (tmp / "a").write_text("2")
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_directory(target, overwrite=True) as tmp:
            (tmp / "a").write_text("3")
            raise KeyboardInterrupt
    assert (target / "a").read_text() == "1"
    with atomic.atomic_directory(target, overwrite=True) as tmp:
        (tmp / "a").write_text("4")
    assert (target / "a").read_text() == "4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_written_files_get_ordinary_permissions(tmp_path):
    import os

    import torch
    from safetensors.torch import save_file
    old = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "f", "x")
        with atomic.atomic_file(tmp_path / "w.safetensors") as tmp:  # safetensors itself writes 0600
            save_file({"a": torch.zeros(2)}, str(tmp))
        with atomic.atomic_directory(tmp_path / "d") as tmp:
            save_file({"a": torch.zeros(2)}, str(tmp / "inner.safetensors"))
    finally:
        os.umask(old)
    for file in (tmp_path / "f", tmp_path / "w.safetensors", tmp_path / "d" / "inner.safetensors"):
        assert file.stat().st_mode & 0o777 == 0o644, file
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def _replace_failing_on_call(n, monkeypatch, error=OSError(16, "Device or resource busy")):
    import os
    real = os.replace
    calls = []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == n:
            raise error
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return calls


def test_a_failed_second_rename_puts_the_old_directory_back(tmp_path, monkeypatch):
    """Replacing a directory is two renames (final aside, tmp into place): when the second fails, the old
    version must be back at the final path, not left under a temporary name with nothing at `final`."""
    target = tmp_path / "data"
    with atomic.atomic_directory(target) as tmp:
        (tmp / "a").write_text("old")
    calls = _replace_failing_on_call(2, monkeypatch)
    with pytest.raises(OSError, match="busy"):
        with atomic.atomic_directory(target, overwrite=True) as tmp:
            (tmp / "a").write_text("new")
    assert calls[2] == (calls[0][1], target)  # the rollback: the old version moved back
    assert (target / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temporary or .old directory left


def test_a_stop_signal_between_the_two_renames_waits_until_the_new_directory_is_in_place(tmp_path, monkeypatch):
    import os
    import signal

    target = tmp_path / "data"
    with atomic.atomic_directory(target) as tmp:
        (tmp / "a").write_text("old")
    real = os.replace
    seen = []

    def replace(src, dst):
        real(src, dst)
        if not seen:  # right after the old directory was moved aside: a SIGTERM arrives
            os.kill(os.getpid(), signal.SIGTERM)
        seen.append(target.exists())

    def on_sigterm(signum, frame):
        seen.append("handled")
        raise KeyboardInterrupt

    # another thread is alive, as torch's are: the kernel may hand it the process's SIGTERM
    import threading
    done = threading.Event()
    other = threading.Thread(target=done.wait, daemon=True)
    other.start()
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    monkeypatch.setattr(os, "replace", replace)
    try:
        with pytest.raises(KeyboardInterrupt):
            with atomic.atomic_directory(target, overwrite=True) as tmp:
                (tmp / "a").write_text("new")
    finally:
        signal.signal(signal.SIGTERM, previous)
        done.set()
    assert seen == [False, True, "handled"]  # handled only once both renames were done
    assert (target / "a").read_text() == "new"


# ---- a full disk, whoever was writing (issue 22 #5) ---------------------------------------------------------


def safetensors_full_disk(written: int = 10):
    """What safetensors' save_file raises on a full disk (read off a real 200 KiB tmpfs: a SafetensorError, not
    an OSError), after writing `written` bytes of the file, as the real one leaves a partial file."""
    from safetensors import SafetensorError

    def serialize_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * written)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    return serialize_file


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str = "2m"):
    """A real tmpfs of `size` at `path` (a new directory), unmounted afterwards; skips when mounting is not
    permitted here (not root, or no CAP_SYS_ADMIN in a container)."""
    path.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                           capture_output=True, text=True) if shutil.which("mount") else None
    if mount is None or mount.returncode != 0:
        why = "no mount command" if mount is None else (mount.stderr.strip() or f"exit {mount.returncode}")
        pytest.skip(f"a real full disk needs a tiny tmpfs, and mount is not permitted here ({why})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory: Path, leave: int) -> None:
    """Take the free space of `directory`'s file system down to about `leave` bytes."""
    free = shutil.disk_usage(directory).free
    with open(directory / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def _short_write() -> OSError:
    return OSError("49152 requested and 2752 written")  # numpy's tofile (the GGUF writer) on a full disk


@pytest.mark.parametrize("error, free", [
    (OSError(errno.ENOSPC, "No space left on device"), None),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), None),
    ("safetensors", None),
    (_short_write(), 0),
], ids=["enospc", "quota", "safetensors", "numpy-short-write"])
@pytest.mark.parametrize("kind", ["file", "directory"])
def test_a_full_disk_is_one_oserror_naming_the_final_path_and_leaves_the_old_version(tmp_path, monkeypatch,
                                                                                       error, free, kind):
    from safetensors import SafetensorError

    if error == "safetensors":
        error = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    if free is not None:
        monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**6, 10**6, free))
    target = tmp_path / "out"
    (atomic.write_text(target, "old") if kind == "file"
     else atomic.write_text(target / "a", "old"))
    with pytest.raises(OSError) as caught:
        with (atomic.atomic_file(target) if kind == "file" else atomic.atomic_directory(target, overwrite=True)) as tmp:
            (tmp if kind == "file" else tmp / "a").write_text("half")
            raise error
    wanted = errno.EDQUOT if getattr(error, "errno", None) == errno.EDQUOT else errno.ENOSPC
    assert caught.value.errno == wanted and caught.value.filename == str(target)
    from gptforge.cli import describe_os_error
    assert describe_os_error(caught.value) == f"{target}: {os.strerror(wanted)}; free some space and run again"
    assert (target if kind == "file" else target / "a").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_other_errors_and_a_short_write_with_room_left_keep_their_own_error(tmp_path):
    for error in (OSError(errno.EACCES, "Permission denied"), RuntimeError("boom"), _short_write()):
        with pytest.raises(type(error)) as caught:  # the short write: the test's disk has more than 46 KB free
            with atomic.atomic_file(tmp_path / "f"):
                raise error
        assert caught.value is error
    assert list(tmp_path.iterdir()) == []


def test_real_full_tmpfs_safetensors_and_numpy_say_no_space_naming_the_path(tmp_path):
    """The real writers on a real full file system: the text the fakes above copy is what they raise."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    with tiny_tmpfs(tmp_path / "disk", "256k") as disk:
        fill(disk, 8192)
        for name, write in [("w.safetensors", lambda tmp: save_file({"a": torch.zeros(50_000)}, str(tmp))),
                            ("t.bin", lambda tmp: np.zeros(50_000).tofile(str(tmp)))]:
            with pytest.raises(OSError) as caught:
                with atomic.atomic_file(disk / name) as tmp:
                    write(tmp)
            assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(disk / name), caught.value
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]
