"""The batch-source seam: the data directory's manifest chooses the source, every source has one protocol."""

from __future__ import annotations

import json
import shutil

import pytest
from _train_helpers import make_corpus

from gptforge.data.loader import SequenceLoader
from gptforge.errors import UserError
from gptforge.training.batches import BATCH_SOURCES, BatchSource, open_batch_source


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def test_plain_token_data_gets_the_sequence_loader(data):
    source = open_batch_source(data, "train", 16, 3, seed=1)
    assert isinstance(source, SequenceLoader) and isinstance(source, BatchSource)
    x, y = source.next_batch()
    assert x.shape == y.shape == (3, 16) and (x[:, 1:] == y[:, :-1]).all()
    state = source.state_dict()
    again = open_batch_source(data, "train", 16, 3, seed=1)
    again.load_state_dict(state)
    assert all((a == b).all() for a, b in zip(source.next_batch(), again.next_batch()))


def test_an_unknown_kind_of_data_is_one_line(data, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(data, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["kind"] = "images"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="kind 'images'"):
        open_batch_source(other, "train", 16, 3)


def test_chat_data_is_served_by_the_masked_chat_loader():
    from gptforge.data.chat_loader import ChatLoader
    from gptforge.layout import CHAT_DATA_KIND
    module, _, name = BATCH_SOURCES[CHAT_DATA_KIND].partition(":")
    assert (module, name) == (ChatLoader.__module__, ChatLoader.__name__)
