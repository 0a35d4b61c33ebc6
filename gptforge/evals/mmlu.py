"""MMLU (Hendrycks et al. 2021): 57 subjects of four-way multiple choice, scored on the answer letter.

Prompt (lm-evaluation-harness's default MMLU template, which is the original release's minus its double
space): "The following are multiple choice questions (with answers) about SUBJECT.\\n\\n", then k solved
dev examples separated by blank lines, then the question as "Q\\nA. a\\nB. b\\nC. c\\nD. d\\nAnswer:". The model's
log-probs of " A", " B", " C", " D" after it decide. We report accuracy per subject, their macro average
(`acc`, each subject weighs the same, as the MMLU paper) and the micro average over all questions.

Layouts read: the original release (`data/{dev,val,test}/SUBJECT_SPLIT.csv`, no header: question, A, B, C, D,
answer letter), the Hugging Face `cais/mmlu` layout (parquet/json files named SPLIT-*.parquet or SPLIT.jsonl with
question, subject, choices, answer index; its `all/` folder when present), and `hf:cais/mmlu[:CONFIG]`.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..data.readers import TEXT_ENCODING
from ..errors import UserError
from .result import TaskResult
from .scoring import Request, best_choice, encode_pair, score_requests
from .sources import HF_PREFIX, Skipped, hub_rows, iter_file_records, new_skipped

if TYPE_CHECKING:
    from ..model import GPT
    from ..tokenizer import Tokenizer

LETTERS = ("A", "B", "C", "D")
HUB_DEFAULT = "hf:cais/mmlu:all"
SPLIT_ALIASES = {"test": ("test",), "dev": ("dev",), "val": ("val", "validation"), "validation": ("val", "validation")}


@dataclass(frozen=True)
class MMLUItem:
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int
    where: str


def header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def format_question(item: MMLUItem, with_answer: bool) -> str:
    text = item.question.strip() + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, item.choices))
    return text + "\nAnswer:" + (f" {LETTERS[item.answer]}" if with_answer else "")


def build_prompt(item: MMLUItem, shots: list[MMLUItem]) -> str:
    """The context scored before " A"/" B"/" C"/" D": header, k solved examples, the question."""
    examples = [format_question(s, True) for s in shots] + [format_question(item, False)]
    return header(item.subject) + "\n\n".join(examples)


def _answer_index(raw: Any) -> int:
    if isinstance(raw, str) and raw.strip().upper() in LETTERS:
        return LETTERS.index(raw.strip().upper())
    if isinstance(raw, bool):
        raise ValueError(f"answer {raw!r} is not A-D or 0-3")
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise ValueError(f"answer {raw!r} is not A-D or 0-3") from None
    if not 0 <= value < 4:
        raise ValueError(f"answer {value} is out of range (0-3, or A-D)")
    return value


def parse_row(row: dict[str, Any], where: str, subject: str | None = None) -> MMLUItem:
    """A cais/mmlu-style row (question, subject, choices, answer) -> item; ValueError names the bad field."""
    for key in ("question", "choices", "answer"):
        if key not in row:
            raise ValueError(f"missing field {key!r} (MMLU rows need question, subject, choices, answer)")
    subject = row.get("subject") or subject
    if not subject or not isinstance(subject, str):
        raise ValueError("missing field 'subject'")
    choices = row["choices"]
    if not isinstance(choices, (list, tuple)) or len(choices) != 4:
        raise ValueError("field 'choices' must be a list of four answers")
    if not isinstance(row["question"], str):
        raise ValueError("field 'question' must be a string")
    return MMLUItem(subject, row["question"], tuple(str(c) for c in choices), _answer_index(row["answer"]), where)


def _read_csv(path: Path, subject: str, skipped: Skipped) -> list[MMLUItem]:
    """The items of one original-release CSV; a file that cannot be read as UTF-8 stops with a UserError."""
    try:
        with open(path, newline="", encoding=TEXT_ENCODING) as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError as e:
        raise UserError(f"MMLU file {path} is not UTF-8 text ({e.reason}); restore it from the MMLU release "
                        "or re-save it as UTF-8") from None
    except (OSError, csv.Error) as e:
        raise UserError(f"MMLU file {path} cannot be read ({e}); check the file") from None
    items = []
    for lineno, fields in enumerate(rows, start=1):
        where = f"{path}:{lineno}"
        if not fields or not any(fields):
            continue
        if len(fields) != 6:
            skipped.add(where, f"expected 6 columns (question, A, B, C, D, answer), found {len(fields)}")
            continue
        try:
            items.append(MMLUItem(subject, fields[0], tuple(fields[1:5]), _answer_index(fields[5]), where))
        except ValueError as e:
            skipped.add(where, str(e))
    return items


def _csv_root(root: Path) -> Path | None:
    for candidate in (root / "data", root):
        if any((candidate / s).is_dir() for s in ("dev", "val", "test")):
            return candidate
    return None


def _load_csv_split(root: Path, split: str, skipped: Skipped) -> list[MMLUItem]:
    folder = next((root / name for name in SPLIT_ALIASES.get(split, (split,)) if (root / name).is_dir()), None)
    if folder is None:
        raise UserError(f"MMLU data {root}: no {split}/ folder; the original layout is data/dev, data/val, "
                        "data/test with SUBJECT_SPLIT.csv files")
    files = sorted(folder.glob(f"*_{folder.name}.csv"))
    if not files:
        raise UserError(f"MMLU data {folder}: no *_{folder.name}.csv files; expected e.g. "
                        f"abstract_algebra_{folder.name}.csv")
    items = []
    for path in files:
        if path.stat().st_size == 0:
            raise UserError(f"MMLU file {path} is empty; restore it from the MMLU release")
        items.extend(_read_csv(path, path.name[: -len(f"_{folder.name}.csv")], skipped))
    return items


def _hf_files(root: Path, split: str) -> list[Path]:
    base = root / "all" if (root / "all").is_dir() else root
    names = SPLIT_ALIASES.get(split, (split,))
    return sorted(p for p in base.rglob("*") if p.is_file() and p.suffix in (".parquet", ".jsonl", ".json")
                  and any(p.name == f"{n}{p.suffix}" or p.name.startswith(f"{n}-") for n in names))


def _load_hf_files(files: list[Path], skipped: Skipped) -> list[MMLUItem]:
    items = []
    for path in files:
        for where, row in iter_file_records(path, "MMLU file", skipped):
            try:
                items.append(parse_row(row, where))
            except ValueError as e:
                skipped.add(where, str(e))
    return items


def load_split(data: str | None, split: str, skipped: Skipped) -> list[MMLUItem]:
    """All items of `split` from a local MMLU folder (either layout), a single file, or the hub."""
    spec = data or HUB_DEFAULT
    if spec.startswith(HF_PREFIX):
        hub_split = "validation" if split == "val" else split
        items = []
        for where, row in hub_rows(spec, hub_split, "mmlu --data", skipped, default_config="all"):
            try:
                items.append(parse_row(row, where))
            except ValueError as e:
                skipped.add(where, str(e))
        return items
    root = Path(spec)
    if not root.exists():
        raise UserError(f"MMLU data {root} does not exist; pass the MMLU folder (data/dev, data/test, ...) "
                        "or a cais/mmlu parquet folder to --data")
    if root.is_file():  # one file holds the evaluated split; dev examples come from its siblings
        if split == "test":
            return _load_hf_files([root], skipped)
        files = _hf_files(root.parent, split)
    else:
        csv_root = _csv_root(root)
        if csv_root is not None:
            return _load_csv_split(csv_root, split, skipped)
        files = _hf_files(root, split)
    if not files:
        raise UserError(f"MMLU data {spec}: no {split} split found (looked for data/{split}/*.csv and "
                        f"{split}-*.parquet / {split}.jsonl); check the path or the split")
    return _load_hf_files(files, skipped)


@dataclass
class MMLUData:
    items: list[MMLUItem]
    shots: dict[str, list[MMLUItem]]  # subject -> its first k dev examples


def load_mmlu(data: str | None, split: str = "test", shots: int = 0, limit: int | None = None,
              subjects: list[str] | None = None) -> tuple[MMLUData, Skipped, str]:
    """Questions to score plus, for k-shot, each subject's first k dev examples (lm-eval's first_n)."""
    if shots < 0:
        raise UserError(f"--shots must be 0 or more, got {shots}")
    skipped = new_skipped()
    items = load_split(data, split, skipped)
    if subjects:
        unknown = sorted(set(subjects) - {i.subject for i in items})
        if unknown:
            raise UserError(f"MMLU data {data}: no subject {', '.join(unknown)} in the {split} split")
        items = [i for i in items if i.subject in subjects]
    if limit is not None:
        items = items[:limit]
    if not items:
        raise UserError(f"MMLU data {data or HUB_DEFAULT}: no usable {split} questions ({skipped.count} skipped"
                        f"{': ' + skipped.examples[0] if skipped.examples else ''})")
    dev: dict[str, list[MMLUItem]] = defaultdict(list)
    if shots:
        for item in load_split(data, "dev", skipped):
            dev[item.subject].append(item)
        missing = sorted({i.subject for i in items} - {s for s, v in dev.items() if len(v) >= shots})
        if missing:
            raise UserError(f"MMLU data {data or HUB_DEFAULT}: {shots}-shot needs {shots} dev examples per subject; "
                            f"{', '.join(missing[:3])} {'has' if len(missing) == 1 else 'have'} fewer; "
                            "lower --shots")
    return MMLUData(items, {s: v[:shots] for s, v in dev.items()}), skipped, data or HUB_DEFAULT


def evaluate_mmlu(model: "GPT", tokenizer: "Tokenizer", data: MMLUData, batch_size: int = 16,
                  progress: Callable[[int], None] | None = None) -> TaskResult:
    """Per-subject accuracy, macro average (`acc`) and micro average (`acc_micro`)."""
    requests = []
    for item in data.items:
        context = build_prompt(item, data.shots.get(item.subject, []))
        requests.extend(Request(*encode_pair(tokenizer, context, " " + letter)) for letter in LETTERS)
    scores = score_requests(model, requests, batch_size, progress)
    per_subject: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    samples = []
    for n, item in enumerate(data.items):
        lls = [s.logprob for s in scores[4 * n: 4 * n + 4]]
        pred = best_choice(lls)
        per_subject[item.subject][0] += pred == item.answer
        per_subject[item.subject][1] += 1
        samples.append({"where": item.where, "subject": item.subject, "answer": item.answer, "pred": pred,
                        "loglikelihoods": lls})
    accuracy = {s: c / t for s, (c, t) in sorted(per_subject.items())}
    total_correct = sum(c for c, _ in per_subject.values())
    metrics = {"acc": sum(accuracy.values()) / len(accuracy), "acc_micro": total_correct / len(data.items)}
    details = {"per_subject": {s: {"acc": a, "n": per_subject[s][1]} for s, a in accuracy.items()}}
    return TaskResult("mmlu", metrics, len(data.items), "", details=details, samples=samples)


def num_requests(data: MMLUData) -> int:
    return 4 * len(data.items)
