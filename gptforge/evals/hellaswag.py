"""HellaSwag (Zellers et al. 2019): pick the most likely of four endings, scored as lm-evaluation-harness does.

Text preparation is lm-eval's `hellaswag` task verbatim: the query is
`preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())`, each choice is `preprocess(ending)`,
and the continuation scored is " " + choice. `acc` takes the ending with the highest summed log-probability;
`acc_norm` divides each by the ending's length in characters first (lm-eval's `completion_len`, computed on
the choice string without the leading space) — so numbers here are comparable with published lm-eval ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from .result import TaskResult
from .scoring import Request, best_choice, encode_pair, score_requests
from .sources import Skipped, load_records

if TYPE_CHECKING:
    from ..model import GPT
    from ..tokenizer import Tokenizer

HUB_DEFAULT = "hf:Rowan/hellaswag"
HUB_SPLIT = "validation"
TARGET_DELIMITER = " "


@dataclass(frozen=True)
class HellaSwagItem:
    query: str
    choices: tuple[str, ...]
    label: int
    where: str


def preprocess(text: str) -> str:
    """lm-eval's hellaswag clean-up: WikiHow's " [title]" becomes ". ", other [bracketed] markup goes."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def parse_record(record: dict[str, Any], where: str = "") -> HellaSwagItem:
    """One official-format record -> item; ValueError says which field is wrong."""
    for key in ("activity_label", "ctx_a", "ctx_b", "endings", "label"):
        if key not in record:
            raise ValueError(f"missing field {key!r} (hellaswag jsonl needs activity_label, ctx_a, ctx_b, "
                             "endings, label)")
    for key in ("activity_label", "ctx_a", "ctx_b"):
        if not isinstance(record[key], str):
            raise ValueError(f"field {key!r} must be a string")
    endings = record["endings"]
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        raise ValueError("field 'endings' must be a list of at least two strings")
    raw_label = record["label"]
    if raw_label in ("", None):
        raise ValueError("no label (the official test split has none; evaluate on the validation file)")
    try:
        if isinstance(raw_label, bool) or (isinstance(raw_label, float) and not raw_label.is_integer()):
            raise ValueError
        label = int(raw_label)
    except (TypeError, ValueError):
        raise ValueError(f"label {raw_label!r} is not an integer") from None
    if not 0 <= label < len(endings):
        raise ValueError(f"label {label} is out of range for {len(endings)} endings (0..{len(endings) - 1})")
    ctx = record["ctx_a"] + " " + record["ctx_b"].capitalize()
    query = preprocess(record["activity_label"] + ": " + ctx)
    return HellaSwagItem(query, tuple(preprocess(e) for e in endings), label, where)


def load_hellaswag(data: str | None, limit: int | None = None) -> tuple[list[HellaSwagItem], Skipped, str]:
    """Items from a local jsonl/json file, or `hf:NAME` (default Rowan/hellaswag, validation split)."""
    return load_records(data or HUB_DEFAULT, "hellaswag", HUB_SPLIT, parse_record, limit,
                        "pass a hellaswag jsonl file (ctx_a, ctx_b, activity_label, endings, label)")


def evaluate_hellaswag(model: "GPT", tokenizer: "Tokenizer", items: list[HellaSwagItem], batch_size: int = 16,
                       progress: Callable[[int], None] | None = None) -> TaskResult:
    """acc and acc_norm over `items`; per-item log-likelihoods go to `samples` for comparisons."""
    requests = [Request(*encode_pair(tokenizer, item.query, TARGET_DELIMITER + choice))
                for item in items for choice in item.choices]
    scores = score_requests(model, requests, batch_size, progress)
    correct = correct_norm = 0
    samples = []
    offset = 0
    for item in items:
        lls = [s.logprob for s in scores[offset:offset + len(item.choices)]]
        offset += len(item.choices)
        pred = best_choice(lls)
        pred_norm = best_choice(lls, [len(c) for c in item.choices])
        correct += pred == item.label
        correct_norm += pred_norm == item.label
        samples.append({"where": item.where, "label": item.label, "pred": pred, "pred_norm": pred_norm,
                        "loglikelihoods": lls})
    n = len(items)
    return TaskResult("hellaswag", {"acc": correct / n, "acc_norm": correct_norm / n}, n, "", samples=samples)


def num_requests(items: list[HellaSwagItem]) -> int:
    return sum(len(item.choices) for item in items)
