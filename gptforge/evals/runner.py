"""Run several evaluation tasks on one model: read every task's data first, then score, with one progress bar
per task. `run_eval_tasks` is the flat-metrics entry point the trainer calls every N steps; `run_tasks`
returns full `TaskResult`s for the CLI's table and JSON report.

Data is read before any scoring (and, in the CLI, before the model is loaded) so a wrong path or an empty file
fails in a second, not after an hour of scoring other tasks. Parsed data is cached per (task, source, limit,
options), so a trainer evaluating every N steps reads and parses its files once.
"""

from __future__ import annotations

import contextlib
import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ..errors import UserError
from . import hellaswag, lambada, mmlu, val
from .result import TaskResult
from .sources import Skipped

if TYPE_CHECKING:
    from ..model import GPT
    from ..tokenizer import Tokenizer

TASKS = ("val", "hellaswag", "mmlu", "lambada")


@dataclass(frozen=True)
class EvalOptions:
    """Task options beyond the common ones: MMLU's shots and split, val's split and stride."""

    shots: int = 0
    mmlu_split: str = "test"
    val_split: str = "val"
    stride: int | None = None


@dataclass
class LoadedTask:
    task: str
    data: Any
    skipped: Skipped
    source: str


_CACHE: dict[tuple[Any, ...], LoadedTask] = {}


def check_tasks(tasks: list[str]) -> list[str]:
    if not tasks:
        raise UserError("no task given; choose --task from " + ", ".join(TASKS))
    for task in tasks:
        if task not in TASKS:
            close = difflib.get_close_matches(task, TASKS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"unknown --task {task!r}{hint}; tasks: {', '.join(TASKS)}")
    return list(dict.fromkeys(tasks))


def parse_data(values: list[str], tasks: list[str], option: str = "--data") -> dict[str, str]:
    """`PATH` (one task) or `TASK=PATH` (any number of tasks) -> {task: spec}."""
    mapping: dict[str, str] = {}
    for value in values:
        task, sep, path = value.partition("=")
        if sep and task in tasks:
            mapping[task] = path
        elif len(tasks) == 1:
            mapping[tasks[0]] = value
        else:
            raise UserError(f"{option} {value}: with several tasks write {option} TASK=PATH "
                            f"(tasks: {', '.join(tasks)})")
    return mapping


def load_task(task: str, data: str | None, limit: int | None, options: EvalOptions = EvalOptions()) -> LoadedTask:
    """Read and validate one task's data (no model needed)."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    key = (task, data, limit, options)
    if key in _CACHE:
        return _CACHE[key]
    if task == "val":
        source = val.resolve_val_source(data, options.val_split)
        loaded = LoadedTask(task, source, Skipped(), str(source.path))
    elif task == "hellaswag":
        loaded = LoadedTask(task, *hellaswag.load_hellaswag(data, limit))
    elif task == "mmlu":
        loaded = LoadedTask(task, *mmlu.load_mmlu(data, options.mmlu_split, options.shots, limit))
    elif task == "lambada":
        loaded = LoadedTask(task, *lambada.load_lambada(data, limit))
    else:
        check_tasks([task])
        raise AssertionError(task)
    if task != "val":  # val's tokens depend on the model's tokenizer; its source check is cheap anyway
        _CACHE[key] = loaded
    return loaded


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int | None, desc: str) -> Iterator[Callable[[int], None] | None]:
    if not enabled:
        yield None
        return
    from tqdm import tqdm
    with tqdm(total=total, desc=desc, unit="req", leave=False, dynamic_ncols=True) as bar:
        yield bar.update


def score_task(model: "GPT", tokenizer: "Tokenizer", loaded: LoadedTask, batch_size: int, limit: int | None,
               options: EvalOptions = EvalOptions(), progress: bool = False) -> TaskResult:
    """Score one loaded task and attach where its data came from and what was skipped reading it."""
    task = loaded.task
    if task == "val" and loaded.data.chat:  # conversations: the masked loss, as SFT validates (see evals/val.py)
        total = val.count_chat_rows(loaded.data, model.config.block_size, limit)
        with _progress_bar(progress, total, "val") as update:
            result = val.evaluate_chat_val(model, tokenizer, loaded.data, batch_size, limit, options.stride, update)
    elif task == "val":
        tokens = val.load_val_tokens(loaded.data, tokenizer)
        block = model.config.block_size
        stride = options.stride or (block if loaded.data.prepared else max(1, block // 2))
        total = val.count_windows(len(tokens), block, stride)
        total = min(total, limit) if limit else total
        with _progress_bar(progress, total, "val") as update:
            result = val.evaluate_val(model, tokenizer, tokens, stride, batch_size, limit,
                                      loaded.data.prepared, update)
    else:
        module = {"hellaswag": hellaswag, "mmlu": mmlu, "lambada": lambada}[task]
        evaluate = getattr(module, f"evaluate_{task}")
        with _progress_bar(progress, module.num_requests(loaded.data), task) as update:
            result = evaluate(model, tokenizer, loaded.data, batch_size, update)
    result.source = loaded.source
    result.skipped = loaded.skipped
    return result


def run_tasks(model: "GPT", tokenizer: "Tokenizer", tasks: list[str], data: dict[str, str] | None = None,
              limit: int | None = None, batch_size: int = 16, options: EvalOptions = EvalOptions(),
              progress: bool = False) -> list[TaskResult]:
    """Full results of `tasks`, data read for all of them before the first is scored."""
    tasks = check_tasks(tasks)
    data = data or {}
    unknown = sorted(set(data) - set(tasks))
    if unknown:
        raise UserError(f"data given for {', '.join(unknown)}, which is not among the tasks run ({', '.join(tasks)})")
    loaded = [load_task(task, data.get(task), limit, options) for task in tasks]
    check_tokenizer(model, tokenizer)
    return [score_task(model, tokenizer, item, batch_size, limit, options, progress) for item in loaded]


def check_tokenizer(model: "GPT", tokenizer: "Tokenizer | None") -> None:
    if tokenizer is None:
        raise UserError("this model has no tokenizer saved with it; evaluation needs one (a run directory or "
                        "checkpoint with tokenizer/, or a GPT-2-vocabulary model)")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {model.config.vocab_size}; "
                        "they do not belong together")


def run_eval_tasks(model: "GPT", tokenizer: "Tokenizer", tasks: list[str], data: dict[str, str] | None = None,
                   limit: int | None = None, batch_size: int = 16) -> dict[str, float]:
    """Flat metrics ("hellaswag/acc_norm", "val/bpb", ...) for the trainer's periodic evaluation.

    `data` maps task -> local path or "hf:NAME"; a task without an entry reads its hub default (needs the
    network or the HF cache; val always needs an entry). No progress bar; the model's train/eval mode is
    restored afterwards.
    """
    metrics: dict[str, float] = {}
    for result in run_tasks(model, tokenizer, tasks, data, limit, batch_size):
        metrics.update(result.flat_metrics())
    return metrics
