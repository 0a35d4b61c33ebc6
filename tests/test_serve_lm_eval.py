"""lm-evaluation-harness's `local-completions` model pointed at `gptforge serve` scores HellaSwag (a local
file) exactly as `gptforge eval` does on the same model: the served `echo` + `logprobs` are the model's.

Slow (lm-eval's import and task machinery take tens of seconds) and needs `lm-eval`; fully offline: a random
tiny GPT-2-vocabulary model, exported to HF only so lm-eval can load its tokenizer, the task the same custom
YAML over a local jsonl as tests/test_evals_lm_eval.py.
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.slow

pytest.importorskip("fastapi", reason="needs fastapi: pip install -e '.[dev]'")

from serve_helpers import serving  # noqa: E402
from test_evals_lm_eval import ITEMS, YAML  # noqa: E402


def test_local_completions_against_the_server_agree_with_gptforge_eval(tmp_path, gpt2_ranks, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from gptforge.config import ModelConfig
    from gptforge.evals.hellaswag import evaluate_hellaswag, load_hellaswag
    from gptforge.interop.hf import export_hf
    from gptforge.model import GPT
    from gptforge.serve import create_app
    from gptforge.tokenizer import get_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50257, block_size=128, n_layer=2, n_head=2, n_embd=32, init_std=0.2)).eval()
    tok = get_tokenizer("gpt2")
    hf_dir = export_hf(model, tok, tmp_path / "hf")  # lm-eval reads the tokenizer from here
    data = tmp_path / "hs.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    include = tmp_path / "tasks"
    include.mkdir()
    (include / "gptforge_hellaswag_local.yaml").write_text(YAML.format(data=data))
    (include / "utils.py").write_text("from lm_eval.tasks.hellaswag.utils import process_docs, preprocess  # noqa\n")

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

    items, _, _ = load_hellaswag(str(data))
    result = evaluate_hellaswag(model, tok, items, batch_size=3)
    ours = [s["loglikelihoods"] for s in result.samples]
    for a, b in zip(ours, served):
        assert a == pytest.approx(b, abs=1e-4)
    assert result.metrics["acc"] == pytest.approx(metrics["acc,none"])
    assert result.metrics["acc_norm"] == pytest.approx(metrics["acc_norm,none"])
