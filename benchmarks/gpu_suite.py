"""Every GPU measurement of gptforge in one process, printed as one table (driven by gpu_suite.sh).

  train   tokens/s and MFU of a training step (forward, backward, clip, fused AdamW: the trainer's own
          `forward_backward` + `clip_and_step`), bf16 autocast, torch.compile: `gpt2` at T 1024 and
          `gpt3-small` at T 2048 (alternating dense / band layers).
  decode  gpt2 greedy generation through gptforge's engine at batch 1, 8 and 32, eager and with CUDA graphs
          (`cuda_graph=True`: static cache, decode steps replayed as one graph): time to first token, time per
          output token after it, output tokens/s.

  muon    time to loss: GPT-2 124M (gpt2's shape, the data's vocabulary) trained by the trainer itself for the
          same number of steps with AdamW (the trainer's defaults) and with train.optimizer=muon, val loss at
          every tenth of the run (eager: the first arm would otherwise pay the compilation the second reuses);
          the target is AdamW's final val loss; reported: the step and training time
          (evaluation excluded) of each arm's first val loss at or below it (`--ttl-data DIR`, a prepared data
          directory; gpu_suite.sh prepares Python's standard library, char-level).

MFU uses the trainer's FLOPs count (info.flops_per_token) and its table of device peaks (train.metrics).
`--cpu-smoke` runs every path above on CPU at toy sizes (compile included, CUDA graphs falling back to the
static cache they use) so that the suite is known to run before a GPU session spends time on it.

    python benchmarks/gpu_suite.py                # on the GPU machine (gpu_suite.sh runs it)
    python benchmarks/gpu_suite.py --cpu-smoke    # anywhere: same code paths, tiny shapes, numbers meaningless
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptforge.config import ModelConfig, TrainConfig, get_preset  # noqa: E402
from gptforge.info import flops_per_token  # noqa: E402
from gptforge.model import GPT  # noqa: E402
from gptforge.training.metrics import device_peak_flops  # noqa: E402
from gptforge.training.optim import build_optimizer  # noqa: E402

try:  # the trainer's step pieces (train/step.py after the trainer's split, trainer.py before it)
    from gptforge.training.step import clip_and_step, forward_backward  # noqa: E402
except ImportError:
    from gptforge.training.trainer import clip_and_step, forward_backward  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_cell(config: ModelConfig, seq_len: int, batch: int, steps: int, device: torch.device,
               compile_model: bool) -> dict:
    """Median step time of `steps` timed steps after three warm-up steps (compilation happens there)."""
    torch.manual_seed(0)
    model = GPT(config).to(device).train()
    opt = build_optimizer(model, TrainConfig(), device)
    fwd = torch.compile(model) if compile_model else model
    data = torch.randint(0, config.vocab_size, (batch, seq_len + 1), device=device)
    x, y = data[:, :-1], data[:, 1:]
    precision = "bf16"
    times = []
    t_first = time.perf_counter()
    for i in range(3 + steps):
        t0 = time.perf_counter()
        loss = forward_backward(fwd, [(x, y)], 1, device, precision)
        ok, _, _ = clip_and_step(model, opt, loss, 1.0)  # one host sync, as in training
        sync(device)
        if i == 2:
            warmup = time.perf_counter() - t_first
        if i >= 3:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tok_s = batch * seq_len / step_s
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = device_peak_flops(name, precision)
    mfu = tok_s * flops_per_token(config, seq_len)["train"] / peak if peak else float("nan")
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    del model, opt, fwd
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return {"step_s": step_s, "tok_s": tok_s, "mfu": mfu, "warmup_s": warmup, "mem_gib": mem, "ok": ok}


def ttl_arm(config: ModelConfig, data: str, optimizer: str, steps: int, batch: int, seq_len: int,
            out: str) -> list[tuple[int, float, float]]:
    """(step, seconds of training so far, val loss) at every tenth of a `steps`-step run of the trainer."""
    from gptforge.config import DataConfig, RunConfig
    from gptforge.resolve import fit_vocab_to_data
    from gptforge.training.trainer import Trainer

    every = max(1, steps // 10)
    train = TrainConfig(out_dir=out, optimizer=optimizer, max_steps=steps, micro_batch_size=batch, seq_len=seq_len,
                        warmup_steps=max(1, steps // 20), eval_every=every, eval_batches=8, log_every=every,
                        checkpoint_every=10 * steps, sample_every=10 * steps, sample_tokens=0)
    run = RunConfig(model=config, train=train, data=DataConfig(path=data))
    trainer = Trainer(fit_vocab_to_data(run, explicit_vocab=False), log=lambda m: None)
    points: list[tuple[int, float, float]] = []
    evaluate = trainer.evaluate

    def record() -> dict:
        results = evaluate()
        points.append((trainer.counters.step, trainer.counters.elapsed, results.get("val_loss", float("nan"))))
        return results

    trainer.evaluate = record  # counters.elapsed counts training steps only
    trainer.fit()
    return points


def ttl_rows(config: ModelConfig, data: str, steps: int, batch: int, seq_len: int, work: str) -> list[str]:
    """Muon vs AdamW over the same steps: the step and time at which each reaches AdamW's final val loss."""
    points = {arm: ttl_arm(config, data, arm, steps, batch, seq_len, f"{work}/{arm}") for arm in ("adamw", "muon")}
    target = points["adamw"][-1][2]
    rows = []
    for arm, pts in points.items():
        hit = next(((s, t) for s, t, v in pts if v <= target), None)
        reached = f"step {hit[0]:>5} at {hit[1]:7.1f} s" if hit else "not reached"
        rows.append(f"muon   gpt2-124M {arm:5} {steps} steps B={batch} T={seq_len} | final val {pts[-1][2]:.4f} | "
                    f"to {target:.4f} (adamw final): {reached} | {pts[-1][1]:7.1f} s training")
    return rows


def decode_cell(model: GPT, batch: int, prompt_len: int, new_tokens: int, cuda_graph: bool, repeats: int) -> dict:
    """Greedy generation of `new_tokens` per row through the engine; medians over `repeats` runs after one
    warm-up run (which also captures the graphs)."""
    from gptforge.generation import SamplingConfig, TokenGenerator

    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=g).tolist()
    config = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0, stop_at_eot=False)
    runs = []
    for r in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        ttft = None
        produced = 0
        for events in TokenGenerator(model, prompts, [config] * batch, [0] * batch, cuda_graph=cuda_graph):
            produced += len(events)
            if ttft is None:
                sync(device)
                ttft = time.perf_counter() - t0
        sync(device)
        total = time.perf_counter() - t0
        if r:
            runs.append((ttft, (total - ttft) / max(1, new_tokens - 1), produced / total))
    ttft, tpot, tok_s = (statistics.median(v) for v in zip(*runs))
    return {"ttft_ms": 1e3 * ttft, "tpot_ms": 1e3 * tpot, "tok_s": tok_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="every path on CPU at toy sizes (numbers meaningless)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per cell")
    p.add_argument("--skip", default="", help="comma list of parts to skip: train, decode, muon")
    p.add_argument("--ttl-data", default=None, help="prepared data directory for the muon time-to-loss row")
    p.add_argument("--ttl-steps", type=int, default=600, help="steps of each arm of the muon row")
    a = p.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    if a.cpu_smoke:
        device = torch.device("cpu")
        tiny = dict(vocab_size=1000, n_layer=2, n_head=2, n_embd=64)
        train_cases = [("gpt2", ModelConfig(block_size=64, **tiny), 64, 2),
                       ("gpt3-small", ModelConfig(block_size=128, attention="alternating", window=32, **tiny), 128, 2)]
        decode_model = ModelConfig(block_size=64, **tiny)
        batches, prompt_len, new_tokens, repeats, steps = (1, 8, 32), 8, 8, 1, 2
        ttl_model, ttl_steps, ttl_batch, ttl_T = ModelConfig(block_size=64, **tiny), 4, 2, 64
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_suite: no CUDA device here; use --cpu-smoke to check the code paths on CPU")
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
        train_cases = [("gpt2", get_preset("gpt2"), 1024, 16), ("gpt3-small", get_preset("gpt3-small"), 2048, 8)]
        decode_model = get_preset("gpt2")
        batches, prompt_len, new_tokens, repeats, steps = (1, 8, 32), 16, 256, 3, a.steps
        ttl_model, ttl_steps, ttl_batch, ttl_T = get_preset("gpt2"), a.ttl_steps, 16, 1024
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke: numbers meaningless)"
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    rows = []
    if "train" not in skip:
        for label, config, T, B in train_cases:
            r = train_cell(config, T, B, steps, device, compile_model=True)
            rows.append(f"train  {label:11} T={T:<5} B={B:<3} bf16 compile | {r['tok_s']:>10,.0f} tok/s | "
                        f"MFU {100 * r['mfu']:5.1f}% | step {1e3 * r['step_s']:7.1f} ms | warm-up+compile "
                        f"{r['warmup_s']:5.1f} s | peak {r['mem_gib']:.1f} GiB")
            print(rows[-1], flush=True)
    if "decode" not in skip:
        torch.manual_seed(0)
        model = GPT(decode_model).to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        model.eval()
        for B in batches:
            for graph in (False, True):
                r = decode_cell(model, B, prompt_len, new_tokens, graph, repeats)
                rows.append(f"decode gpt2 B={B:<3} {'cuda graph' if graph else 'eager     '} "
                            f"{'bf16' if device.type == 'cuda' else 'fp32'} | TTFT {r['ttft_ms']:7.2f} ms | "
                            f"{r['tpot_ms']:6.3f} ms/token | {r['tok_s']:>9,.0f} tok/s")
                print(rows[-1], flush=True)
    if "muon" not in skip and a.ttl_data:
        import tempfile
        with tempfile.TemporaryDirectory() as work:
            for row in ttl_rows(ttl_model, a.ttl_data, ttl_steps, ttl_batch, ttl_T, work):
                rows.append(row)
                print(row, flush=True)
    print("\n==== gpu_suite ====")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
