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
