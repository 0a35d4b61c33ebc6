"""`builtin:pystdlib-qa`: question/answer conversations cut from the local Python standard library.

For every public module, class, function and method with a docstring: "What does `json.dumps` do?" ->
the first paragraph of its docstring. The sources are parsed with `ast`, never imported (importing
`antigravity` opens a browser, `this` prints a poem), and walked in sorted order, so the same Python gives
the same pairs on every machine, offline. Answers are kept short (the first paragraph, at most
`MAX_ANSWER_CHARS`) so a conversation fits the demo model's 128-token context.
"""

from __future__ import annotations

import ast
import inspect
import re
import sysconfig
from pathlib import Path
from typing import Any, Iterator

SOURCE = "builtin:pystdlib-qa"
MIN_ANSWER_CHARS = 24
MAX_ANSWER_CHARS = 240
# modules that are demos, tools or interpreter internals rather than library API
_SKIP_TOP = frozenset({"idlelib", "lib2to3", "turtledemo", "pydoc_data", "ensurepip", "venv", "test", "tests",
                       "this", "antigravity", "__phello__"})
_SIGNATURE = re.compile(r"^[\w.]+\(.*\)\s*(->|$)")


def _module_name(root: Path, path: Path) -> str | None:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if not parts or parts[0] in _SKIP_TOP or any(p.startswith("_") for p in parts):
        return None
    return ".".join(parts)


def first_paragraph(docstring: str) -> str | None:
    """The docstring's first paragraph on one line, or None when it is too short, too long or a signature."""
    paragraph = inspect.cleandoc(docstring).split("\n\n", 1)[0]
    text = " ".join(paragraph.split())
    if not MIN_ANSWER_CHARS <= len(text) <= MAX_ANSWER_CHARS or _SIGNATURE.match(text):
        return None
    return text


def _pairs_in(tree: ast.Module, module: str) -> Iterator[tuple[str, str]]:
    doc = ast.get_docstring(tree)
    answer = first_paragraph(doc) if doc else None
    if answer:
        yield f"What is the `{module}` module for?", answer
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            name = f"{module}.{node.name}"
            doc = ast.get_docstring(node)
            answer = first_paragraph(doc) if doc else None
            if answer:
                question = f"What is `{name}`?" if isinstance(node, ast.ClassDef) else f"What does `{name}` do?"
                yield question, answer
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and not item.name.startswith("_"):
                        doc = ast.get_docstring(item)
                        answer = first_paragraph(doc) if doc else None
                        if answer:
                            yield f"What does `{name}.{item.name}` do?", answer


def qa_pairs(root: str | Path | None = None) -> Iterator[tuple[str, str]]:
    """(question, answer) pairs from the standard library at `root` (default: this interpreter's), in a fixed
    order; files that do not parse (a few are deliberately broken test inputs) are skipped."""
    from .sources import list_folder

    root = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    for path in list_folder(root, "*.py", frozenset({"site-packages", "dist-packages", "__pycache__"})):
        module = _module_name(root, path)
        if module is None:
            continue
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):
            continue
        for question, answer in _pairs_in(tree, module):
            if question not in seen:  # a name defined twice (platform branches) keeps its first docstring
                seen.add(question)
                yield question, answer


def qa_records(root: str | Path | None = None) -> Iterator[dict[str, Any]]:
    """The pairs as `messages` records, the format `prepare --chat` reads."""
    for question, answer in qa_pairs(root):
        yield {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
