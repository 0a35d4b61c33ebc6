"""Training-step throughput and peak memory: gptforge vs Hugging Face GPT2LMHeadModel, same run.

One step = forward + backward + global grad-norm clip + AdamW step on the same random batch, with the same
AdamW settings (fused where supported, GPT-3 betas) and the same autocast dtype for both; each clips as its
trainer does (gptforge: `training.step.clip_and_step`; HF: `torch.nn.utils.clip_grad_norm_`). HF gets its best
settings: the fused `gelu_pytorch_tanh` activation (the same function as GPT-2's `gelu_new`, one kernel
instead of several) and SDPA attention (its default). Each measurement runs in a fresh subprocess (so its
peak RSS is its own) with pinned threads; the two implementations alternate, `--samples` times per cell,
and the table shows each one's median tokens/s and the median of the per-sample ratios, so one sample
disturbed by a busy machine does not decide a cell. On a CPU gptforge's process keeps freed memory for reuse
as `gptforge train` does (gptforge.host_memory); HF's does not, unless `--hf-keeps-freed-memory`, which
shows how much of the ratio that setting is.

Cases: `gpt2` (124M, 12 layers of 768) and `small` (4 layers of 256 with GPT-2's 50,257-token vocabulary).
In `small` the output head (256 x 50,257 weights against 4 x 12 x 256^2 in the blocks) is ~80% of the FLOPs, so that row
mostly measures gptforge's fused chunked output-projection + cross-entropy against HF's full logits; `gpt2`
is the case that measures the transformer itself: at T=128, B=4 (512 tokens a step) the passes over every
parameter that both pay alike (autocast's weight copies, the gradient norm, AdamW's read and write of 124M
weights and two moments) are a large share of the step; at T=1024, B=2 (GPT-2's own context) the step is
mostly matmuls, attention and the output head.

    python benchmarks/train_throughput.py                 # CPU: gpt2 @ T=128, B=4 and T=1024, B=2; small @ T=64, B=16
    python benchmarks/train_throughput.py --samples 5     # steadier medians
    python benchmarks/train_throughput.py --hf-keeps-freed-memory   # HF gets gptforge's CPU malloc setting too
    python benchmarks/train_throughput.py --cuda          # GPU: gpt2 @ T=1024, bf16, torch.compile, MFU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def _models(impl: str, name: str, block: int):
    import torch

    from gptforge.config import ModelConfig, get_preset

    config = get_preset("gpt2") if name == "gpt2" else ModelConfig(vocab_size=50257, block_size=block,
                                                                    n_layer=4, n_head=4, n_embd=256)
    torch.manual_seed(0)
    if impl == "gptforge":
        from gptforge.model import GPT
        return GPT(config), config
    from transformers import GPT2Config, GPT2LMHeadModel
    hf = GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
                    n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                    attn_pdrop=0.0, activation_function="gelu_pytorch_tanh")
    return GPT2LMHeadModel(hf), config


def measure(impl: str, name: str, seq_len: int, batch: int, precision: str, steps: int, device: str,
            compile_model: bool, keep_freed: bool = False) -> dict:
    """Runs in the child process: time `steps` training steps after two warm-up steps. `keep_freed`: malloc
    keeps freed blocks for reuse (gptforge.host_memory), as `gptforge train` sets it on a CPU."""
    import torch

    from gptforge.config import TrainConfig
    from gptforge.host_memory import keep_freed_memory
    from gptforge.training.optim import build_optimizer
    from gptforge.training.precision import autocast
    from gptforge.training.step import clip_and_step

    dev = torch.device(device)
    if keep_freed:
        keep_freed_memory()
    model, config = _models(impl, name, seq_len)
    model.to(dev).train()
    opt = build_optimizer(model, TrainConfig(), dev)  # same AdamW (fused, decay groups) for both
    fwd = torch.compile(model) if compile_model else model
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, config.vocab_size, (batch, seq_len + 1), generator=g).to(dev)
    x, y = data[:, :-1], data[:, 1:]

    def step() -> None:
        with autocast(dev, precision):
            if impl == "gptforge":
                _, loss = fwd(x, y, return_logits=False)  # training path: fused chunked loss
            else:
                loss = fwd(input_ids=x, labels=x).loss  # HF shifts the labels itself
        loss.backward()
        if impl == "gptforge":
            clip_and_step(model, opt, loss, 1.0)  # as the trainer clips and steps
        else:  # as HF's Trainer does (through accelerate)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    tok_s = batch * seq_len / dt
    out = {"impl": impl, "model": name, "T": seq_len, "B": batch, "precision": precision, "step_s": dt,
           "tok_s": tok_s, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if dev.type == "cuda":
        from gptforge.info import flops_per_token
        from gptforge.training.metrics import device_peak_flops
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        # the trainer's MFU: same FLOPs count (info.flops_per_token) and the same table of device peaks
        peak = device_peak_flops(torch.cuda.get_device_name(dev), precision)
        out["mfu"] = tok_s * flops_per_token(config, seq_len)["train"] / peak if peak else float("nan")
    return out


def _child(args: list, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2, help="timed steps per sample (after two warm-up steps)")
    p.add_argument("--samples", type=int, default=3, help="interleaved samples per cell (median reported)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OMP threads of each sample")
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--only", choices=["gpt2", "small"], help="one model only")
    p.add_argument("--hf-keeps-freed-memory", action="store_true",
                   help="give HF's process the malloc setting `gptforge train` makes on a CPU (host_memory)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(measure(*json.loads(a.child))))
        return
    if a.cuda:
        cases = [("gpt2", 1024, 8, "bf16", "cuda", True)]
    else:
        cases = [(m, t, b, prec, "cpu", False) for m, t, b in (("gpt2", 128, 4), ("gpt2", 1024, 2), ("small", 64, 16))
                 for prec in ("fp32", "bf16")]
    if a.only:
        cases = [c for c in cases if c[0] == a.only]
    print(f"{a.samples} interleaved samples per cell of {a.steps} timed steps; medians; "
          f"OMP_NUM_THREADS={a.threads}; on CPU gptforge keeps freed memory as `gptforge train` does, HF "
          f"{'too' if a.hf_keeps_freed_memory else 'does not (--hf-keeps-freed-memory: it does too)'}", flush=True)
    print(f"{'model':6} {'T':>5} {'B':>3} {'dtype':5} | {'gptforge tok/s':>14} {'HF tok/s':>9} {'ratio':>6} "
          f"{'(min-max)':>11} | {'gptforge RSS':>12} {'HF RSS':>8}" + (" | MFU ours / HF" if a.cuda else ""))
    for name, T, B, prec, device, comp in cases:
        ours, hf = [], []
        for i in range(a.samples):  # alternate which goes first, so neither always follows the other
            pair = (("gptforge", ours), ("hf", hf)) if i % 2 == 0 else (("hf", hf), ("gptforge", ours))
            for impl, results in pair:
                keep_freed = device == "cpu" and (impl == "gptforge" or a.hf_keeps_freed_memory)
                results.append(_child([impl, name, T, B, prec, a.steps, device, comp, keep_freed], a.threads))
        ratios = [o["tok_s"] / h["tok_s"] for o, h in zip(ours, hf)]

        def med(runs: list[dict], key: str) -> float:
            return statistics.median(r[key] for r in runs)

        line = (f"{name:6} {T:>5} {B:>3} {prec:5} | {med(ours, 'tok_s'):>14.0f} {med(hf, 'tok_s'):>9.0f} "
                f"{statistics.median(ratios):>5.2f}x {min(ratios):>5.2f}-{max(ratios):<5.2f} | "
                f"{med(ours, 'peak_rss_mib'):>9.0f}MiB {med(hf, 'peak_rss_mib'):>5.0f}MiB")
        if a.cuda:
            line += f" | {100 * med(ours, 'mfu'):.1f}% / {100 * med(hf, 'mfu'):.1f}%"
        print(line, flush=True)
    if not a.only or a.only == "small":
        print("small: ~80% of its FLOPs are the 50,257-way output head, so it mostly measures the fused "
              "output projection + loss")


if __name__ == "__main__":
    main()
