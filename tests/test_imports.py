"""The package's layering, read from the source: no import cycles, and inference never imports training.

Imports are read with `ast` (nothing is executed), resolved to gptforge modules, and followed as Python
would: `from . import x` where x is a submodule depends on the submodule, not on the package's __init__;
imports under `if TYPE_CHECKING:` never run and are ignored.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gptforge"


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


MODULES = _modules()


def _imports(name: str, module_level_only: bool) -> set[str]:
    path, is_package = MODULES[name]
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                submodules = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
                found.update(submodules)
                if len(submodules) < len(node.names):
                    found.add(target)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if not module_level_only:
                    visit(node.body)
                continue
            for field in ("body", "orelse", "finalbody", "handlers"):
                visit(getattr(node, field, None) or [])

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return {m for m in found if m in MODULES and m != name}


def _graph(module_level_only: bool) -> dict[str, set[str]]:
    return {name: _imports(name, module_level_only) for name in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return components


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph[name])
    return seen


def test_the_reader_finds_edges_and_cycles():
    """The checker itself: a known edge is seen, and a made-up cycle is reported."""
    graph = _graph(module_level_only=True)
    assert "gptforge.layout" in graph["gptforge.loading"]
    assert "gptforge.info" in graph["gptforge.memory"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_at_module_level():
    assert _cycles(_graph(module_level_only=True)) == []


def test_no_import_cycles_even_through_imports_inside_functions():
    assert _cycles(_graph(module_level_only=False)) == []


@pytest.mark.parametrize("start", ["gptforge.loading", "gptforge.generation", "gptforge.evals",
                                   "gptforge.interop.hf", "gptforge.interop.gguf", "gptforge.info",
                                   "gptforge.commands.sample", "gptforge.commands.eval", "gptforge.commands.export"])
def test_inference_never_imports_training(start):
    """Followed through imports inside functions too: loading a model to sample, score or export it must not
    depend on the trainer (or pay for importing it)."""
    reached = _reachable(_graph(module_level_only=False), start)
    assert sorted(m for m in reached if m == "gptforge.training" or m.startswith("gptforge.training.")) == []


def test_importing_loading_does_not_import_training():
    code = ("import sys, gptforge.loading\n"
            "print(sorted(m for m in sys.modules if m.startswith('gptforge.training')))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
