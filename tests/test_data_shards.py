"""Shard format: round trip in both dtypes, and every way a damaged shard must be refused by name."""

from __future__ import annotations

import numpy as np
import pytest

from gptforge.data.shards import (HEADER_BYTES, MAGIC, ShardWriter, check_shard_ids, dtype_for_vocab,
                                  encode_header, open_shard, read_header, write_shard)
from gptforge.errors import UserError


def test_dtype_for_vocab_switches_above_65536():
    assert dtype_for_vocab(50257) == np.uint16
    assert dtype_for_vocab(65536) == np.uint16
    assert dtype_for_vocab(65537) == np.uint32


@pytest.mark.parametrize("dtype,top", [(np.uint16, 65535), (np.uint32, 100_000_000)])
def test_round_trip(tmp_path, dtype, top):
    tokens = np.random.default_rng(0).integers(0, top + 1, size=10_001)
    path = tmp_path / "a.bin"
    write_shard(path, tokens, dtype)
    assert path.stat().st_size == HEADER_BYTES + tokens.size * np.dtype(dtype).itemsize
    assert path.read_bytes()[:8] == MAGIC
    back = open_shard(path)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, tokens)
    assert read_header(path) == (np.dtype(dtype), tokens.size)


def test_write_refuses_ids_that_do_not_fit(tmp_path):
    with pytest.raises(ValueError):
        write_shard(tmp_path / "a.bin", np.array([70000]), np.uint16)


def test_writer_splits_into_bounded_shards(tmp_path):
    writer = ShardWriter(tmp_path, "train", np.uint16, max_tokens=7)
    chunks = [np.arange(5), np.arange(5, 6), np.arange(6, 20)]
    for chunk in chunks:
        writer.write(chunk)
    shards = writer.close()
    assert [n for _, n in shards] == [7, 7, 6]
    assert [name for name, _ in shards] == ["train_000000.bin", "train_000001.bin", "train_000002.bin"]
    joined = np.concatenate([open_shard(tmp_path / name) for name, _ in shards])
    np.testing.assert_array_equal(joined, np.arange(20))


def test_empty_shard_opens_empty(tmp_path):
    write_shard(tmp_path / "e.bin", np.zeros(0, np.int64), np.uint16)
    assert open_shard(tmp_path / "e.bin").size == 0


def _shard(tmp_path, n=100):
    path = tmp_path / "s.bin"
    write_shard(path, np.arange(n), np.uint16)
    return path


def test_truncated_shard_is_refused(tmp_path):
    path = _shard(tmp_path)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(UserError, match="truncated") as e:
        open_shard(path)
    assert str(path) in str(e.value)


def test_header_shorter_than_64_bytes_is_refused(tmp_path):
    path = tmp_path / "s.bin"
    path.write_bytes(MAGIC)
    with pytest.raises(UserError, match="header"):
        open_shard(path)


@pytest.mark.parametrize("offset, field, message", [
    (0, b"NOTSHARD", "not a gptforge token shard"),         # magic
    (8, (99).to_bytes(4, "little"), "format version 99"),   # format version
    (12, (3).to_bytes(4, "little"), "dtype code 3"),        # dtype code
])
def test_corrupt_header_field_is_refused(tmp_path, offset, field, message):
    path = _shard(tmp_path)
    data = bytearray(path.read_bytes())
    data[offset:offset + len(field)] = field
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=message):
        open_shard(path)


def test_missing_shard_is_named(tmp_path):
    with pytest.raises(UserError, match="missing"):
        open_shard(tmp_path / "none.bin")


def test_header_encodes_count(tmp_path):
    header = encode_header(12345, np.uint32)
    assert len(header) == HEADER_BYTES and int.from_bytes(header[16:24], "little") == 12345


def test_check_shard_ids(tmp_path):
    path = tmp_path / "s.bin"
    tokens = np.arange(1000) % 50
    tokens[777] = 50
    write_shard(path, tokens, np.uint16)
    check_shard_ids(path, 51)
    with pytest.raises(UserError, match="token id 50 at position 777") as e:
        check_shard_ids(path, 50)
    assert str(path) in str(e.value)


def test_header_stores_the_largest_id_and_version_2(tmp_path):
    from gptforge.data.shards import FORMAT_VERSION, read_shard_header, shard_max_id

    tokens = np.array([5, 60000, 7, 3], dtype=np.uint16)
    write_shard(tmp_path / "a.bin", tokens, np.uint16)
    raw = (tmp_path / "a.bin").read_bytes()
    assert FORMAT_VERSION == 2 and int.from_bytes(raw[8:12], "little") == 2
    assert int.from_bytes(raw[24:32], "little") == 60000  # the field after the count, hand-decoded
    assert read_shard_header(tmp_path / "a.bin").max_id == 60000 == shard_max_id(tmp_path / "a.bin")
    writer = ShardWriter(tmp_path, "train", np.uint16, max_tokens=3)
    writer.write(np.array([1, 9, 2, 4]))
    writer.write(np.array([8]))
    assert writer.close() == [("train_000000.bin", 3), ("train_000001.bin", 2)]
    assert writer.max_ids == {"train_000000.bin": 9, "train_000001.bin": 8}
    assert [read_shard_header(tmp_path / n).max_id for n in writer.max_ids] == [9, 8]


def test_version_1_shards_are_still_read_and_their_maximum_scanned(tmp_path):
    """Shards written before the header held the maximum: readable, the maximum found by a scan."""
    import struct

    from gptforge.data.shards import read_shard_header, shard_max_id

    tokens = np.array([3, 1, 4, 1, 5, 9, 2, 6], dtype=np.uint16)
    path = tmp_path / "old.bin"
    path.write_bytes(struct.pack("<8sIIQ", MAGIC, 1, 2, tokens.size).ljust(HEADER_BYTES, b"\0") + tokens.tobytes())
    header = read_shard_header(path)
    assert (header.version, header.count, header.max_id) == (1, 8, None)
    assert open_shard(path).tolist() == tokens.tolist() and shard_max_id(path) == 9
    data = bytearray(path.read_bytes())
    data[8:12] = (3).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="format version 3, this gptforge reads versions 1, 2; re-run gptforge prepare"):
        open_shard(path)
