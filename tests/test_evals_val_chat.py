"""`gptforge eval --task val` on chat data: the masked loss over the assistant's tokens (SFT's val_loss), the
shards read from the manifest so the loss-mask shards are never taken for tokens."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from chat_models import random_chat_model

from gptforge.data.chat_loader import ChatLoader
from gptforge.data.chat_prepare import prepare_chat
from gptforge.errors import UserError
from gptforge.evals import val
from gptforge.evals.runner import run_tasks
from gptforge.tokenizer import CharTokenizer, load_tokenizer

BLOCK = 64


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("chatval")
    records = [{"messages": [{"role": "user", "content": f"what is {i} plus {i % 7}?"},
                             {"role": "assistant", "content": f"{i} plus {i % 7} is {i + i % 7}."}]}
               for i in range(40)]
    (root / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    CharTokenizer.train([(root / "c.jsonl").read_text() + "systemuserassistant\n"]).save(root / "tok")
    prepare_chat([str(root / "c.jsonl")], str(root / "tok"), root / "data", val_fraction=0.5, workers=1, seed=3)
    tok = load_tokenizer(root / "data" / "tokenizer")
    return root / "data", tok, random_chat_model(tok, end_at=[], block_size=BLOCK)


def _by_hand(model, loader: ChatLoader, rows: int | None = None) -> tuple[float, int]:
    """(nats, targets) over the rows of the val split, computed from full logits in float64: only the targets
    the prepared mask trains are scored."""
    packed, order = loader._epoch0()
    nats, count = 0.0, 0
    for i in range(loader.sequences_per_epoch if rows is None else rows):
        tokens, mask = loader.row(packed[int(order[i])])
        with torch.no_grad():
            logits, _ = model(torch.tensor(tokens[None, :-1]))
        logprobs = F.log_softmax(logits[0].double(), dim=-1)
        for p in np.flatnonzero(mask[1:]):
            nats -= float(logprobs[p, tokens[p + 1]])
            count += 1
    return nats, count


def test_chat_val_is_the_masked_loss_and_never_reads_the_mask_shards(chat_data):
    data, tok, model = chat_data
    assert (data / "val_mask_000000.bin").is_file()  # what `val_*.bin` used to pick up as tokens
    source = val.resolve_val_source(str(data))
    assert source.chat and [p.name for p in source.shards] == ["val_000000.bin"]
    loader = ChatLoader(data, "val", BLOCK, 1)
    nats, count = _by_hand(model, loader)
    manifest = json.loads((data / "manifest.json").read_text())
    assert count == manifest["splits"]["val"]["trained_tokens"] > 0  # every assistant token once, nothing else
    (result,) = run_tasks(model, tok, ["val"], {"val": str(data)}, batch_size=3)
    assert result.n == result.details["tokens"] == count
    assert result.metrics["loss"] == pytest.approx(nats / count, rel=1e-5)
    assert result.metrics["ppl"] == pytest.approx(math.exp(nats / count), rel=1e-5)
    # bytes: the replies' text (ASCII, a character a token) without their one <|im_end|> each
    assert result.details["bytes"] == count - manifest["splits"]["val"]["conversations"]
    assert result.metrics["bpb"] == pytest.approx(nats / math.log(2) / result.details["bytes"], rel=1e-5)
    # --limit counts packed rows
    (two,) = run_tasks(model, tok, ["val"], {"val": str(data)}, limit=2, batch_size=3)
    nats2, count2 = _by_hand(model, loader, rows=2)
    assert two.details["rows"] == 2 and two.n == count2
    assert two.metrics["loss"] == pytest.approx(nats2 / count2, rel=1e-5)


def test_chat_val_equals_the_sft_validators_val_loss(chat_data):
    from gptforge.training.validator import Validator

    data, tok, model = chat_data
    rows = ChatLoader(data, "val", BLOCK, 1).sequences_per_epoch
    validator = Validator(data, BLOCK, 2, rows, tok.eot_id, torch.device("cpu"), "fp32")
    logged = validator(model, 0)["val_loss"]
    (result,) = run_tasks(model, tok, ["val"], {"val": str(data)}, limit=rows, batch_size=2)
    assert abs(result.metrics["loss"] - logged) < 1e-6


def test_chat_val_refuses_a_stride_and_a_model_without_the_chat_markers(chat_data):
    from gptforge.evals.runner import EvalOptions

    data, tok, model = chat_data
    with pytest.raises(UserError, match="--stride: .*holds conversations"):
        run_tasks(model, tok, ["val"], {"val": str(data)}, options=EvalOptions(stride=8))
    base = CharTokenizer.train(["abc"])
    with pytest.raises(UserError, match="outside the model's tokenizer"):
        val.evaluate_chat_val(model, base, val.resolve_val_source(str(data)))


def test_val_data_without_the_split_in_its_manifest(chat_data, tmp_path):
    data, _, _ = chat_data
    manifest = json.loads((data / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "splits": {"train": manifest["splits"]["train"]}}))
    with pytest.raises(UserError, match="lists no val split"):
        val.resolve_val_source(str(tmp_path))


def test_chat_val_of_a_quantized_model_scores_through_its_quantized_head(chat_data):
    """`eval --quantize int8`: the masked loss is the quantized model's own, output head included (the fused
    loss would read the head's exact weight and leave it out)."""
    import copy

    from gptforge.generation import prepare_for_decoding

    data, tok, model = chat_data
    quantized = prepare_for_decoding(copy.deepcopy(model), quantize="int8")
    loader = ChatLoader(data, "val", BLOCK, 1)
    nats, count = _by_hand(quantized, loader)
    exact_nats, _ = _by_hand(model, loader)
    (result,) = run_tasks(quantized, tok, ["val"], {"val": str(data)}, batch_size=3)
    assert result.n == count and abs(nats - exact_nats) / count > 1e-4  # quantizing did change the loss
    assert result.metrics["loss"] == pytest.approx(nats / count, rel=1e-5)
