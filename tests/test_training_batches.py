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


def _train_api(config):
    from gptforge.training.trainer import train
    return train(config, log=lambda m: None)


def test_a_model_vocabulary_below_the_datas_is_one_line_before_the_run_starts(data, tmp_path):
    """Through the Python API nothing fits model.vocab_size to the data: the first batch with a larger id
    was an IndexError traceback from inside the embedding."""
    import dataclasses

    from _train_helpers import tiny_config
    config = tiny_config(data, tmp_path / "run")
    vocab = config.model.vocab_size
    small = dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=vocab - 5))
    with pytest.raises(UserError, match=rf"model.vocab_size={vocab - 5} is smaller than the tokenizer of {data} "
                                        rf"\({vocab} ids\)") as e:
        _train_api(small)
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


def test_ids_past_the_model_in_any_split_are_refused_naming_the_shard(data, tmp_path):
    """The validation split is read by the same model: an id past it there failed only at the first eval."""
    import numpy as np

    from _train_helpers import tiny_config
    from gptforge.data.shards import open_shard, write_shard
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    config = tiny_config(copy, tmp_path / "run")
    shard = copy / "val_000000.bin"
    tokens = np.array(open_shard(shard))
    tokens[5] = config.model.vocab_size + 200  # past the embedding's padded rows too
    write_shard(shard, tokens, tokens.dtype)
    with pytest.raises(UserError, match=rf"shard {shard} holds token id {config.model.vocab_size + 200}"):
        _train_api(config)
    assert not (tmp_path / "run").exists()
