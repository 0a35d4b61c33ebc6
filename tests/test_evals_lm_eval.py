"""Agreement with lm-evaluation-harness: the same exported model and hellaswag file through both.

Slow (lm-eval's import and task machinery take tens of seconds) and needs `lm-eval` installed; fully offline:
the model is a random tiny GPT-2 exported with `gptforge.interop.hf`, the data a local jsonl file read by a
custom task YAML (dataset_path json + data_files) that reuses lm-eval's own hellaswag process_docs.
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.slow

ITEMS = [
    {"activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow covering the window "
     "of a car, and a woman wearing winter clothes smiles.", "ctx_b": "then", "label": 3,
     "endings": [", the man adds wax to the windshield and cuts it.", ", a person board a ski lift.",
                 ", the man puts on a christmas coat, knitted with netting.",
                 ", the man continues removing the snow on his car."]},
    {"activity_label": "Making tea", "ctx_a": "[header] How to make tea [title] Boil water.", "ctx_b": "pour it",
     "label": 0, "endings": ["into a cup [step] slowly.", "away.", "on the cat.", "out of the window quickly now."]},
    {"activity_label": "Baking cookies", "ctx_a": "A woman is in a kitchen mixing flour.", "ctx_b": "she",
     "label": 2, "endings": ["eats the bowl.", "runs.", "adds sugar and butter to the mix.", "sleeps."]},
    {"activity_label": "Tennis", "ctx_a": "Two players stand on a court.", "ctx_b": "the first player",
     "label": 1, "endings": ["flies.", "serves the ball over the net.", "reads a newspaper about tennis.", "x"]},
]

YAML = """task: gptforge_hellaswag_local
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
process_docs: !function utils.process_docs
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{gold}}}}"
doc_to_choice: "choices"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def run_lm_eval(model_dir, data, include):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    include.mkdir()
    (include / "gptforge_hellaswag_local.yaml").write_text(YAML.format(data=data))
    (include / "utils.py").write_text("from lm_eval.tasks.hellaswag.utils import process_docs, preprocess  # noqa\n")
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32",
                                  tasks=["gptforge_hellaswag_local"], task_manager=TaskManager(include_path=str(include)),
                                  batch_size=2, device="cpu", log_samples=True)
    metrics = out["results"]["gptforge_hellaswag_local"]
    samples = sorted(out["samples"]["gptforge_hellaswag_local"], key=lambda s: s["doc_id"])
    lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    return metrics["acc,none"], metrics["acc_norm,none"], lls


def test_hellaswag_agrees_with_lm_eval(tmp_path, gpt2_ranks, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from gptforge.config import ModelConfig
    from gptforge.evals.hellaswag import evaluate_hellaswag, load_hellaswag
    from gptforge.interop.hf import export_hf
    from gptforge.loading import load_model
    from gptforge.model import GPT
    from gptforge.tokenizer import get_tokenizer

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50257, block_size=128, n_layer=2, n_head=2, n_embd=32, init_std=0.2)).eval()
    tok = get_tokenizer("gpt2")
    hf_dir = export_hf(model, tok, tmp_path / "hf")
    data = tmp_path / "hs.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))

    ref_acc, ref_acc_norm, ref_lls = run_lm_eval(hf_dir, data, tmp_path / "tasks")
    loaded, loaded_tok = load_model(f"hf:{hf_dir}")  # through our own HF import, as `gptforge eval` would
    items, _, _ = load_hellaswag(str(data))
    result = evaluate_hellaswag(loaded, loaded_tok or tok, items, batch_size=3)
    ours = [s["loglikelihoods"] for s in result.samples]
    diff = max(abs(x - y) for a, b in zip(ours, ref_lls) for x, y in zip(a, b))
    print(f"lm-eval acc={ref_acc} acc_norm={ref_acc_norm}; gptforge {result.metrics}; max |ll diff| {diff:.2e}")
    for a, b in zip(ours, ref_lls):
        assert a == pytest.approx(b, abs=1e-4)
    assert result.metrics["acc"] == pytest.approx(ref_acc)
    assert result.metrics["acc_norm"] == pytest.approx(ref_acc_norm)
