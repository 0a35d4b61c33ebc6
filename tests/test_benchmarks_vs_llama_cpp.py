"""benchmarks/vs_llama_cpp.py's pure parts: reading llama-bench's JSON, the per-round ratio table, greedy-token
agreement and its options. No llama.cpp here: the benchmark itself needs its binaries (keep those out of tests).
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("vs_llama_cpp", ROOT / "benchmarks" / "vs_llama_cpp.py")
    module = importlib.util.module_from_spec(spec)
    path = list(sys.path)
    sys.modules["vs_llama_cpp"] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path[:] = path  # the script puts benchmarks/ first on sys.path for its own imports
        del sys.modules["vs_llama_cpp"]


def _test(n_prompt: int, n_gen: int, avg_ts: float) -> dict:
    # the fields llama-bench 0.3.36's -o json writes that matter here, among some it writes beside them
    return {"build_commit": "unknown", "model_type": "gpt2 0.1B Q4_0", "n_threads": 2, "repack": False,
            "n_prompt": n_prompt, "n_gen": n_gen, "n_depth": 0, "avg_ns": 1, "avg_ts": avg_ts,
            "stddev_ts": 0.0, "samples_ts": [avg_ts]}


def test_llama_bench_json_gives_prompt_and_decode_rates(bench):
    text = "some log line\n" + json.dumps([_test(128, 0, 791.5), _test(0, 64, 54.25)], indent=2)
    assert bench.parse_llama_bench(text) == {"prompt": 791.5, "decode": 54.25}
    assert bench.parse_llama_bench(json.dumps([_test(0, 16, 98.9)])) == {"decode": 98.9}
    with pytest.raises(ValueError, match="no JSON"):
        bench.parse_llama_bench("error: failed to load model")


def test_ratios_are_per_round_and_say_gptforge_faster_above_one(bench):
    c = bench.compare([40.0, 50.0, 45.0], [50.0, 50.0, 60.0])
    assert (c.ours, c.theirs) == (45.0, 50.0)
    assert (c.ratio, c.low, c.high) == (0.8, 0.75, 1.0)  # median of 0.8, 1.0, 0.75: not 45/50 by chance
    t = bench.compare([2.0, 1.0], [0.5, 0.25], higher_is_faster=False)  # times: llama.cpp's / ours
    assert (t.ratio, t.low, t.high) == (0.25, 0.25, 0.25)
    with pytest.raises(ValueError):
        bench.compare([1.0], [1.0, 2.0])
    table = bench.format_table(["pair", "gptforge", "llama.cpp", "ratio"], [("fp32 / f32", c)])
    assert table.splitlines() == ["| pair | gptforge | llama.cpp | ratio |", "|---|---|---|---|",
                                  "| fp32 / f32 | 45.0 | 50.0 | **0.80** (0.75-1.00) |"]


def test_greedy_agreement_names_the_first_differing_token(bench):
    assert bench.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert bench.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert bench.first_difference([1, 2], [1, 2, 3]) == 2
    assert bench.agreement([7, 8], [7, 8]) == "identical (2 tokens)"
    assert bench.agreement([7, 8, 9], [7, 4, 9]) == "first differ at token 1 of 3 (8 vs 4)"
    assert bench.agreement([7], [7, 4]) == "first differ at token 1 of 2 (end vs 4)"


def test_options_quick_pairs_and_binaries(bench, tmp_path):
    args = bench.parse_args(["--quick", "--rows", "decode,serve", "--dtypes", "fp32,int8", "--serve-dtypes", "int4",
                             "--scratch", str(tmp_path)])
    assert (args.rounds, args.new_tokens, args.clients, args.max_tokens) == (1, 16, [1, 4], 16)
    assert bench.pairs_used(args) == ["fp32", "int8", "int4"]
    assert bench.needed_binaries(args) == ["llama-bench", "llama-server", "llama-quantize"]
    only_serve = bench.parse_args(["--rows", "serve", "--serve-dtypes", "bf16", "--scratch", str(tmp_path)])
    assert bench.pairs_used(only_serve) == ["bf16"] and bench.needed_binaries(only_serve) == ["llama-server"]
    assert bench.llama_flags(False, bench=True) == ["--repack", "0"]
    assert bench.llama_flags(False, bench=False) == ["--no-repack"]
    for bad, message in ((["--dtypes", "fp16"], "--dtypes"), (["--rows", ""], "--rows"),
                         (["--new-tokens", "1"], "--new-tokens")):
        with pytest.raises(SystemExit, match=message):
            bench.parse_args(bad)
