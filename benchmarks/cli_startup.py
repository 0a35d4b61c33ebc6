"""Wall time of `gptforge --help` beside what it would cost if it imported torch, measured in one run.

Each command runs in a fresh interpreter, the variants interleaved round by round (so a busy machine slows
them alike); the table reports medians. References: the bare interpreter (`python -c pass`, the floor) and
`python -c "import torch"` (what `--help` paid when the package root imported the model eagerly).
`--baseline-tree DIR` adds `gptforge --help` from another checkout (e.g. a `git worktree` of an older
commit) for a before/after comparison.

    python benchmarks/cli_startup.py
    git worktree add /tmp/old 4767ebe && python benchmarks/cli_startup.py --baseline-tree /tmp/old

`--phases` instead splits `gptforge sample`'s start-up to its first token (issue 24: everything after
`import torch` should take <= 0.2 s for GPT-2 124M): each round a fresh interpreter times, in wall and CPU
seconds (CPU time is steadier on a machine shared with other work), `import torch`, gptforge's own imports,
loading the weights from disk, `prepare_for_decoding`, the tokenizer and the first greedy token, as
`sample` runs them (its collector freeze and its quantized-weights cache included: with `--quantize` the
first round fills the cache, and the median is of reads from it). Beside it the whole `gptforge sample
--max-new-tokens 1` process and a process that imports torch and ends as `sample` ends (`import torch, gc;
gc.freeze()`: a plain `import torch` process spends ~0.4 s more collecting torch's objects at exit, which
`sample` skips). `--model` is a .safetensors file, checkpoint or run (default: GPT-2 124M with random
weights, written once to `--scratch`, so loading from disk is measured).

    python benchmarks/cli_startup.py --phases --rounds 5 [--dtype bfloat16] [--quantize int8|int4]
"""

from __future__ import annotations

import argparse
import json
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


PROMPT = "Hello, my name is"


def child_phases(model_spec: str, dtype: str | None, quantize: str | None) -> None:
    """One start-up, timed phase by phase the way `gptforge sample` runs them; prints one JSON line."""
    clocks = [(time.perf_counter(), time.process_time())]
    phases: dict[str, list[float]] = {}

    def mark(name: str) -> None:
        clocks.append((time.perf_counter(), time.process_time()))
        phases[name] = [clocks[-1][0] - clocks[-2][0], clocks[-1][1] - clocks[-2][1]]

    import torch
    mark("import torch")
    from gptforge.cli import build_parser  # noqa: F401  (what `gptforge sample` imports before running it)
    from gptforge.commands.sample import fresh_seed  # noqa: F401
    from gptforge.devices import resolve_dtype
    from gptforge.commands._options import prepare_model
    from gptforge.generation import generate
    from gptforge.generation.sampling import SamplingConfig
    from gptforge.loading import default_tokenizer, load_model, resolve_model_source
    mark("import gptforge (cli, sample, generation, loading)")
    source = resolve_model_source(model_spec)
    model, tokenizer = load_model(source, "cpu", resolve_dtype(dtype, torch.device("cpu")), seed=0)
    mark("load weights")
    prepare_model(model, argparse.Namespace(quantize=quantize, compile=False), weights_file=source.weights)  # as sample
    mark("prepare_for_decoding")
    tokenizer = tokenizer or default_tokenizer(model, model_spec)
    mark("tokenizer")
    events = iter(generate(model, tokenizer, PROMPT, SamplingConfig(max_new_tokens=1, temperature=0.0), seed=0))
    next(events)
    mark("first token")
    after_torch = [sum(v[i] for k, v in phases.items() if k != "import torch") for i in (0, 1)]
    phases["after import torch (sum)"] = after_torch
    print(json.dumps(phases), flush=True)
    os._exit(0)  # the interpreter's teardown is not start-up


def run_phases(args: argparse.Namespace) -> None:
    model = args.model
    if model is None:
        model = str(args.scratch / "gpt2-random.safetensors")
        if not Path(model).is_file():
            subprocess.run([sys.executable, "-c", "import sys, torch; from gptforge.model import GPT; "
                            "from gptforge.config import get_preset; from gptforge.weights import save_weights; "
                            "torch.manual_seed(0); save_weights(GPT(get_preset('gpt2')), sys.argv[1])", model],
                           check=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    # The child is this file (a --baseline-tree may predate it); PYTHONPATH picks which gptforge it imports.
    child = [sys.executable, str(Path(__file__).resolve()), "--child", model]
    whole = [sys.executable, "-m", "gptforge", "sample", "--model", model, "--max-new-tokens", "1",
             "--temperature", "0", "--seed", "0", PROMPT]
    for option, value in (("--dtype", args.dtype), ("--quantize", args.quantize)):
        if value:
            child, whole = child + [option, value], whole + [option, value]
    trees = [REPO] + ([args.baseline_tree.resolve()] if args.baseline_tree else [])
    rounds: dict[Path, list[dict[str, list[float]]]] = {tree: [] for tree in trees}
    whole_s: dict[Path, list[float]] = {tree: [] for tree in trees}
    torch_s: list[float] = []
    for _ in range(args.rounds):  # interleaved, so a busy machine slows every variant alike
        for tree in trees:
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(tree))
            out = subprocess.run(child, check=True, capture_output=True, text=True, env=env, cwd=tree).stdout
            rounds[tree].append(json.loads(out.strip().splitlines()[-1]))
            start = time.perf_counter()
            subprocess.run(whole, check=True, stdout=subprocess.DEVNULL, env=env, cwd=tree)
            whole_s[tree].append(time.perf_counter() - start)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch, gc; gc.freeze()"], check=True, env=env)
        torch_s.append(time.perf_counter() - start)
    print(f"gptforge sample start-up, {model}, {args.threads} thread(s): medians of {args.rounds} fresh processes"
          ", wall / CPU seconds")
    print(f"{'phase':<52}" + "".join(f" {'this tree' if tree == REPO else 'baseline':>19}" for tree in trees))
    for name in rounds[REPO][0]:
        cells = [f"{statistics.median(r[name][0] for r in rounds[tree]):>9.3f} "
                 f"{statistics.median(r[name][1] for r in rounds[tree]):>9.3f}" for tree in trees]
        print(f"{name:<52} " + " ".join(cells))
    print(f"{'whole process: gptforge sample --max-new-tokens 1':<52} "
          + " ".join(f"{statistics.median(whole_s[tree]):>9.3f} {'':>9}" for tree in trees))
    print(f"{'whole process: import torch, gc.freeze()':<52} {statistics.median(torch_s):>9.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="runs of each variant (default 5)")
    parser.add_argument("--baseline-tree", type=Path, default=None, help="another checkout to compare with")
    parser.add_argument("--phases", action="store_true", help="time `sample`'s start-up phase by phase")
    parser.add_argument("--model", default=None, help="--phases: the weights to load (default: random GPT-2)")
    parser.add_argument("--dtype", default=None, help="--phases: as sample's --dtype (default float32)")
    parser.add_argument("--quantize", default=None, choices=["int8", "int4"],
                        help="--phases: as sample's --quantize (default none)")
    parser.add_argument("--threads", type=int, default=2, help="--phases: OMP_NUM_THREADS (default 2)")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp"), help="--phases: where the default "
                        "model's weights are written once (default /tmp)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child_phases(args.child, args.dtype, args.quantize)
        return
    if args.phases:
        run_phases(args)
        return
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
