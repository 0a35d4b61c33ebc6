"""lm-evaluation-harness's `local-completions` model pointed at `gptforge serve` scores HellaSwag (a local
file) exactly as `gptforge eval` does on the same model: the served `echo` + `logprobs` are the model's.

lm-eval scores a text with `echo: true, logprobs: 1, max_tokens: 1` and drops the last entry as the
generated token's; the case that once went wrong is a generated END token (`<|im_end|>` of a chat model,
`<|endoftext|>` of a base model), whose entry the server left out, so lm-eval dropped the text's real last
token. So the models here make the end token the greedy next token after every text: a chat model as
`gptforge sft` leaves one (GPT-2's vocabulary plus the ChatML markers and template; a fine-tuned model ends
its turn like this after most texts) and a base model, each with its output bias pointing at its end token.

Slow (lm-eval's import and task machinery take tens of seconds) and needs `lm-eval`; fully offline: random
tiny models exported to HF only so lm-eval can load their tokenizer, the task the same custom YAML over a
local jsonl as tests/test_evals_lm_eval.py.
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.slow

pytest.importorskip("fastapi", reason="needs fastapi: pip install -e '.[dev]'")

from serve_helpers import serving  # noqa: E402
from test_evals_lm_eval import ITEMS, YAML  # noqa: E402


def _model_ending_every_text(tokenizer, end: int):
    """A random tiny GPT whose greedy next token is `end` after these texts: ln_f's bias, along `end`'s (tied)
    embedding row, adds 12 to its logit (and less to the tokens whose rows lean its way). Not more: the
    other tokens' log-probs fall with it, and fp32 sums of larger magnitudes differ by more than 1e-5
    between two correct ways of computing them."""
    from gptforge.config import ModelConfig
    from gptforge.model import GPT

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=128, n_layer=2, n_head=2, n_embd=32,
                            init_std=0.2)).eval()
    with torch.no_grad():
        row = model.transformer.wte.weight[end]
        model.transformer.ln_f.bias += row / row.norm() ** 2 * 12.0
    return model


@pytest.mark.parametrize("kind", ["chat", "base"])
def test_local_completions_against_the_server_agree_with_gptforge_eval(tmp_path, gpt2_ranks, monkeypatch, kind):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from gptforge.chat.tokens import add_chat_tokens
    from gptforge.evals.hellaswag import TARGET_DELIMITER, evaluate_hellaswag, load_hellaswag
    from gptforge.evals.scoring import encode_pair
    from gptforge.interop.hf import export_hf
    from gptforge.serve import create_app
    from gptforge.tokenizer import get_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tok = get_tokenizer("gpt2")
    if kind == "chat":
        tok = add_chat_tokens(tok)
    end = tok.special_tokens["<|im_end|>"] if kind == "chat" else tok.eot_id
    model = _model_ending_every_text(tok, end)
    hf_dir = export_hf(model, tok, tmp_path / "hf")  # lm-eval reads the tokenizer from here
    data = tmp_path / "hs.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    include = tmp_path / "tasks"
    include.mkdir()
    (include / "gptforge_hellaswag_local.yaml").write_text(YAML.format(data=data))
    (include / "utils.py").write_text("from lm_eval.tasks.hellaswag.utils import process_docs, preprocess  # noqa\n")

    items, _, _ = load_hellaswag(str(data))
    with torch.no_grad():  # the path under test: after every scored text the model ends its turn
        for item in items:
            for choice in item.choices:
                context, continuation = encode_pair(tok, item.query, TARGET_DELIMITER + choice)  # as lm-eval sends it
                ids = context + continuation
                assert int(model(torch.tensor([ids]))[0][0, -1, : tok.vocab_size].argmax()) == end

    with serving(create_app(model, tok, name="tiny")) as url:
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=f"model=tiny,base_url={url}/v1/completions,tokenizer={hf_dir},tokenizer_backend=huggingface,"
                       "tokenized_requests=True,max_retries=1,num_concurrent=1",
            tasks=["gptforge_hellaswag_local"], task_manager=TaskManager(include_path=str(include)),
            log_samples=True)
    metrics = out["results"]["gptforge_hellaswag_local"]
    samples = sorted(out["samples"]["gptforge_hellaswag_local"], key=lambda s: s["doc_id"])
    served = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]

    result = evaluate_hellaswag(model, tok, items, batch_size=3)
    ours = [s["loglikelihoods"] for s in result.samples]
    assert len(ours) == len(served) == len(ITEMS)
    for a, b in zip(ours, served):
        assert a == pytest.approx(b, abs=1e-5, rel=0)
    assert result.metrics["acc"] == pytest.approx(metrics["acc,none"])
    assert result.metrics["acc_norm"] == pytest.approx(metrics["acc_norm,none"])
