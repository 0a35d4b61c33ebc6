"""Evaluation: one shared log-likelihood scorer (`scoring`) and the tasks built on it — held-out loss and
bits-per-byte (`val`), HellaSwag, MMLU and LAMBADA — scored the way lm-evaluation-harness scores them."""

from .result import TaskResult
from .runner import TASKS, EvalOptions, run_eval_tasks, run_tasks
from .scoring import Request, Score, best_choice, encode_pair, score_requests

__all__ = ["EvalOptions", "Request", "Score", "TASKS", "TaskResult", "best_choice", "encode_pair",
           "run_eval_tasks", "run_tasks", "score_requests"]
