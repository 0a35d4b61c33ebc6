"""LAMBADA (Paperno et al. 2016): predict a passage's last word, which needs the whole passage.

As lm-evaluation-harness's `lambada_openai`: the target is " " + the last space-separated word, the context
is everything before it. `acc` counts a passage as right only if every token of the target word is the argmax
given what precedes it (greedy decoding would produce exactly that word); `ppl` is lm-eval's perplexity,
exp(-mean over passages of the target word's total log-probability) — per word, not per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from .result import TaskResult
from .scoring import Request, encode_pair, score_requests
from .sources import Skipped, load_records

if TYPE_CHECKING:
    from ..model import GPT
    from ..tokenizer import Tokenizer

HUB_DEFAULT = "hf:EleutherAI/lambada_openai:default"
HUB_SPLIT = "test"


@dataclass(frozen=True)
class LambadaItem:
    context: str
    target: str  # with its leading space
    where: str


def split_text(text: str) -> tuple[str, str]:
    """(context, " " + last word), splitting on the last space as lm-eval's `text.split(' ')` does."""
    text = text.rstrip()
    context, sep, word = text.rpartition(" ")
    if not sep or not context.strip() or not word:
        raise ValueError("text needs at least two space-separated words (a context and the target word)")
    return context, " " + word


def parse_record(record: dict[str, Any], where: str = "") -> LambadaItem:
    text = record.get("text")
    if not isinstance(text, str):
        raise ValueError("missing string field 'text' (lambada jsonl lines look like {\"text\": \"...\"})")
    return LambadaItem(*split_text(text), where)


def load_lambada(data: str | None, limit: int | None = None) -> tuple[list[LambadaItem], Skipped, str]:
    """Items from a local jsonl file or `hf:NAME[:CONFIG]` (default EleutherAI/lambada_openai, test split)."""
    return load_records(data or HUB_DEFAULT, "lambada", HUB_SPLIT, parse_record, limit,
                        "pass a jsonl file with a \"text\" field per line")


def evaluate_lambada(model: "GPT", tokenizer: "Tokenizer", items: list[LambadaItem], batch_size: int = 16,
                     progress: Callable[[int], None] | None = None) -> TaskResult:
    scores = score_requests(model, [Request(*encode_pair(tokenizer, i.context, i.target)) for i in items],
                            batch_size, progress)
    n = len(items)
    mean_ll = sum(s.logprob for s in scores) / n
    samples = [{"where": i.where, "target": i.target, "loglikelihood": s.logprob, "greedy": s.greedy}
               for i, s in zip(items, scores)]
    return TaskResult("lambada", {"acc": sum(s.greedy for s in scores) / n, "ppl": math.exp(-mean_ll)}, n, "",
                      samples=samples)


def num_requests(items: list[LambadaItem]) -> int:
    return len(items)
