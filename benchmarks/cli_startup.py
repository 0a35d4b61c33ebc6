"""Wall time of `gptforge --help` beside what it would cost if it imported torch, measured in one run.

Each command runs in a fresh interpreter, the variants interleaved round by round (so a busy machine slows
them alike); the table reports medians. References: the bare interpreter (`python -c pass`, the floor) and
`python -c "import torch"` (what `--help` paid when the package root imported the model eagerly).
`--baseline-tree DIR` adds `gptforge --help` from another checkout (e.g. a `git worktree` of an older
commit) for a before/after comparison.

    python benchmarks/cli_startup.py
    git worktree add /tmp/old 4767ebe && python benchmarks/cli_startup.py --baseline-tree /tmp/old
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(command: list[str], tree: Path | None) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if tree is not None:  # `python -m` puts the working directory first on sys.path: run inside the tree
        env["PYTHONPATH"] = str(tree)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env, cwd=tree)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="runs of each variant (default 5)")
    parser.add_argument("--baseline-tree", type=Path, default=None, help="another checkout to compare with")
    args = parser.parse_args()
    python = sys.executable
    variants = {"python -c pass (floor)": ([python, "-c", "pass"], None),
                "python -c 'import torch' (reference)": ([python, "-c", "import torch"], None),
                "gptforge --help (this tree)": ([python, "-m", "gptforge", "--help"], REPO)}
    if args.baseline_tree:
        variants[f"gptforge --help ({args.baseline_tree})"] = ([python, "-m", "gptforge", "--help"],
                                                               args.baseline_tree)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (command, tree) in variants.items():
            times[name].append(timed(command, tree))
    ours = statistics.median(times["gptforge --help (this tree)"])
    print(f"{'command':<48} {'median s':>9} {'vs this tree':>13}   (medians of {args.rounds}, interleaved)")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<48} {median:>9.3f} {median / ours:>12.1f}x")


if __name__ == "__main__":
    main()
