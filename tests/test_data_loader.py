"""SequenceLoader: each sequence once per epoch, disjoint ranks covering the epoch, exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gptforge.data.loader import SequenceLoader
from gptforge.data.prepare import MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_VERSION
from gptforge.data.shards import write_shard
from gptforge.errors import UserError

SEQ = 8


def make_data(directory, shard_sizes=(203, 97, 161), val_size=50):
    """A prepared directory whose token at global position i is i (so a sequence names its own position)."""
    directory.mkdir(parents=True, exist_ok=True)
    splits, start = {}, 0
    for split, sizes in (("train", shard_sizes), ("val", (val_size,))):
        entries = []
        for i, n in enumerate(sizes):
            name = f"{split}_{i:06d}.bin"
            write_shard(directory / name, np.arange(start, start + n), np.uint32)
            entries.append({"file": name, "tokens": n})
            start += n
        splits[split] = {"tokens": sum(sizes), "shards": entries}
    manifest = {"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "splits": splits}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))
    return directory


@pytest.fixture
def data(tmp_path):
    return make_data(tmp_path / "d")


def expected_sequences(shard_sizes=(203, 97, 161)):
    starts, offset = [], 0
    for n in shard_sizes:
        starts += [offset + k * SEQ for k in range((n - 1) // SEQ)]
        offset += n
    return starts


def first_tokens(x):
    return x[:, 0].tolist()


def test_shapes_and_shift(data):
    loader = SequenceLoader(data, "train", SEQ, 4)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, SEQ) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # tokens are consecutive integers inside a shard


def test_each_sequence_once_per_epoch_and_reshuffled(data):
    loader = SequenceLoader(data, "train", SEQ, 5, seed=3)
    expected = expected_sequences()
    assert loader.sequences_per_epoch == len(expected) == 25 + 12 + 20
    epochs = []
    for _ in range(2):
        seen = []
        for _ in range(len(expected) // 5 + 1):
            seen += first_tokens(loader.next_batch()[0])
        epochs.append(seen[:len(expected)])
        # the batch that crossed into the next epoch: rewind for a clean count of the next one
        loader.load_state_dict({**loader.state_dict(), "epoch": loader.epoch, "position": 0})
    for seen in epochs:
        assert sorted(seen) == expected
    assert epochs[0] != epochs[1]
    assert epochs[0] != expected  # shuffled


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ranks_are_disjoint_and_cover_the_epoch(data, world_size):
    total = len(expected_sequences())
    per_rank = total // world_size
    parts = []
    for rank in range(world_size):
        loader = SequenceLoader(data, "train", SEQ, 1, seed=1, rank=rank, world_size=world_size)
        assert loader.sequences_per_rank == per_rank
        parts.append([loader.next_batch()[0][0, 0].item() for _ in range(per_rank)])
    union = [s for part in parts for s in part]
    assert len(set(union)) == len(union)
    order = SequenceLoader(data, "train", SEQ, 1, seed=1).epoch_order(0)
    starts = np.array(expected_sequences())
    assert sorted(union) == sorted(starts[order[:per_rank * world_size]].tolist())
    if total % world_size == 0:
        assert sorted(union) == expected_sequences()


def test_resume_gives_the_same_batch_stream(data):
    reference = SequenceLoader(data, "train", SEQ, 7, seed=5)
    stream = [reference.next_batch() for _ in range(20)]  # crosses two epochs
    loader = SequenceLoader(data, "train", SEQ, 7, seed=5)
    for _ in range(6):
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))
    resumed = SequenceLoader(data, "train", SEQ, 7, seed=999)  # the saved seed wins
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(stream[6:], (resumed.next_batch() for _ in range(14))):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_resume_with_another_world_size_continues_the_global_order(data):
    loaders = [SequenceLoader(data, "train", SEQ, 2, seed=2, rank=r, world_size=2) for r in range(2)]
    consumed = [first_tokens(ld.next_batch()[0]) for _ in range(3) for ld in loaders]
    state = loaders[0].state_dict()
    assert state == loaders[1].state_dict()  # the cursor is global
    new = [SequenceLoader(data, "train", SEQ, 2, seed=2, rank=r, world_size=3) for r in range(3)]
    for ld in new:
        ld.load_state_dict(state)
    after = [s for ld in new for s in first_tokens(ld.next_batch()[0])]
    starts = np.array(expected_sequences())
    order = starts[loaders[0].epoch_order(0)]
    assert sorted(s for part in consumed for s in part) == sorted(order[:12].tolist())
    assert sorted(after) == sorted(order[12:18].tolist())


def test_state_from_other_data_or_settings_is_refused(data, tmp_path):
    state = SequenceLoader(data, "train", SEQ, 2).state_dict()
    with pytest.raises(UserError, match="seq_len"):
        SequenceLoader(data, "train", SEQ + 1, 2).load_state_dict(state)
    other = make_data(tmp_path / "other", shard_sizes=(203, 97))
    with pytest.raises(UserError, match="data changed"):
        SequenceLoader(other, "train", SEQ, 2).load_state_dict(state)
    with pytest.raises(UserError, match="malformed"):
        SequenceLoader(data, "train", SEQ, 2).load_state_dict({"epoch": 1})


def test_iter_sequential_covers_split_in_order(data):
    loader = SequenceLoader(data, "train", SEQ, 4)
    firsts = [s for x, y in loader.iter_sequential(batch_size=10) for s in first_tokens(x)]
    assert firsts == expected_sequences()
    assert loader.state_dict()["position"] == 0
    shares = [[s for x, _ in SequenceLoader(data, "train", SEQ, 4, rank=r, world_size=2).iter_sequential()
               for s in first_tokens(x)] for r in range(2)]
    assert sorted(shares[0] + shares[1]) == expected_sequences() and not set(shares[0]) & set(shares[1])


def test_too_small_split_and_missing_manifest(data, tmp_path):
    with pytest.raises(UserError, match="val"):
        SequenceLoader(data, "val", 64, 1)
    with pytest.raises(UserError, match="manifest.json"):
        SequenceLoader(tmp_path, "train", SEQ, 1)
    with pytest.raises(UserError, match="split"):
        SequenceLoader(data, "test", SEQ, 1)


def test_damaged_shard_is_refused_by_name(data):
    shard = data / "train_000001.bin"
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(UserError, match="train_000001.bin"):
        SequenceLoader(data, "train", SEQ, 1)


def test_ids_outside_the_vocabulary_are_refused_when_opened(tmp_path):
    """A shard holding an id past the data's tokenizer (even one inside the model's padded rows, which
    would train silently) or past the model's vocabulary is refused in one line naming the file."""
    data = make_data(tmp_path / "d")  # ids 0..510; the last val token is 510
    manifest = json.loads((data / MANIFEST_FILE).read_text())
    manifest["tokenizer"] = {"vocab_size": 511}
    (data / MANIFEST_FILE).write_text(json.dumps(manifest))
    SequenceLoader(data, "train", SEQ, 2)
    SequenceLoader(data, "val", SEQ, 2, vocab_size=511)
    with pytest.raises(UserError, match=r"val_000000.bin holds token id 510, outside the model's vocabulary of 510 "
                                        r"ids; .*re-run gptforge prepare") as info:
        SequenceLoader(data, "val", SEQ, 2, vocab_size=510)
    assert "\n" not in str(info.value)
    manifest["tokenizer"] = {"vocab_size": 400}  # train shard 2 holds ids 300..460: past the data's tokenizer
    (data / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"train_000002.bin holds token id 460, outside the data's tokenizer of 400"):
        SequenceLoader(data, "train", SEQ, 2, vocab_size=448)
