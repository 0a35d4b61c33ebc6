"""On-disk layout helpers: checkpoint listing and verification by checksum."""

from __future__ import annotations

import json

from gptforge import layout


def _checkpoint(run, step, damage=False):
    path = layout.checkpoint_dir(run, step)
    path.mkdir(parents=True)
    sums = {}
    for name in layout.REQUIRED_FILES:
        (path / name).write_bytes(f"{name}-{step}".encode())
        sums[name] = layout.sha256_file(path / name)
    (path / layout.CHECKSUMS_FILE).write_text(json.dumps(sums))
    if damage:
        (path / layout.WEIGHTS_FILE).write_bytes(b"truncated")
    return path


def test_checkpoints_are_listed_by_step_not_by_name(tmp_path):
    for step in (2, 10, 1):
        _checkpoint(tmp_path, step)
    (tmp_path / layout.CHECKPOINTS_DIR / ".tmp-step_11").mkdir()
    assert [step for step, _ in layout.list_checkpoints(tmp_path)] == [1, 2, 10]


def test_damaged_newest_checkpoint_is_reported_and_skipped(tmp_path):
    _checkpoint(tmp_path, 1)
    _checkpoint(tmp_path, 2, damage=True)
    reports = []
    assert layout.latest_valid_checkpoint(tmp_path, reports.append) == layout.checkpoint_dir(tmp_path, 1)
    assert len(reports) == 1 and "checksum" in reports[0]
    assert layout.verify_checkpoint(layout.checkpoint_dir(tmp_path, 2)).startswith(layout.WEIGHTS_FILE)


def test_missing_checksums_and_no_checkpoints(tmp_path):
    assert layout.latest_valid_checkpoint(tmp_path) is None
    path = layout.checkpoint_dir(tmp_path, 3)
    path.mkdir(parents=True)
    assert layout.verify_checkpoint(path) == f"{layout.CHECKSUMS_FILE} is missing"
