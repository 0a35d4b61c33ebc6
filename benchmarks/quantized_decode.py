"""Weight-only quantization on CPU: decode tokens/s of fp32, bf16, int8 and int4, and the kernel candidates
behind int8/int4 at GPT-2 124M's product shapes.

Decode. One random GPT-2 124M (random weights are fine for speed), prepared as `gptforge sample` prepares it
for each arm (`prepare_for_decoding(model)` for fp32 and bf16, `prepare_for_decoding(model, quantize=...)` for
int8/int4 on the fp32 model; `int8-bf16`/`int4-bf16`: quantized on the bf16 model). Each arm decodes greedily
from the same random prompt; its decode rate is timed from the first generated token to the last (prefill left
out). The arms run in interleaved rounds (A B C D, A B C D, ...) so a busy machine slows them alike; the
table shows each arm's median tokens/s and the median (min-max) of its per-round ratio to bf16.

Kernels (--kernels). Each candidate product at batch 1 and 16, ms a product, median of interleaved rounds, and
its largest error against its own reference (dequantize(W) @ x in fp64, relative to max |reference|):
  fp32 oneDNN         the fp32 path today (prepacked), for scale
  bf16 linear         the bf16 path today (F.linear; oneDNN prepacked where it runs bf16)
  int8 x bf16         torch.ops.aten._weight_int8pack_mm, activations cast to bf16 (what --quantize int8 uses)
  int8 x fp32         the same kernel fed fp32 activations
  int8 block->fp32    int8 rows dequantized 512 at a time into an fp32 matmul
  int8 block->bf16    the same into a bf16 matmul
  int4 g32 / g128     torch.ops.aten._weight_int4pack_mm_for_cpu, bf16 activations, groups of 32 / 128

    python benchmarks/quantized_decode.py                       # decode table + kernel table, ~1-2 min
    python benchmarks/quantized_decode.py --rounds 3 --new-tokens 16 --no-kernels   # quick
    python benchmarks/quantized_decode.py --arms fp32,bf16,int8,int8-bf16,int4,int4-bf16
    python benchmarks/quantized_decode.py --threads 1 --clock cpu      # a busy machine: CPU time of one thread
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gptforge.config import get_preset  # noqa: E402
from gptforge.generation import SamplingConfig, TokenGenerator, prepare_for_decoding  # noqa: E402
from gptforge.generation import layout  # noqa: E402
from gptforge.generation.quantize import (dequantize_int4, dequantize_int8, quantize_int4,  # noqa: E402
                                          quantize_int8)
from gptforge.model import GPT  # noqa: E402

ARMS = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None), "int8": (torch.float32, "int8"),
        "int4": (torch.float32, "int4"), "int8-bf16": (torch.bfloat16, "int8"),
        "int4-bf16": (torch.bfloat16, "int4")}
SHAPES = [(768, 2304), (768, 3072), (3072, 768), (768, 50257)]  # (in, out): c_attn, c_fc, mlp c_proj, head


CLOCK = time.perf_counter  # --clock cpu: time.thread_time (with --threads 1: a busy machine's waits left out)


def decode_rate(model: GPT, prompt: list[int], new_tokens: int) -> float:
    """Tokens/s from the first generated token to the last (the prefill is not counted)."""
    config = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0, stop_at_eot=False)
    times = []
    with torch.inference_mode():
        for _ in TokenGenerator(model, [prompt], [config], [0]):
            times.append(CLOCK())
    return (len(times) - 1) / (times[-1] - times[0])


def decode_table(args: argparse.Namespace) -> None:
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; choose from {', '.join(ARMS)}")
    torch.manual_seed(0)
    base = GPT(get_preset(args.preset)).eval()
    models = {}
    for arm in arms:
        dtype, kind = ARMS[arm]
        models[arm] = prepare_for_decoding(copy.deepcopy(base).to(dtype), quantize=kind)
    del base
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, models[arms[0]].config.vocab_size, (args.prompt_len,), generator=g).tolist()
    print(f"{args.preset}: batch 1, greedy, prompt {args.prompt_len} tokens, {args.new_tokens} new, {args.rounds} "
          f"interleaved rounds, {torch.get_num_threads()} threads, {CLOCK.__name__}, torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"oneDNN bf16 {layout._onednn_works(torch.bfloat16)}", flush=True)
    for model in models.values():
        decode_rate(model, prompt, 4)  # warm-up
    rates: dict[str, list[float]] = {arm: [] for arm in arms}
    for r in range(args.rounds):
        for arm in arms:
            rates[arm].append(decode_rate(models[arm], prompt, args.new_tokens))
        print(f"  round {r + 1}: " + ", ".join(f"{a} {rates[a][-1]:.1f}" for a in arms), flush=True)
    reference = "bf16" if "bf16" in arms else arms[0]
    print(f"\n| weights | decode tok/s (median) | vs {reference}, median (min-max) |\n|---|---|---|")
    for arm in arms:
        ratios = [a / b for a, b in zip(rates[arm], rates[reference])]
        print(f"| {arm} | {statistics.median(rates[arm]):.1f} | {statistics.median(ratios):.2f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f}) |")


def _blockwise(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x = x.to(dtype)
    return torch.cat([x @ (q[i:i + 512].to(dtype) * scale[i:i + 512, None].to(dtype)).t()
                      for i in range(0, q.shape[0], 512)], dim=1)


def kernel_candidates(k: int, n: int, m: int) -> dict[str, tuple]:
    """name -> (product, its fp64 reference weight (n, k) or None, input x (m, k))."""
    g = torch.Generator().manual_seed(n)
    w = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(m, k, generator=g)
    xb = x.bfloat16()
    q8, s8 = quantize_int8(w)
    w8 = dequantize_int8(q8, s8).double()
    padded = F.pad(w, (0, 0, 0, -n % 16))
    packed4, ref4 = {}, {}
    for group in (32, 128):
        q4, scale, zero = quantize_int4(padded, group)
        packed4[group] = (torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 1),
                          torch.stack([scale, zero], -1).transpose(0, 1).contiguous())
        ref4[group] = dequantize_int4(q4, scale, zero)[:n].double()
    fp32_packed = torch.ops.mkldnn._reorder_linear_weight(w, 16)
    wb = w.bfloat16()
    bf16_linear = (torch.ops.mkldnn._reorder_linear_weight(wb, 1) if layout._onednn_works(torch.bfloat16) else None)

    def int4(group):
        packed, scale_zero = packed4[group]
        return lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, group, scale_zero)[:, :n]

    return {
        "fp32 oneDNN": (lambda: torch.ops.mkldnn._linear_pointwise(x, fp32_packed, None, "none", [], ""),
                        w.double(), x),
        "bf16 linear": ((lambda: torch.ops.mkldnn._linear_pointwise(xb, bf16_linear, None, "none", [], ""))
                        if bf16_linear is not None else (lambda: F.linear(xb, wb)), wb.double(), xb),
        "int8 x bf16": (lambda: torch.ops.aten._weight_int8pack_mm(xb, q8, s8), w8, xb),
        "int8 x fp32": (lambda: torch.ops.aten._weight_int8pack_mm(x, q8, s8.float()), w8, x),
        "int8 block->fp32": (lambda: _blockwise(x, q8, s8, torch.float32), w8, x),
        "int8 block->bf16": (lambda: _blockwise(xb, q8, s8, torch.bfloat16), w8, xb),
        "int4 g32": (int4(32), ref4[32], xb),
        "int4 g128": (int4(128), ref4[128], xb),
    }


def kernel_table(args: argparse.Namespace) -> None:
    print(f"\nkernels: ms a product (x (M, in) @ W^T), median of {args.rounds} interleaved rounds; err = max |y - "
          "dequantize(W) @ x| / max |dequantize(W) @ x| (fp64 reference)")
    for m in (1, 16):
        rows = []
        for k, n in args.shapes:
            candidates = kernel_candidates(k, n, m)
            times: dict[str, list[float]] = {name: [] for name in candidates}
            errors = {}
            for name, (product, ref_w, x) in candidates.items():
                reference = x.double() @ ref_w.t()
                errors[name] = float((product().double() - reference).abs().max() / reference.abs().max())
            repeats = max(1, int(2e7 // (k * n)))
            for _ in range(args.rounds):
                for name, (product, _, _) in candidates.items():
                    start = CLOCK()
                    for _ in range(repeats):
                        product()
                    times[name].append((CLOCK() - start) / repeats * 1e3)
            rows.append((k, n, {name: statistics.median(t) for name, t in times.items()}, errors))
        names = list(rows[0][2])
        print(f"\nM = {m}\n| candidate | " + " | ".join(f"{k}x{n}" for k, n, _, _ in rows) + " | largest err |")
        print("|---|" + "---|" * (len(rows) + 1))
        for name in names:
            print(f"| {name} | " + " | ".join(f"{r[2][name]:.3f}" for r in rows)
                  + f" | {max(r[3][name] for r in rows):.1e} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--arms", default="fp32,bf16,int8,int4", help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--no-kernels", action="store_true", help="skip the kernel table")
    p.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES),
                   help="kernel table shapes, INxOUT,... (default: GPT-2 124M's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: this thread's CPU time, which leaves out the time a loaded machine runs other "
                        "processes (needs --threads 1; memory contention still counts)")
    args = p.parse_args()
    args.shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if torch.get_num_threads() != 1:
            raise SystemExit("--clock cpu: measures one thread; add --threads 1")
        global CLOCK
        CLOCK = time.thread_time
    decode_table(args)
    if not args.no_kernels:
        kernel_table(args)


if __name__ == "__main__":
    main()
