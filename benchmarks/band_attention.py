"""Forward + backward time of a GPT-3 band layer beside a dense causal layer, measured in the same run.

GPT-3's odd layers attend only to the last `window` keys. `gptforge.band_attention` computes just that band
(blockwise local attention); the masked reference runs dense SDPA under a T×T band mask (what band layers
did before). Each case is timed forward + backward, cases interleaved round-robin so that load from other
processes falls on all of them alike, and the median of the repeats is reported with its ratio to the dense
causal case of the same table:

- "attention": scaled dot-product attention alone on q, k, v sliced from one (B, T, 3C) projection (the
  strides the model gives it);
- "layer": a whole pre-LN block (attention projections, attention, MLP) of the preset, dense layer 0 vs
  band layer 1 — the band layer with the model's own attention and with the masked reference.

    python benchmarks/band_attention.py                         # gpt3-small shape, T 2048, window 256, 1 thread
    python benchmarks/band_attention.py --threads 2 --dtype bf16
    python benchmarks/band_attention.py --blocks 64 128 256     # also the fast path at other block sizes
    python benchmarks/band_attention.py --compile               # also the compiled path (compile=true)
    python benchmarks/band_attention.py --cuda --compile        # on a GPU (bf16 by default)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gptforge.model as model_module  # noqa: E402
from gptforge.band_attention import DEFAULT_BLOCK, band_attention, band_attention_reference  # noqa: E402
from gptforge.config import get_preset  # noqa: E402
from gptforge.model import Block  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=0.05, atol=0.05)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def attention_cases(args, device, dtype) -> dict:
    B, H, T, D, w = args.batch, args.heads, args.seq_len, args.head_dim, args.window
    qkv = torch.randn(B, T, 3 * H * D, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(B, H, T, D, device=device, dtype=dtype)

    def heads():
        return (t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=2))

    def run(attend):
        def step():
            q, k, v = heads()
            attend(q, k, v).backward(grad)
            qkv.grad = None
        return step

    fast = {f"band (block {DEFAULT_BLOCK})": lambda q, k, v: band_attention(q, k, v, w)}
    for blk in args.blocks:
        if blk != DEFAULT_BLOCK:
            fast[f"band (block {blk})"] = lambda q, k, v, blk=blk: band_attention(q, k, v, w, block=blk)
    if args.compile:  # the path a compiled model takes (compile=true in training); compiles here, untimed
        compiled = torch.compile(band_attention, dynamic=False)
        fast["band, torch.compile"] = lambda q, k, v: compiled(q, k, v, w)
    with torch.no_grad():  # every fast variant must give the reference's answer before anything is timed
        want = band_attention_reference(*heads(), w)
        for name, attend in fast.items():
            torch.testing.assert_close(attend(*heads()), want, **TOLERANCE[dtype], msg=name)
    cases = {"dense causal": run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))}
    cases.update({name: run(attend) for name, attend in fast.items()})
    cases["band, masked reference"] = run(lambda q, k, v: band_attention_reference(q, k, v, w))
    return cases


def layer_cases(args, device, dtype) -> dict:
    config = get_preset(args.preset)
    config.window = args.window
    torch.manual_seed(0)
    dense, band = (Block(config, layer).to(device=device, dtype=dtype) for layer in (0, 1))
    assert dense.attn.window is None and band.attn.window == args.window
    x = torch.randn(args.batch, args.seq_len, config.n_embd, device=device, dtype=dtype, requires_grad=True)

    def run(block, attention=band_attention):
        def step():
            # The band layer as it was: swap the model's band kernel for the masked reference.
            model_module.band_attention = attention
            try:
                block(x).sum().backward()
            finally:
                model_module.band_attention = band_attention
            x.grad = None
            block.zero_grad(set_to_none=True)
        return step

    with torch.no_grad():  # the model's band layer must be the reference's, before anything is timed
        fast = band(x)
        model_module.band_attention = band_attention_reference
        try:
            torch.testing.assert_close(fast, band(x), **TOLERANCE[dtype])
        finally:
            model_module.band_attention = band_attention
    return {"dense causal layer": run(dense), "band layer": run(band),
            "band layer, masked reference": run(band, band_attention_reference)}


def measure(cases: dict, repeats: int, warmup: int, device: torch.device) -> dict[str, float]:
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order each round
            sync(device)
            start = time.perf_counter()
            cases[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def print_table(title: str, medians: dict[str, float]) -> None:
    reference = next(iter(medians.values()))
    print(f"\n{title}")
    print(f"{'case':<32} {'fwd+bwd ms (median)':>20} {'× dense causal':>15}")
    for name, t in medians.items():
        print(f"{name:<32} {t * 1e3:>20.1f} {t / reference:>15.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt3-small")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (pinned; default 1: a shared "
                        "2-core machine is less noisy with one)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--blocks", type=int, nargs="*", default=[], help="also time these block sizes")
    parser.add_argument("--skip-layer", action="store_true", help="time attention alone")
    parser.add_argument("--compile", action="store_true", help="also time band_attention under torch.compile")
    parser.add_argument("--cuda", action="store_true")
    args = parser.parse_args()

    device = torch.device("cuda" if args.cuda else "cpu")
    dtype = DTYPES[args.dtype or ("bf16" if args.cuda else "fp32")]
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {device.type}, {dtype}, threads {torch.get_num_threads()}; "
          f"B={args.batch} H={args.heads} D={args.head_dim} T={args.seq_len} window={args.window}; "
          f"median of {args.repeats} interleaved forward+backward runs after {args.warmup} warm-up")
    print_table("attention alone", measure(attention_cases(args, device, dtype), args.repeats, args.warmup,
                                           device))
    if not args.skip_layer:
        print_table(f"whole {args.preset} block (attention + MLP)",
                    measure(layer_cases(args, device, dtype), args.repeats, args.warmup, device))


if __name__ == "__main__":
    main()
