"""gptforge against llama.cpp on the same GPT-2 124M weights, measured side by side in one run: batch-1 decode
and 128-token prompt tokens/s at fp32/f32, bf16/bf16, int8/q8_0 and int4/q4_0, the time a fresh process takes
to its first token, serving 1/4/16 streaming clients, and whether the two give the same greedy tokens.

Weights. `--model` (default `gpt2`: the preset's random weights drawn from `--seed`, as `gptforge sample
--model gpt2 --seed 0` draws them; or a run, checkpoint or .safetensors) is written once to `--scratch` as a
.safetensors file, and every GGUF file is exported from that file (`gptforge export --format gguf --dtype
f32|bf16|q8_0`; q4_0 by `llama-quantize --pure F32.gguf Q4.gguf q4_0`). gptforge loads that same file, so both
sides run identical weights. (gptforge's bf16 model holds its LayerNorm weights and biases in bf16 too; the
bf16 GGUF keeps 1-D tensors in f32, as llama.cpp's own converter does.) The files stay in --scratch and are
rewritten when older than what they were made from.

Pairs, gptforge | llama.cpp:
  fp32  prepare_for_decoding(model)                   | f32
  bf16  the bf16 model, prepare_for_decoding          | bf16
  int8  prepare_for_decoding(model, quantize="int8")  | q8_0. Different schemes: gptforge keeps one scale per
        on the fp32 model, as `sample --quantize int8`  | output row, q8_0 one per block of 32 inputs.
  int4  prepare_for_decoding(model, quantize="int4")  | q4_0 (`--pure`: every matrix, the tied output head too,
        on the fp32 model; groups of 32              | as gptforge's int4; `--q4-mix` leaves out --pure, so
                                                      | llama.cpp keeps the head in q6_K, its default mix).

Rows (`--rows`), each a table of the medians of `--rounds` rounds interleaved pair by pair (gptforge,
llama.cpp, gptforge, llama.cpp, ...) and the median (min-max) of the per-round ratio gptforge/llama.cpp as a
speed: > 1 means gptforge is faster.
  decode  batch-1 greedy decode tok/s, timed from the first generated token to the last (gptforge in this
          process, as benchmarks/quantized_decode.py times it, from a 1-token prompt; llama.cpp:
          `llama-bench -p 0 -n N -r 1`, which starts from an empty context too).
  prompt  tok/s of a 128-token prompt (gptforge: the prefill and its first token; `llama-bench -p 128 -n 0`).
  ttft    wall time of a whole fresh process that writes one new token: `gptforge sample --model
          FILE.safetensors --max-new-tokens 1 --temperature 0` against `llama-completion -m FILE.gguf -n 1
          --temp 0 -no-cnv --no-warmup` (its warm-up is off: that warm-up is one extra empty decode gptforge
          does not do, so this is llama.cpp's fastest way to a first token). Beside them the floor, a process
          that imports torch and ends as `sample` ends (`python -c "import torch, gc; gc.freeze()"`: sample
          freezes the collector's objects, which skips most of the ~0.4 s a plain `import torch` process
          spends collecting them at exit; against a plain one, gptforge would look 0.3-0.4 s faster than it
          is). The goal is gptforge <= that floor + 0.2 s. Each pair runs once untimed first: `--quantize`
          then reads its quantized weights from the cache (gptforge.generation.quantized_cache), as every
          run of a weights file after its first does.
  serve   aggregate generated tok/s of 1/4/16 concurrent clients streaming /v1/completions (serve_load.py's
          clients: the same prompt, max_tokens, ignore_eos, temperature 0.8 with a seed): `gptforge serve
          --max-batch 16` against `llama-server -np 16 -cb -c 16*1024` (the model's 1,024-token context in
          every slot), each with `--threads`; llama.cpp's requests carry `cache_prompt: false`, so neither side
          reuses an earlier request's prompt. Also time to first token p50 of each.
  (`--compile`: gptforge's decode, prompt and check rows run `prepare_for_decoding(model, compile=True)`, as
  `sample --compile` does; the prompt is still the eager prefill, and ttft and serve have no compile.)
  check   greedy tokens (32, temperature 0, the same prompt ids) of each gptforge dtype against its llama.cpp
          pair (llama-server's /completion with return_tokens): identical, or the first position where they
          differ and gptforge's logit margin there (random weights give near-ties; a trained --model makes
          this check mean more). Quantized pairs use different schemes, so their line is agreement, not a test.

llama.cpp's binaries come from `--llama-bin DIR`, else $GPTFORGE_LLAMA_CPP_BIN, else gptforge's cache
($GPTFORGE_CACHE or ~/.cache/gptforge)/llama.cpp/build-0.3.36/bin. When the cache lacks one, the script builds
them there from the llama-cpp-python 0.3.36 sdist's vendor/llama.cpp (`pip download --no-binary :all:`, cmake +
ninja, -DLLAMA_CURL=OFF, -DGGML_NATIVE=ON; 6-15 minutes on 2 cores, once). Threads: `--threads` on both
sides (llama.cpp -t and -tb; gptforge torch.set_num_threads / OMP_NUM_THREADS). Weight repacking is OFF by
default (`llama-bench --repack 0`, `llama-server`/`llama-completion --no-repack`): on some CPUs (Intel with
AMX) llama.cpp's q8_0 repack path crashes; `--repack` turns it on where it works (and may make llama.cpp's
quantized rows faster there: say which you used when you quote numbers).

    python benchmarks/vs_llama_cpp.py                 # all rows and pairs, 5 rounds, 2 threads: ~15 min
    python benchmarks/vs_llama_cpp.py --quick         # 1 round, short runs, all rows: ~1-2 min once files exist
    python benchmarks/vs_llama_cpp.py --rows decode,prompt --dtypes fp32,int8 --rounds 3
    python benchmarks/vs_llama_cpp.py --rows serve --serve-dtypes bf16 --clients 16
    python benchmarks/vs_llama_cpp.py --rows check --model runs/demo-chat    # a trained model's greedy tokens
    python benchmarks/vs_llama_cpp.py --rows decode,prompt,check --compile  # gptforge's compiled decode step
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python sdist whose vendor/llama.cpp is built
BINARIES = ("llama-bench", "llama-server", "llama-completion", "llama-quantize")
ENV_BIN = "GPTFORGE_LLAMA_CPP_BIN"
ROWS = ("decode", "prompt", "ttft", "serve", "check")
PROMPT = "The history of the city begins with a small settlement on the river, where"


@dataclass(frozen=True)
class Pair:
    """One precision on both sides: gptforge's --dtype and --quantize, and the GGUF type llama.cpp reads."""
    dtype: str
    quantize: str | None
    gguf: str


PAIRS = {"fp32": Pair("float32", None, "f32"), "bf16": Pair("bfloat16", None, "bf16"),
         "int8": Pair("float32", "int8", "q8_0"), "int4": Pair("float32", "int4", "q4_0")}


# ---- pure helpers (tests/test_benchmarks_vs_llama_cpp.py) -----------------------------------------------------

def parse_llama_bench(text: str) -> dict[str, float]:
    """`llama-bench -o json` output -> {"prompt": tok/s, "decode": tok/s}, for whichever of the two tests ran
    (a prompt test has n_gen 0, a generation test n_prompt 0; llama-bench's avg_ts over its repetitions)."""
    start = text.find("[")
    if start < 0:
        raise ValueError(f"no JSON list in llama-bench's output: {text[-500:]!r}")
    rates = {}
    for test in json.loads(text[start:]):
        if test["n_prompt"] > 0 and test["n_gen"] == 0:
            rates["prompt"] = float(test["avg_ts"])
        elif test["n_gen"] > 0 and test["n_prompt"] == 0:
            rates["decode"] = float(test["avg_ts"])
    return rates


@dataclass(frozen=True)
class Compared:
    """Medians of the two sides' per-round values, and the median (min-max) of the per-round speed ratio."""
    ours: float
    theirs: float
    ratio: float
    low: float
    high: float


def compare(ours: list[float], theirs: list[float], higher_is_faster: bool = True) -> Compared:
    """Round i of `ours` against round i of `theirs`: the ratio is gptforge's speed over llama.cpp's (> 1:
    gptforge faster), so for times (`higher_is_faster=False`) it is theirs / ours."""
    if not ours or len(ours) != len(theirs):
        raise ValueError(f"need the same number of rounds on both sides, got {len(ours)} and {len(theirs)}")
    ratios = [o / t if higher_is_faster else t / o for o, t in zip(ours, theirs)]
    return Compared(statistics.median(ours), statistics.median(theirs), statistics.median(ratios), min(ratios),
                    max(ratios))


def format_table(header: list[str], rows: list[tuple[str, Compared]], unit: str = "{:.1f}") -> str:
    """A markdown table: one row per (label, Compared); `unit` formats the two medians."""
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for label, c in rows:
        lines.append(f"| {label} | {unit.format(c.ours)} | {unit.format(c.theirs)} | **{c.ratio:.2f}** "
                     f"({c.low:.2f}-{c.high:.2f}) |")
    return "\n".join(lines)


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first position where the two token lists differ (a length difference counts), or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def agreement(a: list[int], b: list[int]) -> str:
    """'identical (n tokens)' or 'first differ at token i of n (a vs b)'."""
    i = first_difference(a, b)
    if i is None:
        return f"identical ({len(a)} tokens)"
    x = a[i] if i < len(a) else "end"
    y = b[i] if i < len(b) else "end"
    return f"first differ at token {i} of {max(len(a), len(b))} ({x} vs {y})"


def llama_flags(repack: bool, bench: bool) -> list[str]:
    """llama.cpp's repack switch: llama-bench takes `--repack 0|1`, the common options `--repack`/`--no-repack`."""
    if bench:
        return ["--repack", "1" if repack else "0"]
    return ["--repack" if repack else "--no-repack"]


# ---- llama.cpp: find, or build once ------------------------------------------------------------------------------

def cache_root() -> Path:
    """gptforge's cache ($GPTFORGE_CACHE or ~/.cache/gptforge)/llama.cpp."""
    env = os.environ.get("GPTFORGE_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "gptforge") / "llama.cpp"


def find_llama_bin(explicit: str | None, needed: list[str]) -> Path:
    """The directory holding `needed`: --llama-bin, else $GPTFORGE_LLAMA_CPP_BIN (both must hold them all), else
    the cache's build, built (only what it lacks) when it lacks one."""
    for origin, value in (("--llama-bin", explicit), (f"${ENV_BIN}", os.environ.get(ENV_BIN))):
        if value:
            directory = Path(value).expanduser()
            missing = [b for b in needed if not (directory / b).is_file()]
            if missing:
                raise SystemExit(f"{origin} {directory}: no {', '.join(missing)} there")
            return directory
    root = cache_root()
    directory = root / f"build-{LLAMA_CPP_PYTHON}" / "bin"
    if any(not (directory / b).is_file() for b in needed):
        build_llama_cpp(root, [b for b in BINARIES if not (directory / b).is_file()])
    return directory


def build_llama_cpp(root: Path, targets: list[str]) -> None:
    """Build `targets` from the llama-cpp-python sdist's vendor/llama.cpp into root/build-VERSION."""
    for tool in ("cmake", "ninja"):
        if shutil.which(tool) is None:
            raise SystemExit(f"building llama.cpp needs {tool} (e.g. apt-get install cmake ninja-build), or pass "
                             f"--llama-bin DIR with {', '.join(BINARIES)}")
    src, build = root / f"src-{LLAMA_CPP_PYTHON}", root / f"build-{LLAMA_CPP_PYTHON}"
    if not (src / "CMakeLists.txt").is_file():
        fetch_llama_cpp_source(src)
    print(f"building llama.cpp ({', '.join(targets)}) in {build}: 6-15 minutes on 2 cores, once", flush=True)
    if not (build / "build.ninja").is_file():
        _run_build_step(["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                         "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF",
                         "-DLLAMA_BUILD_EXAMPLES=OFF"])
    _run_build_step(["cmake", "--build", str(build), "--target", *targets])


def fetch_llama_cpp_source(src: Path) -> None:
    """The sdist through pip, and its vendor/llama.cpp extracted to `src` (staged, then renamed)."""
    print(f"fetching the llama-cpp-python {LLAMA_CPP_PYTHON} sdist through pip for its vendor/llama.cpp", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        _run_build_step([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                         f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp])
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if not sdists:
            raise SystemExit(f"pip download left no .tar.gz sdist of llama-cpp-python {LLAMA_CPP_PYTHON}")
        staging = src.with_name(src.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        with tarfile.open(sdists[0]) as tar:
            members = []
            for member in tar.getmembers():
                inner = member.name.split("/", 1)[1] if "/" in member.name else ""
                if inner.startswith("vendor/llama.cpp/"):
                    member.name = inner[len("vendor/llama.cpp/"):]
                    members.append(member)
            if not members:
                raise SystemExit(f"{sdists[0].name} has no vendor/llama.cpp")
            tar.extractall(staging, members=members, filter="data")
        staging.rename(src)


def _run_build_step(command: list[str]) -> None:
    if subprocess.run(command).returncode != 0:
        raise SystemExit(f"building llama.cpp failed at: {' '.join(command)}")


# ---- the weights, once, in both formats -------------------------------------------------------------------------

def gptforge_env(threads: int) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))


def prepare_files(args: argparse.Namespace, bin_dir: Path | None, names: list[str]) -> tuple[str, dict[str, Path]]:
    """(the model spec gptforge loads, {pair: GGUF file} for `names`) in --scratch, made when missing or stale."""
    from gptforge.config import PRESETS
    from gptforge.loading import load_model, resolve_model_source
    from gptforge.weights import save_weights

    scratch = args.scratch
    scratch.mkdir(parents=True, exist_ok=True)
    if args.model in PRESETS and not Path(args.model).exists():
        spec = scratch / f"{args.model}-seed{args.seed}.safetensors"
        if not spec.is_file():
            print(f"writing {args.model}'s random weights (seed {args.seed}) to {spec}", flush=True)
            model, _ = load_model(args.model, seed=args.seed)
            save_weights(model, spec)
        source_file, stem = spec, spec.stem
    else:
        source = resolve_model_source(args.model)
        if source.weights is None:
            raise SystemExit(f"--model {args.model}: no weights file to export")
        spec, source_file = Path(args.model), Path(source.weights)
        digest = hashlib.sha1(str(source_file.resolve()).encode()).hexdigest()[:8]
        stem = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', Path(args.model).resolve().name)}-{digest}"
    ggufs = {}
    for name in names:
        kind = PAIRS[name].gguf
        if kind == "q4_0":
            f32 = _export(spec, source_file, scratch / f"{stem}-f32.gguf", "f32")
            ggufs[name] = _quantize_q4(bin_dir, f32, scratch / f"{stem}-q4_0{'-mix' if args.q4_mix else ''}.gguf",
                                       args.q4_mix)
        else:
            ggufs[name] = _export(spec, source_file, scratch / f"{stem}-{kind}.gguf", kind)
    return str(spec), ggufs


def _stale(out: Path, made_from: Path) -> bool:
    return not out.is_file() or out.stat().st_mtime < made_from.stat().st_mtime


def _export(spec: Path, source_file: Path, out: Path, kind: str) -> Path:
    if not _stale(out, source_file):
        return out
    tmp = out.with_name(out.stem + ".partial.gguf")
    tmp.unlink(missing_ok=True)
    print(f"exporting {spec} as {kind} GGUF to {out}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "gptforge", "export", "--model", str(spec), "--format", "gguf",
                           "--dtype", kind, "--out", str(tmp)], env=gptforge_env(2), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"gptforge export --dtype {kind} failed: {proc.stderr.strip()[-1000:]}")
    tmp.replace(out)
    return out


def _quantize_q4(bin_dir: Path | None, f32: Path, out: Path, mix: bool) -> Path:
    if not _stale(out, f32):
        return out
    if bin_dir is None:
        raise SystemExit("the int4 pair needs llama-quantize")
    tmp = out.with_name(out.stem + ".partial.gguf")
    print(f"quantizing {f32.name} to q4_0{' (llama.cpp default mix)' if mix else ' (--pure)'}: {out}", flush=True)
    proc = subprocess.run([str(bin_dir / "llama-quantize"), *([] if mix else ["--pure"]), str(f32), str(tmp), "q4_0"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"llama-quantize failed ({proc.returncode}): {proc.stderr.strip()[-1000:]}")
    tmp.replace(out)
    return out


# ---- rows ------------------------------------------------------------------------------------------------------

def load_gptforge(spec: str, name: str, compile: bool = False):
    """The model as `gptforge sample --dtype D [--quantize Q] [--compile]` prepares it (compiled already, when
    `compile`), and its tokenizer."""
    import torch

    from gptforge.generation import prepare_for_decoding
    from gptforge.generation.compiled import compiled_decoder
    from gptforge.loading import default_tokenizer, load_model

    pair = PAIRS[name]
    model, tokenizer = load_model(spec, "cpu", getattr(torch, pair.dtype))
    prepare_for_decoding(model, quantize=pair.quantize, compile=compile)
    if compile:
        print(f"  {name}: compiled the decode step in {compiled_decoder(model).warm_up():.1f} s", flush=True)
    return model, tokenizer or default_tokenizer(model, spec)


def prefill_rate(model, prompt: list[int]) -> float:
    """Prompt tokens/s: the prefill of `prompt` and its first new token."""
    import torch

    from gptforge.generation import SamplingConfig, TokenGenerator

    config = SamplingConfig(max_new_tokens=1, temperature=0.0, stop_at_eot=False)
    with torch.inference_mode():
        start = time.perf_counter()
        for _ in TokenGenerator(model, [prompt], [config], [0]):
            break
        return len(prompt) / (time.perf_counter() - start)


def llama_bench(bin_dir: Path, gguf: Path, args: argparse.Namespace, tests: list[str]) -> dict[str, float]:
    command = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(args.threads), "-r", "1", "-o", "json",
               "-p", str(args.prompt_tokens if "prompt" in tests else 0),
               "-n", str(args.new_tokens if "decode" in tests else 0), *llama_flags(args.repack, bench=True)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"llama-bench failed ({proc.returncode}) on {gguf.name}: {proc.stderr.strip()[-1500:]}"
                         + (" (--repack is on: try without it)" if args.repack else ""))
    return parse_llama_bench(proc.stdout)


def speed_rows(args: argparse.Namespace, spec: str, ggufs: dict[str, Path], bin_dir: Path) -> list[str]:
    """decode and prompt: gptforge in this process, llama-bench as a subprocess, pair by pair each round."""
    import torch

    from quantized_decode import decode_rate

    tests = [r for r in ("decode", "prompt") if r in args.rows]
    models = {name: load_gptforge(spec, name, args.compile)[0] for name in args.dtypes}
    g = torch.Generator().manual_seed(0)
    vocab = next(iter(models.values())).config.vocab_size
    start_token = [int(torch.randint(0, vocab, (1,), generator=g))]
    prompt = torch.randint(0, vocab, (args.prompt_tokens,), generator=g).tolist()
    for model in models.values():  # warm-up: first-call costs (allocator, kernels) out of the rounds
        decode_rate(model, start_token, 4)
        prefill_rate(model, prompt[:16])
    ours: dict[tuple[str, str], list[float]] = {}
    theirs: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        line = []
        for name in args.dtypes:
            if "decode" in tests:
                ours.setdefault(("decode", name), []).append(decode_rate(models[name], start_token, args.new_tokens))
            if "prompt" in tests:
                ours.setdefault(("prompt", name), []).append(prefill_rate(models[name], prompt))
            rates = llama_bench(bin_dir, ggufs[name], args, tests)
            for test in tests:
                theirs.setdefault((test, name), []).append(rates[test])
                line.append(f"{test} {name} {ours[(test, name)][-1]:.1f}/{rates[test]:.1f}")
        print(f"  round {r + 1}: " + ", ".join(line), flush=True)
    del models
    out = []
    for test in tests:
        what = (f"batch-1 decode, {args.new_tokens} tokens" if test == "decode"
                else f"{args.prompt_tokens}-token prompt") + (", gptforge --compile" if args.compile else "")
        rows = [(f"{name} / {PAIRS[name].gguf}", compare(ours[(test, name)], theirs[(test, name)]))
                for name in args.dtypes]
        out.append(f"\n{what}, tok/s\n" + format_table(["gptforge / llama.cpp", "gptforge", "llama.cpp",
                                                        "ratio (min-max)"], rows))
    return out


def timed_process(command: list[str], env: dict[str, str] | None = None) -> float:
    """Wall seconds of a whole process (SystemExit with its stderr if it fails)."""
    start = time.perf_counter()
    proc = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                          env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{Path(command[0]).name} {' '.join(command[1:4])} ... failed ({proc.returncode}): "
                         f"{proc.stderr.decode(errors='replace').strip()[-1500:]}")
    return wall


def ttft_commands(args: argparse.Namespace, spec: str, ggufs: dict[str, Path], bin_dir: Path, name: str,
                  env: dict[str, str]) -> tuple[float, float]:
    """Seconds of one fresh process to one new token: gptforge's, then llama.cpp's."""
    pair, t = PAIRS[name], str(args.threads)
    ours = timed_process([sys.executable, "-m", "gptforge", "sample", "--model", spec, "--max-new-tokens", "1",
                          "--temperature", "0", "--device", "cpu", "--dtype", pair.dtype,
                          *(["--quantize", pair.quantize] if pair.quantize else []), PROMPT], env)
    theirs = timed_process([str(bin_dir / "llama-completion"), "-m", str(ggufs[name]), "-p", PROMPT, "-n", "1",
                            "--temp", "0", "-no-cnv", "--no-warmup", "-t", t, "-tb", t,
                            *llama_flags(args.repack, bench=False)])
    return ours, theirs


def ttft_rows(args: argparse.Namespace, spec: str, ggufs: dict[str, Path], bin_dir: Path) -> list[str]:
    """Fresh processes to one new token, pair by pair each round, and the floor (a process importing torch and
    ending as `sample` ends) once a round."""
    env = gptforge_env(args.threads)
    ours: dict[str, list[float]] = {n: [] for n in args.dtypes}
    theirs: dict[str, list[float]] = {n: [] for n in args.dtypes}
    floor: list[float] = []
    for name in args.dtypes:  # untimed: fills the quantized-weights cache
        ttft_commands(args, spec, ggufs, bin_dir, name, env)
    for r in range(args.rounds):
        for name in args.dtypes:
            gptforge_s, llama_s = ttft_commands(args, spec, ggufs, bin_dir, name, env)
            ours[name].append(gptforge_s)
            theirs[name].append(llama_s)
        floor.append(timed_process([sys.executable, "-c", "import torch, gc; gc.freeze()"], env))
        print(f"  round {r + 1}: import torch {floor[-1]:.2f} s, "
              + ", ".join(f"{n} {ours[n][-1]:.2f}/{theirs[n][-1]:.2f} s" for n in args.dtypes), flush=True)
    rows = [(f"{name} / {PAIRS[name].gguf}", compare(ours[name], theirs[name], higher_is_faster=False))
            for name in args.dtypes]
    torch_s = statistics.median(floor)
    above = {n: statistics.median(o - f for o, f in zip(ours[n], floor)) for n in args.dtypes}
    return [f"\nwhole process to its first token (`gptforge sample` vs `llama-completion`), s; ratio = llama.cpp "
            f"time / gptforge time\n"
            + format_table(["gptforge / llama.cpp", "gptforge s", "llama.cpp s", "ratio (min-max)"], rows,
                           unit="{:.2f}")
            + f"\n`python -c \"import torch, gc; gc.freeze()\"`: {torch_s:.2f} s (median); gptforge minus it, per "
            "round, median: "
            + ", ".join(f"{n} {above[n]:+.2f} s" for n in args.dtypes) + " (goal: <= +0.20 s)"]


def serve_rows(args: argparse.Namespace, spec: str, ggufs: dict[str, Path], bin_dir: Path) -> list[str]:
    """Both servers up per pair; each load level run on one, then the other, `--rounds` times."""
    from serve_load import launch, load, start_server

    t = str(args.threads)
    ours: dict[tuple[str, int], list[dict]] = {}
    theirs: dict[tuple[str, int], list[dict]] = {}
    for name in args.serve_dtypes:
        pair = PAIRS[name]
        servers = []
        try:
            servers.append(start_server(spec, args.max_batch, args.threads,
                                        ["--device", "cpu", "--dtype", pair.dtype,
                                         *(["--quantize", pair.quantize] if pair.quantize else [])],
                                        log=args.scratch / "gptforge-serve.log"))
            servers.append(launch(lambda port: [
                str(bin_dir / "llama-server"), "-m", str(ggufs[name]), "--host", "127.0.0.1", "--port", str(port),
                "-np", str(args.max_batch), "-cb", "-c", str(args.max_batch * 1024), "-t", t, "-tb", t,
                "--alias", "bench", *llama_flags(args.repack, bench=False)], log=args.scratch / "llama-server.log"))
            (_, our_url), (_, their_url) = servers
            for url in (our_url, their_url):  # warm-up
                asyncio.run(load(url, 2, 1, 8))
            for r in range(args.rounds):
                for clients in args.clients:
                    ours.setdefault((name, clients), []).append(
                        asyncio.run(load(our_url, clients, args.requests, args.max_tokens)))
                    theirs.setdefault((name, clients), []).append(
                        asyncio.run(load(their_url, clients, args.requests, args.max_tokens,
                                         extra={"cache_prompt": False})))
                    for side in (ours, theirs):
                        if side[(name, clients)][-1]["tokens"] != clients * args.requests * args.max_tokens:
                            raise SystemExit(f"serve {name}, {clients} clients: {side[(name, clients)][-1]['tokens']} "
                                             f"tokens generated, expected {clients * args.requests * args.max_tokens}")
                print(f"  {name} round {r + 1}: " + ", ".join(
                    f"{c} clients {ours[(name, c)][-1]['tok_s']:.0f}/{theirs[(name, c)][-1]['tok_s']:.0f} tok/s"
                    for c in args.clients), flush=True)
        finally:
            for proc, _ in servers:
                proc.terminate()
            for proc, _ in servers:
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
    rows = []
    for name in args.serve_dtypes:
        for clients in args.clients:
            o, th = ours[(name, clients)], theirs[(name, clients)]
            rows.append((f"{name} / {PAIRS[name].gguf}, {clients} clients",
                         compare([m["tok_s"] for m in o], [m["tok_s"] for m in th]),
                         statistics.median(m["ttft_p50"] for m in o), statistics.median(m["ttft_p50"] for m in th)))
    table = format_table(["gptforge / llama.cpp", "gptforge tok/s", "llama.cpp tok/s", "ratio (min-max)"],
                         [(label, c) for label, c, _, _ in rows])
    ttfts = "; ".join(f"{label}: {a * 1e3:.0f} / {b * 1e3:.0f} ms" for label, _, a, b in rows)
    return [f"\nserving: aggregate generated tok/s, {args.requests} streamed requests x {args.max_tokens} tokens per "
            f"client; `gptforge serve --max-batch {args.max_batch}` vs `llama-server -np {args.max_batch} -cb`\n"
            + table + f"\ntime to first token p50, gptforge / llama.cpp: {ttfts}"]


def check_rows(args: argparse.Namespace, spec: str, ggufs: dict[str, Path], bin_dir: Path) -> list[str]:
    """Greedy tokens of each pair from the same prompt ids; each side also against its own full precision."""
    import httpx
    import torch

    from gptforge.generation import SamplingConfig, generate_ids
    from serve_load import launch

    config = SamplingConfig(max_new_tokens=args.check_tokens, temperature=0.0, stop_at_eot=False)
    ours, theirs, margins = {}, {}, {}
    ids: list[int] = []
    for name in args.dtypes:
        model, tokenizer = load_gptforge(spec, name, args.compile)
        ids = tokenizer.encode(PROMPT)
        ours[name] = generate_ids(model, [ids], config)[0]
        proc, url = launch(lambda port: [str(bin_dir / "llama-server"), "-m", str(ggufs[name]), "--host",
                                         "127.0.0.1", "--port", str(port), "-np", "1", "-t", str(args.threads),
                                         *llama_flags(args.repack, bench=False)],
                           log=args.scratch / "llama-server-check.log")
        try:
            reply = httpx.post(url + "/completion", json={
                "prompt": ids, "n_predict": args.check_tokens, "temperature": 0, "ignore_eos": True,
                "return_tokens": True, "cache_prompt": False}, timeout=300).json()
        finally:
            proc.terminate()
            proc.wait(20)
        theirs[name] = [int(x) for x in reply["tokens"]]
        i = first_difference(ours[name], theirs[name])
        if i is not None and i < min(len(ours[name]), len(theirs[name])):
            with torch.inference_mode():
                logits = model(torch.tensor([ids + ours[name][:i]]))[0][0, -1].float()
            margins[name] = float(logits[ours[name][i]] - logits[theirs[name][i]])
        del model
    lines = [f"\ngreedy tokens, {args.check_tokens} new after the same {len(ids)} prompt ids (temperature 0)"]
    for name in args.dtypes:
        margin = (f"; gptforge's logit margin of its token over llama.cpp's there: {margins[name]:.2e}"
                  if name in margins else "")
        lines.append(f"  gptforge {name} vs llama.cpp {PAIRS[name].gguf}: {agreement(ours[name], theirs[name])}"
                     f"{margin} [{len(set(ours[name]))} distinct ids in gptforge's]")
    reference = "fp32" if "fp32" in args.dtypes else None
    for name in args.dtypes:
        if reference and name != reference:
            lines.append(f"  gptforge {name} vs gptforge fp32: {agreement(ours[name], ours[reference])}; "
                         f"llama.cpp {PAIRS[name].gguf} vs llama.cpp f32: {agreement(theirs[name], theirs[reference])}")
    return ["\n".join(lines)]


# ---- main ------------------------------------------------------------------------------------------------------

def _choices(value: str, allowed, option: str) -> list[str]:
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in allowed]
    if unknown or not chosen:
        raise SystemExit(f"{option} {value!r}: choose from {', '.join(allowed)} (comma-separated)")
    return chosen


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)} (default all)")
    p.add_argument("--dtypes", default=",".join(PAIRS), help=f"pairs, of {', '.join(PAIRS)} (default all)")
    p.add_argument("--serve-dtypes", default=None, help="pairs the serve row runs (default: --dtypes)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--threads", type=int, default=2, help="threads of both sides (default 2)")
    p.add_argument("--new-tokens", type=int, default=64, help="decode row: tokens timed (default 64)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt row: prompt length (default 128)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="serve row (default 1 4 16)")
    p.add_argument("--requests", type=int, default=2, help="serve row: streamed requests per client (default 2)")
    p.add_argument("--max-tokens", type=int, default=64, help="serve row: tokens per request (default 64)")
    p.add_argument("--max-batch", type=int, default=16, help="serve row: rows/slots of each server (default 16)")
    p.add_argument("--check-tokens", type=int, default=32, help="check row: greedy tokens (default 32)")
    p.add_argument("--model", default="gpt2", help="preset (random weights from --seed), run, checkpoint or "
                                                   ".safetensors (default gpt2)")
    p.add_argument("--seed", type=int, default=0, help="a preset's weights seed (default 0)")
    p.add_argument("--scratch", type=Path, default=None,
                   help="where the .safetensors and GGUF files are written and kept (default: "
                        "$GPTFORGE_CACHE or ~/.cache/gptforge, /vs-llama-cpp)")
    p.add_argument("--llama-bin", default=None, help=f"directory with {', '.join(BINARIES)} (default: "
                                                     f"${ENV_BIN}, else the cache's build, built when missing)")
    p.add_argument("--repack", action="store_true",
                   help="let llama.cpp repack weights (default off: its q8_0 AMX repack path crashes on some CPUs)")
    p.add_argument("--q4-mix", action="store_true",
                   help="q4_0 with llama-quantize's default mix (output head q6_K) instead of --pure")
    p.add_argument("--compile", action="store_true",
                   help="gptforge's decode, prompt and check rows with the compiled decode step (`sample "
                        "--compile`; compiled once per pair before the rounds); ttft and serve stay eager")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 1 round, 16 decode tokens, 1 and 4 clients x 1 request x 16 tokens, "
                        "16 check tokens")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.new_tokens, args.clients, args.requests = 1, 16, [1, 4], 1
        args.max_tokens, args.check_tokens = 16, 16
    args.rows = _choices(args.rows, ROWS, "--rows")
    args.dtypes = _choices(args.dtypes, PAIRS, "--dtypes")
    args.serve_dtypes = _choices(args.serve_dtypes, PAIRS, "--serve-dtypes") if args.serve_dtypes else args.dtypes
    for option in ("rounds", "threads", "new_tokens", "prompt_tokens", "requests", "max_tokens", "max_batch",
                   "check_tokens"):
        if getattr(args, option) < 1:
            raise SystemExit(f"--{option.replace('_', '-')} {getattr(args, option)}: must be at least 1")
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens: at least 2 (the decode rate runs from the first new token to the last)")
    if any(c < 1 for c in args.clients):
        raise SystemExit(f"--clients {args.clients}: each must be at least 1")
    if args.scratch is None:
        env = os.environ.get("GPTFORGE_CACHE")
        args.scratch = (Path(env).expanduser() if env else Path.home() / ".cache" / "gptforge") / "vs-llama-cpp"
    return args


def pairs_used(args: argparse.Namespace) -> list[str]:
    """The pairs whose files some chosen row needs, in --dtypes order, then --serve-dtypes'."""
    names = list(args.dtypes) if set(args.rows) - {"serve"} else []
    if "serve" in args.rows:
        names += [n for n in args.serve_dtypes if n not in names]
    return names


def needed_binaries(args: argparse.Namespace) -> list[str]:
    needed = set()
    if {"decode", "prompt"} & set(args.rows):
        needed.add("llama-bench")
    if "ttft" in args.rows:
        needed.add("llama-completion")
    if {"serve", "check"} & set(args.rows):
        needed.add("llama-server")
    if "int4" in pairs_used(args):
        needed.add("llama-quantize")
    return [b for b in BINARIES if b in needed]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    bin_dir = find_llama_bin(args.llama_bin, needed_binaries(args))
    spec, ggufs = prepare_files(args, bin_dir, pairs_used(args))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").is_file() else "?"
    print(f"gptforge vs llama.cpp ({bin_dir}), weights {spec}; {cpu}; {args.threads} threads both sides; "
          f"{args.rounds} interleaved rounds; torch {torch.__version__}; llama.cpp repack "
          f"{'on' if args.repack else 'off'}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
          flush=True)
    report = []
    for row, run in (("decode", speed_rows), ("ttft", ttft_rows), ("serve", serve_rows), ("check", check_rows)):
        if row in args.rows or (row == "decode" and "prompt" in args.rows):
            print(f"{row if row != 'decode' else 'decode/prompt'} ...", flush=True)
            report += run(args, spec, ggufs, bin_dir)
    print("\n".join(report))
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
