"""Task parsers on small hand-written files in each official format, metrics against hand computations."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from gptforge.config import ModelConfig
from gptforge.errors import UserError
from gptforge.evals import hellaswag, lambada, mmlu, val
from gptforge.evals.report import format_table, to_json, write_json
from gptforge.evals.runner import check_tasks, run_eval_tasks, run_tasks
from gptforge.evals.scoring import Score, encode_pair
from gptforge.model import GPT


@pytest.fixture
def tok(gpt2_ranks):
    from gptforge.tokenizer import get_tokenizer
    return get_tokenizer("gpt2")


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=50257, block_size=64, n_layer=1, n_head=2, n_embd=16)).eval()


def hand_scored(model, tok, context: str, continuation: str) -> list[tuple[torch.Tensor, int]]:
    """(log-probs over the whole vocabulary, target id) at each continuation position, computed directly."""
    ctx, cont = encode_pair(tok, context, continuation)
    whole = (ctx + cont)[-(model.config.block_size + 1):]
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([whole[:-1]]))[0][0].double(), dim=-1)
    return [(logprobs[p], whole[p + 1]) for p in range(len(whole) - 1 - len(cont), len(whole) - 1)]


def hand_ll(model, tok, context: str, continuation: str) -> float:
    return sum(float(row[target]) for row, target in hand_scored(model, tok, context, continuation))


def hand_greedy(model, tok, context: str, continuation: str) -> bool:
    return all(int(row.argmax()) == target for row, target in hand_scored(model, tok, context, continuation))


HS = [
    {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow covering "
     "the window of a car, and a woman wearing winter clothes smiles.", "ctx_b": "then", "ctx": "...",
     "split": "val", "split_type": "indomain", "label": 3, "source_id": "activitynet~v_-1IBHYS3L-Y",
     "endings": [", the man adds wax to the windshield and cuts it.", ", a person board a ski lift, while two men "
                 "supporting the head of the person wearing winter clothes snow as the we girls sled.",
                 ", the man puts on a christmas coat, knitted with netting.",
                 ", the man continues removing the snow on his car."]},
    {"ind": 7, "activity_label": "Making tea", "ctx_a": "[header] How to make tea [title] Boil water.",
     "ctx_b": "pour it", "label": "0", "endings": ["into a cup [step] slowly.", "away.", "on the cat.", "out."]},
]


def write_jsonl(path, records, extra_lines=()):
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_hellaswag_preprocessing_matches_lm_eval():
    assert hellaswag.preprocess("[header] How to make tea [title] Boil water. [step] Pour it.") == \
        " How to make tea. Boil water. Pour it."
    item = hellaswag.parse_record(HS[1])
    assert item.query == "Making tea: How to make tea. Boil water. Pour it"
    assert item.choices[0] == "into a cup slowly." and item.label == 0
    first = hellaswag.parse_record(HS[0])
    assert first.query.startswith("Removing ice from car: Then, the man") and first.query.endswith("smiles. Then")


def test_hellaswag_file_skips_bad_lines_with_line_numbers(tmp_path):
    bad_label = dict(HS[0], label=7)
    no_label = dict(HS[0], label="")
    path = write_jsonl(tmp_path / "hs.jsonl", HS, ["{not json", json.dumps(bad_label), json.dumps(no_label)])
    items, skipped, _ = hellaswag.load_hellaswag(str(path))
    assert len(items) == 2 and skipped.count == 3
    assert f"{path}:3: not valid JSON" in skipped.examples[0]
    assert ":4: label 7 is out of range" in skipped.examples[1]
    assert ":5: no label" in skipped.examples[2]
    assert len(hellaswag.load_hellaswag(str(path), limit=1)[0]) == 1


@pytest.mark.parametrize("content, message", [("", "is empty"), ("{bad\n[1]\n", "no usable records")])
def test_hellaswag_bad_files(tmp_path, content, message):
    path = tmp_path / "hs.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        hellaswag.load_hellaswag(str(path))
    with pytest.raises(UserError, match="does not exist"):
        hellaswag.load_hellaswag(str(tmp_path / "missing.jsonl"))


def test_hellaswag_acc_and_acc_norm_from_given_log_likelihoods(monkeypatch, tok):
    # Gold is the long ending 1. Its total log-likelihood is lower (more tokens to pay for), so acc picks the
    # short ending 0; per character it is far more likely, so acc_norm picks it. (A longer ending with the
    # higher total always wins normalised too: dividing negatives by a larger length brings them nearer 0.)
    record = {"activity_label": "A", "ctx_a": "b", "ctx_b": "c", "label": 1,
              "endings": ["ok.", "a much much longer ending that wins on total log-likelihood."]}
    items = [hellaswag.parse_record(record)]
    given = iter([Score(-6.0, False, 2), Score(-10.0, False, 12)])
    monkeypatch.setattr(hellaswag, "score_requests", lambda m, reqs, b, p: [next(given) for _ in reqs])
    result = hellaswag.evaluate_hellaswag(None, tok, items)
    assert result.metrics == {"acc": 0.0, "acc_norm": 1.0}


def test_hellaswag_metrics_match_hand_scoring(tmp_path, model, tok):
    items, _, _ = hellaswag.load_hellaswag(str(write_jsonl(tmp_path / "hs.jsonl", HS)))
    result = hellaswag.evaluate_hellaswag(model, tok, items, batch_size=3)
    acc = acc_norm = 0
    for item, sample in zip(items, result.samples):
        lls = [hand_ll(model, tok, item.query, " " + c) for c in item.choices]
        assert sample["loglikelihoods"] == pytest.approx(lls, abs=1e-4)
        acc += max(range(len(lls)), key=lambda i: lls[i]) == item.label
        acc_norm += max(range(len(lls)), key=lambda i: lls[i] / len(item.choices[i])) == item.label
    assert result.metrics == {"acc": acc / len(items), "acc_norm": acc_norm / len(items)}


MMLU_ROWS = {
    "abstract_algebra": {
        "dev": [["Find the order of Z_4.", "1", "2", "3", "4", "D"], ["Is Z_2 a field?", "Yes", "No", "Maybe", "Never", "A"]],
        "test": [["What is 2+2?", "3", "4", "5", "6", "B"], ["Group of order 1?", "trivial", "cyclic 2", "S3", "none", "A"]],
    },
    "college_biology": {
        "dev": [["Cells have?", "DNA", "rocks", "gears", "none", "A"], ["Plants make?", "iron", "sugar", "glass", "x", "B"]],
        "test": [["Mitochondria are the?", "powerhouse", "nucleus", "wall", "gene", "A"]],
    },
}


def write_mmlu_csv(root):
    import csv
    for subject, splits in MMLU_ROWS.items():
        for split, rows in splits.items():
            folder = root / "data" / split
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"{subject}_{split}.csv", "w", newline="") as f:
                csv.writer(f).writerows(rows)
    return root


def write_mmlu_parquet(root):
    import pyarrow as pa
    import pyarrow.parquet as pq
    for split in ("dev", "test"):
        rows = [{"question": r[0], "subject": s, "choices": r[1:5], "answer": "ABCD".index(r[5])}
                for s, splits in MMLU_ROWS.items() for r in splits[split]]
        (root / "all").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), root / "all" / f"{split}-00000-of-00001.parquet")
    return root


def test_mmlu_prompt_format():
    item = mmlu.MMLUItem("abstract_algebra", " What is 2+2? ", ("3", "4", "5", "6"), 1, "")
    shot = mmlu.MMLUItem("abstract_algebra", "Order of Z_4?", ("1", "2", "3", "4"), 3, "")
    assert mmlu.build_prompt(item, [shot]) == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Order of Z_4?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: D\n\n"
        "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")


def test_mmlu_csv_and_parquet_layouts_agree(tmp_path):
    csv_data, _, _ = mmlu.load_mmlu(str(write_mmlu_csv(tmp_path / "csv")), shots=1)
    pq_data, _, _ = mmlu.load_mmlu(str(write_mmlu_parquet(tmp_path / "pq")), shots=1)
    strip = lambda items: [(i.subject, i.question, i.choices, i.answer) for i in items]  # noqa: E731
    assert len(csv_data.items) == 3
    assert strip(csv_data.items) == strip(pq_data.items)
    assert {s: strip(v) for s, v in csv_data.shots.items()} == {s: strip(v) for s, v in pq_data.shots.items()}
    assert csv_data.shots["abstract_algebra"][0].question == "Find the order of Z_4."


def test_mmlu_bad_input(tmp_path):
    root = write_mmlu_csv(tmp_path / "m")
    with open(root / "data" / "test" / "abstract_algebra_test.csv", "a") as f:
        f.write("only,five,columns,here,x\nQ,a,b,c,d,E\n")
    data, skipped, _ = mmlu.load_mmlu(str(root))
    assert len(data.items) == 3 and skipped.count == 2
    assert "abstract_algebra_test.csv:3: expected 6 columns" in skipped.examples[0]
    assert ":4: answer 'E' is not A-D" in skipped.examples[1]
    with pytest.raises(UserError, match="3-shot needs 3 dev examples"):
        mmlu.load_mmlu(str(root), shots=3)
    with pytest.raises(UserError, match="no val/ folder"):
        mmlu.load_mmlu(str(root), split="val")
    with pytest.raises(UserError, match="does not exist"):
        mmlu.load_mmlu(str(tmp_path / "nope"))


def test_mmlu_csv_saved_with_a_byte_order_mark_reads_the_same(tmp_path):
    plain, _, _ = mmlu.load_mmlu(str(write_mmlu_csv(tmp_path / "plain")), shots=1)
    root = write_mmlu_csv(tmp_path / "bom")  # Excel's "CSV UTF-8" starts the file with a BOM
    for path in (root / "data").rglob("*.csv"):
        path.write_bytes("\ufeff".encode() + path.read_bytes())
    data, skipped, _ = mmlu.load_mmlu(str(root), shots=1)
    assert [i.question for i in data.items] == [i.question for i in plain.items] and skipped.count == 0
    assert data.shots["abstract_algebra"][0].question == "Find the order of Z_4."


def test_mmlu_csv_that_is_not_utf8_names_the_file(tmp_path):
    root = write_mmlu_csv(tmp_path / "m")
    bad = next((root / "data" / "test").glob("*_test.csv"))
    bad.write_bytes("Qu\u00e9?,a,b,c,d,A\n".encode("latin-1"))
    with pytest.raises(UserError, match=f"MMLU file {bad} is not UTF-8"):
        mmlu.load_mmlu(str(root))


def test_mmlu_per_subject_and_macro_average(tmp_path, model, tok):
    data, _, _ = mmlu.load_mmlu(str(write_mmlu_csv(tmp_path / "m")), shots=1)
    result = mmlu.evaluate_mmlu(model, tok, data, batch_size=2)
    item = data.items[0]
    prompt = mmlu.build_prompt(item, data.shots[item.subject])
    hand = [hand_ll(model, tok, prompt, " " + letter) for letter in "ABCD"]
    assert result.samples[0]["loglikelihoods"] == pytest.approx(hand, abs=1e-4)
    per = {}
    for s in result.samples:
        right = max(range(4), key=lambda i: s["loglikelihoods"][i]) == s["answer"]
        per.setdefault(s["subject"], []).append(right)
    assert result.details["per_subject"]["college_biology"]["n"] == 1
    assert result.metrics["acc"] == pytest.approx(sum(sum(v) / len(v) for v in per.values()) / len(per))
    assert result.metrics["acc_micro"] == pytest.approx(sum(sum(v) for v in per.values()) / 3)


def test_lambada_split_parse_and_metrics(tmp_path, model, tok):
    assert lambada.split_text("he said hello to the dog") == ("he said hello to the", " dog")
    path = write_jsonl(tmp_path / "l.jsonl", [{"text": "the cat sat on the mat"}, {"text": "one two three four"}],
                       ['{"txt": "x"}', '{"text": "single"}'])
    items, skipped, _ = lambada.load_lambada(str(path))
    assert [i.target for i in items] == [" mat", " four"] and skipped.count == 2
    assert ":3: missing string field 'text'" in skipped.examples[0]
    mat = tok.encode(" mat")
    assert len(mat) == 1
    with torch.no_grad():  # every position now predicts " mat": the first item is greedy, the second is not
        model.transformer.ln_f.weight.zero_()
        model.transformer.wte.weight[mat[0]] *= 10
        model.transformer.ln_f.bias.copy_(model.transformer.wte.weight[mat[0]])
    result = lambada.evaluate_lambada(model, tok, items)
    lls = [hand_ll(model, tok, i.context, i.target) for i in items]
    greedy = [hand_greedy(model, tok, i.context, i.target) for i in items]
    assert greedy == [True, False]
    assert result.metrics["ppl"] == pytest.approx(math.exp(-sum(lls) / 2), rel=1e-4)
    assert result.metrics["acc"] == sum(greedy) / 2


TEXT = "Le café était naïve — ünïcödé text, 東京. " * 2


def test_bits_per_byte_by_hand_single_window(tmp_path, model, tok):
    tokens = tok.encode(TEXT)
    assert len(tokens) < model.config.block_size
    result = val.evaluate_val(model, tok, tokens)
    stream = [tok.eot_id] + tokens
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([stream[:-1]]))[0][0].double(), dim=-1)
    nats = -sum(float(logprobs[i, stream[i + 1]]) for i in range(len(tokens)))
    assert result.details["bytes"] == len(TEXT.encode("utf-8")) != len(TEXT)
    assert result.metrics["bpb"] == pytest.approx(nats / math.log(2) / len(TEXT.encode("utf-8")), rel=1e-5)
    assert result.metrics["loss"] == pytest.approx(nats / len(tokens), rel=1e-5)
    assert result.metrics["ppl"] == pytest.approx(math.exp(nats / len(tokens)), rel=1e-5)


def test_strided_windows_score_every_token_once_with_full_context(tok):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50257, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    tokens = tok.encode(TEXT * 2)[:60]
    block = model.config.block_size
    assert len(tokens) > 2 * block
    result = val.evaluate_val(model, tok, tokens, stride=1, batch_size=32)
    stream = [tok.eot_id] + tokens
    nats = 0.0
    with torch.no_grad():  # stride 1: token j is predicted from exactly the block tokens before it
        for j in range(1, len(stream)):
            context = stream[max(0, j - block):j]
            nats -= float(F.log_softmax(model(torch.tensor([context]))[0][0, -1].double(), -1)[stream[j]])
    assert result.n == len(tokens)
    assert result.metrics["loss"] == pytest.approx(nats / len(tokens), rel=1e-5)
    spans = list(val.windows(len(tokens), block, block // 2))
    assert len(spans) == val.count_windows(len(tokens), block, block // 2)
    assert [s for _, s, _ in spans][1:] == [e for _, _, e in spans][:-1] and spans[-1][2] == len(tokens) + 1


def test_val_on_a_prepared_split(tmp_path, model, tok):
    import numpy as np
    from gptforge.data.shards import write_shard
    doc = tok.encode(TEXT)
    tokens = np.array(doc + [tok.eot_id] + doc, dtype=np.uint16)
    data = tmp_path / "prepared"
    data.mkdir()
    from gptforge.data.prepare import MANIFEST_FORMAT, MANIFEST_VERSION
    shards = [{"file": "val_000000.bin", "tokens": int(tokens.size)}]
    (data / "manifest.json").write_text(json.dumps({"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION,
                                                    "splits": {"val": {"tokens": int(tokens.size), "shards": shards}}}))
    write_shard(data / "val_000000.bin", tokens, np.uint16)
    write_shard(data / "val_extra_000000.bin", tokens[:3], np.uint16)  # matches val_*.bin; not in the manifest
    (result,) = run_tasks(model, tok, ["val"], {"val": str(data)})
    direct = val.evaluate_val(model, tok, tokens.astype(np.int64), stride=model.config.block_size)
    assert result.metrics["loss"] == pytest.approx(direct.metrics["loss"])
    assert result.details["bytes"] == 2 * len(TEXT.encode("utf-8"))  # the eot separator has no bytes
    with pytest.raises(UserError, match="no train split"):
        val.resolve_val_source(str(data), split="train")


def test_results_json_and_table(tmp_path, model, tok):
    hs = write_jsonl(tmp_path / "hs.jsonl", HS, ["oops"])
    lb = write_jsonl(tmp_path / "l.jsonl", [{"text": "the cat sat on the mat"}])
    results = run_tasks(model, tok, ["hellaswag", "lambada"], {"hellaswag": str(hs), "lambada": str(lb)})
    out = tmp_path / "out" / "results.json"
    write_json(out, to_json(results, {"model": "tiny"}, samples=True))
    doc = json.loads(out.read_text())
    assert set(doc["metrics"]) == {"hellaswag/acc", "hellaswag/acc_norm", "lambada/acc", "lambada/ppl"}
    assert doc["tasks"]["hellaswag"]["n"] == 2 and doc["tasks"]["hellaswag"]["skipped"] == 1
    assert doc["tasks"]["hellaswag"]["source"] == str(hs) and len(doc["tasks"]["lambada"]["samples"]) == 1
    table = format_table(results)
    assert "hellaswag  acc_norm" in table and table.count("\n") == 5
    flat = run_eval_tasks(model, tok, ["lambada"], {"lambada": str(lb)})
    assert flat == {"lambada/acc": doc["metrics"]["lambada/acc"], "lambada/ppl": doc["metrics"]["lambada/ppl"]}


def test_unknown_task_and_missing_val_data():
    with pytest.raises(UserError, match="did you mean hellaswag"):
        check_tasks(["helaswag"])
    with pytest.raises(UserError, match="val task needs --data"):
        val.resolve_val_source(None)


def test_hub_code_path_with_a_local_dataset_folder(tmp_path, monkeypatch):
    # `hf:NAME` goes through datasets.load_dataset; a local folder exercises that path without the network.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path / "hub_hellaswag"
    folder.mkdir()
    write_jsonl(folder / "validation.jsonl", HS)
    items, skipped, source = hellaswag.load_hellaswag(f"hf:{folder}")
    assert [i.label for i in items] == [3, 0] and skipped.count == 0 and source == f"hf:{folder}"
    with pytest.raises(UserError, match="could not load hub dataset"):
        lambada.load_lambada(f"hf:{folder}")  # no test split there
