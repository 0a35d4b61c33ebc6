"""The trainer's validation loss is `gptforge eval --task val`'s number (one implementation), and a
validation pass interrupted by Ctrl-C is abandoned rather than finished."""

from __future__ import annotations

import pytest
import torch
from _train_helpers import make_corpus, tiny_config

from gptforge.evals.runner import run_tasks
from gptforge.loading import load_model
from gptforge.model import GPT
from gptforge.training.metrics import read_metrics
from gptforge.training.trainer import train
from gptforge.training.validator import Validator


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def test_trainer_val_loss_equals_eval_task_val(data, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_config(data, out), log=lambda m: None)  # eval_batches 2 x micro_batch_size 4
    model, tokenizer = load_model(str(out))
    (scored,) = run_tasks(model, tokenizer, ["val"], {"val": str(data)}, limit=8, batch_size=4)
    assert scored.details["tokens"] == 8 * 32
    assert abs(scored.metrics["loss"] - result.val_loss) < 1e-6, (scored.metrics["loss"], result.val_loss)
    logged = [r["val_loss"] for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r]
    assert logged[-1] == result.val_loss


def test_windows_are_split_over_ranks_without_overlap(data):
    from gptforge.tokenizer import load_tokenizer
    eot = load_tokenizer(data / "tokenizer").eot_id
    one = Validator(data, 32, 4, 8, eot, torch.device("cpu"), "fp32")
    ranks = [Validator(data, 32, 4, 8, eot, torch.device("cpu"), "fp32", rank=r, world_size=2) for r in range(2)]
    assert sorted(ranks[0].spans + ranks[1].spans) == sorted(one.spans) and one.n_windows == 8
    assert all(e - s == 32 for _, s, e in one.spans)


def test_a_stop_request_abandons_the_pass(data, tiny_config):
    from gptforge.tokenizer import load_tokenizer
    tok = load_tokenizer(data / "tokenizer")
    model = GPT(tiny_config.__class__(**{**tiny_config.to_dict(), "vocab_size": tok.vocab_size}))
    logs = []
    stopping = Validator(data, 32, 2, 8, tok.eot_id, torch.device("cpu"), "fp32", log=logs.append,
                         should_stop=lambda: True)
    assert stopping(model, 0) == {} and "stopped by the interrupt" in logs[-1]
    going = Validator(data, 32, 2, 8, tok.eot_id, torch.device("cpu"), "fp32")
    assert set(going(model, 0)) == {"val_loss", "val_ppl"}
