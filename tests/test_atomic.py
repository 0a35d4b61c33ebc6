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
