"""How fast `gptforge prepare` tokenizes with GPT-2, against plain single-process tiktoken in the same run.

Generates a corpus of ~--size-mb MB (Tiny Shakespeare's paragraphs, shuffled into ~50 KB documents, one
file each) in a temporary directory, measures single-process `tiktoken` encode speed on a sample of that
corpus, then runs `python -m gptforge prepare` on it in a subprocess while sampling the memory of its whole
process tree (RSS summed, and PSS, which counts pages shared by forked workers once). Prints a table; the
goals are prepare/(single x workers) >= 0.8 and peak memory < 1 GB.

    .venv/bin/python benchmarks/prepare_speed.py --size-mb 20      # quick
    .venv/bin/python benchmarks/prepare_speed.py                   # full size, 200 MB
    .venv/bin/python benchmarks/prepare_speed.py --bpe-memory 5    # only: --tokenizer bpe peak memory

`--bpe-memory MB` measures `prepare --tokenizer bpe:4096 --workers 1` on MB of text without whitespace
(random letters: every run distinct, the trainer's worst case) against the same amount of ordinary text
(the reference, measured in the same run, interleaved, median of --repeats), and prints both peaks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = REPO / "tests" / "data" / "shakespeare.txt"  # its paragraphs are shuffled into documents
DOC_BYTES = 50_000


def generate_corpus(source: Path, folder: Path, size_mb: float, seed: int = 0) -> int:
    """Write shuffled ~50 KB documents of `source`'s paragraphs into `folder`; return bytes written."""
    paragraphs = [p for p in source.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    rng = np.random.default_rng(seed)
    target, written, index = int(size_mb * 1e6), 0, 0
    doc: list[str] = []
    size = 0
    while written < target:  # a document may span several passes: the source can be smaller than one
        order = rng.permutation(len(paragraphs))
        for i in order:
            doc.append(paragraphs[i])
            size += len(paragraphs[i]) + 2
            if size >= DOC_BYTES:
                data = "\n\n".join(doc).encode("utf-8")
                (folder / f"doc_{index:06d}.txt").write_bytes(data)
                written += len(data)
                index += 1
                doc, size = [], 0
                if written >= target:
                    break
    return written


def single_process_tiktoken(folder: Path, sample_mb: float) -> tuple[float, int]:
    """Plain tiktoken encode_ordinary over the first `sample_mb` MB of documents: (tokens/s, tokens)."""
    from gptforge.tokenizer import get_tokenizer

    encoding = get_tokenizer("gpt2").encoding
    texts, size = [], 0
    for path in sorted(folder.iterdir()):
        texts.append(path.read_text(encoding="utf-8"))
        size += len(texts[-1])
        if size >= sample_mb * 1e6:
            break
    start = time.perf_counter()
    tokens = sum(len(encoding.encode_ordinary(t)) for t in texts)
    return tokens / (time.perf_counter() - start), tokens


def _tree(pid: int) -> list[int]:
    pids, frontier = [pid], [pid]
    while frontier:
        current = frontier.pop()
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        pids += [int(c) for c in children]
        frontier += [int(c) for c in children]
    return pids


def _memory_kb(pid: int) -> tuple[int, int]:
    rss = pss = 0
    for p in _tree(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            continue
    return rss, pss


def run_prepare(folder: Path, out: Path, workers: int, tokenizer: str = "gpt2") -> tuple[dict, float, int, int]:
    """Run the CLI, sampling the tree's memory every 50 ms: (manifest, wall s, peak RSS kB, peak PSS kB)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "gptforge", "prepare", str(folder), "--tokenizer", tokenizer, "--out", str(out),
               "--workers", str(workers), "--quiet", "--val-fraction", "0.01"]
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env)
    peaks = [0, 0]

    def sample() -> None:
        while process.poll() is None:
            rss, pss = _memory_kb(process.pid)
            peaks[0], peaks[1] = max(peaks[0], rss), max(peaks[1], pss)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = process.wait()
    wall = time.perf_counter() - start
    sampler.join()
    if code != 0:
        raise SystemExit(f"prepare failed with exit code {code}")
    return json.loads((out / "manifest.json").read_text()), wall, peaks[0], peaks[1]


def bpe_memory(source: Path, size_mb: float, repeats: int) -> None:
    """Peak memory of bpe training + prepare on whitespace-free text vs ordinary text of the same size."""
    with tempfile.TemporaryDirectory(prefix="gptforge-bench-") as tmp:
        size = int(size_mb * 1e6)
        letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
        blob = Path(tmp) / "blob.txt"
        blob.write_bytes(letters[np.random.default_rng(0).integers(0, 26, size)].tobytes())
        text = source.read_text(encoding="utf-8")
        ordinary = Path(tmp) / "ordinary.txt"
        ordinary.write_text((text * (size // len(text) + 1))[:size], encoding="utf-8")
        peaks: dict[str, list[tuple[int, float]]] = {"ordinary": [], "blob": []}
        for i in range(repeats):
            for name, path in (("ordinary", ordinary), ("blob", blob)):  # interleaved A/B
                _, wall, _, pss = run_prepare(path, Path(tmp) / f"out-{name}-{i}", 1, "bpe:4096")
                peaks[name].append((pss, wall))
    median = {name: (float(np.median([p for p, _ in v])) / 1024, float(np.median([w for _, w in v])))
              for name, v in peaks.items()}
    rows = [("case (prepare --tokenizer bpe:4096 --workers 1)", "peak PSS MB (median)  wall s"),
            (f"ordinary text, {size_mb:g} MB (reference)", f"{median['ordinary'][0]:,.0f}  {median['ordinary'][1]:.1f}"),
            (f"no whitespace, {size_mb:g} MB", f"{median['blob'][0]:,.0f}  {median['blob'][1]:.1f}"),
            ("ratio no-whitespace / ordinary", f"{median['blob'][0] / median['ordinary'][0]:.2f}"),
            ("repeats", str(repeats))]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=200.0, help="corpus size (default 200)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--sample-mb", type=float, default=None,
                        help="text for the single-process reference (default: min(size, 20) MB)")
    parser.add_argument("--source", type=Path, default=DEFAULT_TEXT, help="text to build the corpus from")
    parser.add_argument("--bpe-memory", type=float, default=None, metavar="MB",
                        help="only measure bpe-tokenizer memory on MB of whitespace-free text (see above)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the --bpe-memory case (default 3)")
    args = parser.parse_args()
    if not args.source.is_file():
        raise SystemExit(f"--source {args.source} not found; pass a text file")
    if args.bpe_memory:
        bpe_memory(args.source, args.bpe_memory, args.repeats)
        return
    sample_mb = args.sample_mb or min(args.size_mb, 20.0)

    with tempfile.TemporaryDirectory(prefix="gptforge-bench-") as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        size = generate_corpus(args.source, corpus, args.size_mb)
        single_tps, _ = single_process_tiktoken(corpus, sample_mb)
        manifest, wall, rss_kb, pss_kb = run_prepare(corpus, Path(tmp) / "out", args.workers)
        one = run_prepare(corpus, Path(tmp) / "out1", 1)[0] if args.workers > 1 else manifest

    tokens = manifest["counts"]["tokens"]
    prepare_tps = tokens / manifest["seconds"]
    ratio = prepare_tps / (single_tps * args.workers)
    rows = [
        ("corpus", f"{size / 1e6:,.1f} MB, {manifest['counts']['documents']:,} documents, {tokens:,} tokens"),
        ("prepare tokens/s (in-process time)", f"{prepare_tps:,.0f}  ({manifest['seconds']:.1f} s)"),
        ("prepare tokens/s (wall, incl. startup)", f"{tokens / wall:,.0f}  ({wall:.1f} s)"),
        ("workers", str(args.workers)),
        ("prepare --workers 1 tokens/s (overhead check)",
         f"{one['counts']['tokens'] / one['seconds']:,.0f}  ({one['counts']['tokens'] / one['seconds'] / single_tps:.2f} x single)"),
        ("single-process tiktoken tokens/s", f"{single_tps:,.0f}  (on {sample_mb:g} MB of the corpus)"),
        ("ratio prepare / (single x workers)", f"{ratio:.2f}  (goal >= 0.8) {'OK' if ratio >= 0.8 else 'BELOW GOAL'}"),
        ("peak memory, process tree, PSS", f"{pss_kb / 1024:,.0f} MB  (goal < 1024) {'OK' if pss_kb < 1 << 20 else 'ABOVE GOAL'}"),
        ("peak memory, process tree, RSS sum", f"{rss_kb / 1024:,.0f} MB  (shared pages counted per process)"),
        ("CPU cores", f"{os.cpu_count()} (shared with other users of this machine)"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
