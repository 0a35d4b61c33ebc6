"""Best-fit packing and the chat batch source: every conversation exactly once per epoch, padding never
scored, targets scored exactly where the prepared mask says, exact resume from the loader state."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from gptforge.chat.tokens import add_chat_tokens
from gptforge.data.chat_loader import ChatLoader
from gptforge.data.chat_packing import best_fit, fit_to_rows, pack_report
from gptforge.data.chat_prepare import prepare_chat
from gptforge.tokenizer import CharTokenizer


def test_best_fit_by_hand():
    # longest first: 6 opens row 0 (2 free), 5 row 1 (3 free), 4 row 2 (4 free); 3 goes to row 1 (the tightest
    # fit: full), 2 to row 0 (full), 1 to row 2
    rows = best_fit(np.array([3, 5, 2, 6, 4, 1]), capacity=8)
    assert rows == [[3, 2], [1, 0], [4, 5]]
    assert sorted(i for r in rows for i in r) == list(range(6))


def test_truncate_or_drop():
    kept, lengths = fit_to_rows(np.array([5, 12, 12]), np.array([2, 3, 10]), capacity=10)
    assert kept.tolist() == [0, 1] and lengths.tolist() == [5, 10]  # the third trains nothing in 10 tokens
    report = pack_report(np.array([5, 12, 12]), np.array([2, 3, 10]), 10)
    assert (report["rows"], report["truncated"], report["dropped"]) == (2, 1, 1)
    assert report["padding"] == pytest.approx(1 - 15 / 20)


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    rng = np.random.default_rng(0)
    records = []
    for i in range(60):
        turns = [{"role": "user", "content": f"q{i} " + "x" * int(rng.integers(1, 30))},
                 {"role": "assistant", "content": f"a{i} " + "y" * int(rng.integers(1, 30))}]
        if i % 3 == 0:
            turns += [{"role": "user", "content": "more?"}, {"role": "assistant", "content": f"z{i}"}]
        records.append({"messages": turns})
    (root / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = CharTokenizer.train([(root / "chats.jsonl").read_text() + "systemuserassistant\n"])
    tok.save(root / "tok")
    prepare_chat([str(root / "chats.jsonl")], str(root / "tok"), root / "data", val_fraction=0.2, workers=1,
                 shard_tokens=500)  # small shards: conversations straddle shard boundaries
    return root / "data", records, add_chat_tokens(tok)


def _rows_of(loader: ChatLoader, epoch: int):
    rows, order = loader._packing(epoch)
    return [rows[i] for i in order]


def test_each_conversation_once_per_epoch_and_padding_never_scored(chat_data):
    data, records, tok = chat_data
    loader = ChatLoader(data, "train", seq_len=127, batch_size=3, seed=5)
    # all 60 conversations are shorter than a row: nothing truncated or dropped
    assert loader.dropped == 0 and loader.truncated == 0
    for epoch in (0, 1):
        seen = Counter(int(loader.kept[i]) for row in _rows_of(loader, epoch) for i in row)
        assert sorted(seen) == list(range(loader.conversations)) and set(seen.values()) == {1}
    assert _rows_of(loader, 0) != _rows_of(loader, 1)  # reshuffled each epoch, same number of rows
    # the targets scored over one epoch are exactly the train split's trained tokens: padding adds none
    loader = ChatLoader(data, "train", seq_len=127, batch_size=1, seed=5)
    scored = sum(int((loader.next_batch()[1] != -100).sum()) for _ in range(loader.sequences_per_epoch))
    manifest = json.loads((data / "manifest.json").read_text())
    assert scored == manifest["splits"]["train"]["trained_tokens"] > 0


def test_targets_are_scored_exactly_where_the_mask_says(chat_data):
    data, records, tok = chat_data
    loader = ChatLoader(data, "train", seq_len=127, batch_size=1, seed=5)
    for _ in range(loader.sequences_per_epoch):
        (x,), (y,) = loader.next_batch()
        items = loader._rows[loader._order[loader.position - 1]]
        tokens, mask = loader.row(items)
        used = int(loader.lengths[items].sum())
        assert (tokens[used:] == tok.eot_id).all() and not mask[used:].any()  # padding after the conversations
        assert (y[used - 1:] == -100).all()  # never scored
        assert ((y != -100).numpy() == mask[1:]).all() and (y[mask[1:]].numpy() == tokens[1:][mask[1:]]).all()
        # each conversation in the row is exactly what encode_chat gives for its record
        at = 0
        for item in items:
            n = int(loader.lengths[item])
            assert tok.decode(tokens[at:at + n].tolist()).startswith("<|im_start|>user\nq")
            at += n


def _assert_same_batches(a: ChatLoader, b: ChatLoader) -> None:
    """The next epoch's worth of batches (so across an epoch boundary) are equal, x and y."""
    for _ in range(a.sequences_per_epoch):
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert xa.equal(xb) and ya.equal(yb)


def test_resume_mid_epoch_continues_the_same_batches(chat_data):
    data, _, _ = chat_data
    a = ChatLoader(data, "train", seq_len=63, batch_size=2, seed=1)
    for _ in range(7):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    b = ChatLoader(data, "train", seq_len=63, batch_size=2, seed=1)
    b.load_state_dict(state)
    _assert_same_batches(a, b)


def test_resume_with_another_seed_serves_the_saved_runs_order(chat_data):
    # `sft --resume auto --set data.seed=2` on a run still in epoch 0: the loader is built with seed 2 (and
    # packs epoch 0 with it), then the state saved under seed 1 is loaded; what follows must be run 1's rows.
    data, _, _ = chat_data
    a = ChatLoader(data, "train", seq_len=63, batch_size=2, seed=1)
    for _ in range(3):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    b = ChatLoader(data, "train", seq_len=63, batch_size=2, seed=2)
    assert _rows_of(b, 0) != _rows_of(a, 0)  # the two seeds do order epoch 0 differently
    b.next_batch()  # a batch served before the state arrives caches seed 2's packing too
    b.load_state_dict(state)
    assert b.seed == 1
    _assert_same_batches(a, b)  # the rest of epoch 0, then epoch 1
    assert [x.equal(y) for (x, _), (y, _) in zip(a.iter_sequential(), b.iter_sequential())] == \
        [True] * -(-a.sequences_per_epoch // 2)


def test_val_split_is_served_sequentially(chat_data):
    data, _, _ = chat_data
    loader = ChatLoader(data, "val", seq_len=127, batch_size=4)
    batches = list(loader.iter_sequential())
    assert sum(x.shape[0] for x, _ in batches) == loader.sequences_per_epoch > 0
    assert all((y != -100).any() for _, y in batches)
