"""Time to a held-out loss on CPU: gptforge's small-model recipe vs a plain PyTorch training loop.

Character-level tinyshakespeare: train on the first 90% of the file, score on the last 10%.

  reference  a minimal eager fp32 GPT loop written here with nanoGPT's published Shakespeare-char CPU recipe
             (4 layers, 4 heads, d 128, context 64, batch 12, 2000 iterations, AdamW beta2 0.99, LR 1e-3 ->
             1e-4 cosine after 100 warmup steps, weight decay 0.1, clip 1.0, no dropout, no biases, batches
             at random offsets).
  gptforge   `gptforge.training.train` (the product's trainer, run directory and all) with a recipe: `small-cpu`
             (the char-small preset's training settings: Muon for the blocks' matrices, AdamW for the rest),
             `adamw` (the preset's AdamW-only recipe before Muon: 5x the LR over 1,400 steps), or `same` (the
             reference's recipe through gptforge's own defaults: the "before" figure).

Each run is a fresh process with pinned threads; the arms alternate (reference, gptforge, reference, ...).
Every run scores the whole held-out split (every 64-character window, the same function for both) at
fixed fractions of its run, outside its clock. The target is the median of the reference runs' final
held-out losses; each run's time is the wall time (scoring excluded) of its first evaluation at or below the
target. The table gives medians and their ratio.

    python benchmarks/time_to_loss.py --data PATH/tinyshakespeare.txt              # 3 pairs, ~10 min
    python benchmarks/time_to_loss.py --data PATH --quick                          # 1 pair, 400 iters
    python benchmarks/time_to_loss.py --data PATH --arms reference,same,small-cpu  # before and after
    python benchmarks/time_to_loss.py --data PATH --arms reference,adamw,small-cpu # AdamW vs Muon
    python benchmarks/time_to_loss.py --data PATH --profile    # step times in one process + where time goes

Muon sweep (one run each, `--child RECIPE` with the target fed on stdin). Steps are deterministic, times are
not. First sweep, target 1.892, a 2-core AMD EPYC without native bf16 (fp32 everywhere), shared with other
jobs; steps to the target / final held-out loss:
    adamw (5e-3, 1,400 steps)                          1120 / 1.822
    muon lr 0.01, momentum 0.95, 600 steps              564 / 1.878
    muon lr 0.02, momentum 0.95, 600 steps              516 / 1.842
    muon lr 0.04, momentum 0.95, 600 steps         not reached / 1.914
    muon lr 0.02, momentum 0.90, 600 steps              480 / 1.831
    muon lr 0.02, momentum 0.95, 300 steps of 24    not reached / 1.914
    muon lr 0.02, momentum 0.95, 800 steps              544 / 1.778
    muon lr 0.02, momentum 0.90, 800 steps              496 / 1.759
Second sweep (lr 0.02, momentum 0.9), target 1.9002, a 2-core AMD EPYC Zen 4 with native bf16, one thread per
run (`echo 1.9002 | python benchmarks/time_to_loss.py --child 'small-cpu:SETTINGS' --data PATH`); the reference's
2,000 iterations took 125.9 s there (median of 3). Seconds to the target (steps) / final loss:
    batch 12, 800 steps, 5 Newton-Schulz steps     32.7 s (512) / 1.758   (median of 3, the full benchmark)
    batch 12, 800 steps, 4 Newton-Schulz steps     30.0 s (512) / 1.763
    batch 16, 600 steps, 5 Newton-Schulz steps     28.4 s (384) / 1.775   <- the char-small preset
    batch 16, 600 steps, 4 Newton-Schulz steps     27.8 s (396) / 1.783
    batch 24, 400 steps, 5 Newton-Schulz steps     27.1 s (280) / 1.811
    batch 24, 400 steps, 4 Newton-Schulz steps     26.6 s (288) / 1.819   (another job started mid-run)
A Muon step costs ~19 ms of Newton-Schulz on one core whatever the batch (torch's Muon, bf16, 16 matrices of
128 x 128..512; AdamW's step at batch 12 is ~44 ms, Muon's ~64 ms), so fewer, larger steps win on time until the
final loss starts to give; batch 16 keeps it well under 1.83.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# nanoGPT's config/train_shakespeare_char.py with its README's CPU overrides
REF = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, iters=2000, lr=1e-3, min_lr=1e-4,
           warmup=100, beta2=0.99, weight_decay=0.1, grad_clip=1.0)
N_SNAPSHOTS = 50  # weights kept per run, at equal fractions of its steps


def load_splits(path: str) -> tuple[list[str], "object", "object"]:
    """(alphabet, train ids, val ids): ids index the sorted characters of the whole file; 90% / 10%."""
    import torch

    text = Path(path).read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(ids))
    return chars, ids[:n], ids[n:]


def heldout_loss(logits_fn, val, block: int, batch: int = 128) -> float:
    """Mean next-character cross-entropy over every non-overlapping `block`-window of `val`."""
    import torch
    import torch.nn.functional as F

    n = (len(val) - 1) // block
    x_all = val[: n * block].view(n, block)
    y_all = val[1: n * block + 1].view(n, block)
    total = 0.0
    with torch.no_grad():
        for i in range(0, n, batch):
            logits = logits_fn(x_all[i:i + batch]).float()
            total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y_all[i:i + batch].reshape(-1),
                                     reduction="sum").item()
    return total / (n * block)


class Snapshots:
    """Weights kept at N_SNAPSHOTS equal fractions of a run, with the run's clock (its own bookkeeping and
    scoring excluded), then scored after training: only the final one and the few a bisection for the first
    one at or below the target needs (held-out loss falls near-monotonically this close to the end), so a run
    pays ~7 full scorings instead of one per snapshot."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.excluded = 0.0
        self.points: list[tuple[float, int, dict]] = []

    def pause(self) -> float:
        return time.perf_counter()

    def resume(self, paused_at: float) -> None:
        self.excluded += time.perf_counter() - paused_at

    def take(self, step: int, model) -> None:
        t = time.perf_counter()
        self.points.append((t - self.start - self.excluded, step,
                            {k: v.detach().clone() for k, v in model.state_dict().items()}))
        self.excluded += time.perf_counter() - t

    def time_to(self, score, target=None) -> dict:
        """{"final": loss, "target": target, "time": s, "step": n, "scored": {step: loss}}. `target`: a loss, a
        function returning it (asked once the final loss is known), or None: the run's own final loss."""
        scored: dict[int, float] = {}

        def loss(i: int) -> float:
            if i not in scored:
                scored[i] = score(self.points[i][2])
            return scored[i]

        last = len(self.points) - 1
        final = loss(last)
        target = final if target is None else float(target() if callable(target) else target)
        out = {"final": final, "target": target, "time": math.inf, "step": None, "total": self.points[last][0],
               "steps": self.points[last][1]}
        if final > target:
            return {**out, "scored": {self.points[i][1]: v for i, v in scored.items()}}
        lo, hi = 0, last  # invariant: loss(hi) <= target
        while lo < hi:
            mid = (lo + hi) // 2
            if loss(mid) <= target:
                hi = mid
            else:
                lo = mid + 1
        return {**out, "time": self.points[hi][0], "step": self.points[hi][1],
                "scored": {self.points[i][1]: v for i, v in sorted(scored.items())}}


# ---- (a) the reference: a plain eager fp32 loop, written for this benchmark ---------------------------


def reference_model(vocab_size: int):
    """nanoGPT's model shape, written plainly: pre-LN blocks without biases, tanh GELU, tied head."""
    import torch.nn as nn
    import torch.nn.functional as F

    V, C, T, H, L = vocab_size, REF["n_embd"], REF["block_size"], REF["n_head"], REF["n_layer"]

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(C, bias=False), nn.LayerNorm(C, bias=False)
            self.qkv, self.proj = nn.Linear(C, 3 * C, bias=False), nn.Linear(C, C, bias=False)
            self.fc, self.out = nn.Linear(C, 4 * C, bias=False), nn.Linear(4 * C, C, bias=False)

        def forward(self, x):
            B = x.size(0)
            q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in self.qkv(self.ln1(x)).split(C, 2))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
            x = x + self.proj(a)
            return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok, self.pos = nn.Embedding(V, C), nn.Embedding(T, C)
            self.blocks = nn.ModuleList(Block() for _ in range(L))
            self.ln = nn.LayerNorm(C, bias=False)
            for name, p in self.named_parameters():
                if p.dim() == 2:
                    scaled = name.endswith(("proj.weight", "out.weight"))
                    nn.init.normal_(p, std=0.02 / math.sqrt(2 * L) if scaled else 0.02)

        def forward(self, idx):
            x = self.tok(idx) + self.pos.weight[: idx.size(1)]
            for b in self.blocks:
                x = b(x)
            return self.ln(x) @ self.tok.weight.T  # tied output head

    return Net()


def reference_step(net, opt, train, lr: float) -> None:
    """One iteration of the reference loop: a batch at random offsets, forward, backward, clip, AdamW."""
    import torch
    import torch.nn.functional as F

    T, B = REF["block_size"], REF["batch_size"]
    for g in opt.param_groups:
        g["lr"] = lr
    offsets = torch.randint(len(train) - T - 1, (B,))
    x = torch.stack([train[o:o + T] for o in offsets])
    y = torch.stack([train[o + 1:o + T + 1] for o in offsets])
    logits = net(x)
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), REF["grad_clip"])
    opt.step()


def reference_optimizer(net):
    import torch

    decay = [p for p in net.parameters() if p.dim() >= 2]
    rest = [p for p in net.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": REF["weight_decay"]},
                              {"params": rest, "weight_decay": 0.0}], lr=REF["lr"], betas=(0.9, REF["beta2"]))


def run_reference(data: str, iters: int) -> dict:
    import torch

    chars, train, val = load_splits(data)
    T = REF["block_size"]
    torch.manual_seed(1337)
    net = reference_model(len(chars))
    opt = reference_optimizer(net)

    def lr_at(it: int) -> float:
        if it < REF["warmup"]:
            return REF["lr"] * (it + 1) / REF["warmup"]
        progress = (it - REF["warmup"]) / max(1, iters - REF["warmup"])
        return REF["min_lr"] + 0.5 * (REF["lr"] - REF["min_lr"]) * (1 + math.cos(math.pi * min(1.0, progress)))

    every = max(1, iters // N_SNAPSHOTS)
    snaps = Snapshots()
    for it in range(iters):
        reference_step(net, opt, train, lr_at(it))
        if (it + 1) % every == 0 or it + 1 == iters:
            snaps.take(it + 1, net)

    def score(state: dict) -> float:
        net.load_state_dict(state)
        net.eval()
        return heldout_loss(net, val, T)

    return snaps.time_to(score)


# ---- (b) gptforge through its trainer ----------------------------------------------------------------


def write_data_dir(data: str, out: Path) -> int:
    """A prepared data directory (gptforge's char tokenizer) with exactly the reference's split."""
    import numpy as np

    from gptforge.data.prepare import MANIFEST_FORMAT, MANIFEST_VERSION
    from gptforge.data.shards import dtype_for_vocab, write_shard
    from gptforge.tokenizer.char import CharTokenizer

    text = Path(data).read_text(encoding="utf-8")
    tok = CharTokenizer.train([text])
    tok.save(out / "tokenizer")
    n = int(0.9 * len(text))
    dtype = dtype_for_vocab(tok.vocab_size)
    splits = {}
    for name, part in (("train", text[:n]), ("val", text[n:])):
        ids = np.asarray(tok.encode_ordinary_array(part), dtype=dtype)
        write_shard(out / f"{name}_000000.bin", ids, dtype)
        splits[name] = {"tokens": int(ids.size), "shards": [{"file": f"{name}_000000.bin", "tokens": int(ids.size)}]}
    manifest = {"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "dtype": np.dtype(dtype).name,
                "tokenizer": {"spec": "char", "kind": "char", "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
                              "dir": "tokenizer"}, "splits": splits, "sources": [str(data)]}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return tok.vocab_size


def _preset_train(name: str) -> dict:
    from gptforge.config import PRESET_TRAIN
    return dict(PRESET_TRAIN[name])


# gptforge recipes: TrainConfig fields over the reference's (iterations scale with --iters)
RECIPES = {
    "same": lambda iters: {},  # the reference's recipe with gptforge's defaults (bf16 autocast where native)
    # the char-small preset's training settings (gptforge.config.PRESET_TRAIN), steps scaled with --iters
    "small-cpu": lambda iters: {**_preset_train("char-small"),
                                "max_steps": iters * _preset_train("char-small")["max_steps"] // REF["iters"]},
    # the preset before Muon: AdamW alone at 5x the reference's LR over 70% of its steps, at its batch
    "adamw": lambda iters: {**_preset_train("char-small"), "optimizer": "adamw", "max_steps": iters * 7 // 10,
                            "micro_batch_size": REF["batch_size"], "warmup_steps": 50},
}


def gptforge_config(recipe: str, data_dir: Path, out_dir: Path, vocab: int, iters: int):
    """The run config of a recipe; `iters` is the reference's iteration count (recipes scale from it)."""
    from gptforge.config import DataConfig, ModelConfig, RunConfig, TrainConfig, apply_overrides

    model = ModelConfig(vocab_size=vocab, block_size=REF["block_size"], n_layer=REF["n_layer"],
                        n_head=REF["n_head"], n_embd=REF["n_embd"])
    base = dict(out_dir=str(out_dir), micro_batch_size=REF["batch_size"], max_steps=iters, lr=REF["lr"],
                min_lr_ratio=REF["min_lr"] / REF["lr"], warmup_steps=REF["warmup"], beta2=REF["beta2"],
                weight_decay=REF["weight_decay"], grad_clip=REF["grad_clip"], eval_batches=1,
                log_every=max(1, iters // 10), checkpoint_every=10 * iters,
                sample_every=10 * iters, sample_tokens=0)
    name, _, sets = recipe.partition(":")
    if name not in RECIPES:
        raise SystemExit(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
    config = RunConfig(model=model, train=TrainConfig(**{**base, **RECIPES[name](iters)}),
                       data=DataConfig(path=str(data_dir)))
    if sets:
        config = apply_overrides(config, sets.split(","))
    return config


def run_gptforge(data: str, iters: int, recipe: str, target) -> dict:

    from gptforge.model import GPT
    from gptforge.training.trainer import Trainer

    _, _, val = load_splits(data)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        vocab = write_data_dir(data, data_dir)
        config = gptforge_config(recipe, data_dir, Path(tmp) / "run", vocab, iters)
        steps = config.train.max_steps
        every = max(1, steps // N_SNAPSHOTS)
        config.train.eval_every = every
        config.train.eval_batches = 1
        trainer = Trainer(config, log=lambda msg: None)
        snaps: list[Snapshots] = []

        def snapshot_instead_of_evaluating() -> dict:
            if not snaps:  # called once before the first step: the clock starts now
                snaps.append(Snapshots())
            elif trainer.counters.step % every == 0 or trainer.counters.step == steps:
                snaps[0].take(trainer.counters.step, trainer.raw_model)
            return {}

        trainer.evaluate = snapshot_instead_of_evaluating  # the benchmark scores, outside the clock
        trainer.fit()
        model = GPT(config.model)

        def score(state: dict) -> float:
            model.load_state_dict(state)
            model.eval()
            return heldout_loss(lambda x: model(x)[0], val, config.seq_len)

        return snaps[0].time_to(score, target)


# ---- where a step's time goes ----------------------------------------------------------------------------

OP_GROUPS = (  # profiler op name fragments -> group (first match wins)
    ("attention (SDPA)", ("scaled_dot_product", "flash_attention")),
    ("matmuls", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("GELU", ("gelu",)),
    ("LayerNorm", ("layer_norm",)),
    ("AdamW + grad-norm clip", ("adam", "vector_norm", "_foreach", "clamp")),
    ("dtype casts, copies", ("copy_", "_to_copy")),
)


def profile(data: str, steps: int = 20) -> None:
    """Step time of the reference and of gptforge's trainer step (fp32, its bf16 policy, and that with Muon),
    interleaved in this process, then a torch.profiler breakdown of gptforge's bf16 step by phase and by kind of op."""
    import dataclasses
    import statistics

    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile, record_function

    from gptforge.data.loader import SequenceLoader
    from gptforge.model import GPT
    from gptforge.training.optim import build_optimizer
    from gptforge.training.precision import resolve_precision
    try:  # the trainer's step pieces (train/step.py after the trainer's split)
        from gptforge.training.step import clip_and_step, forward_backward
    except ImportError:
        from gptforge.training.trainer import clip_and_step, forward_backward

    chars, train, _ = load_splits(data)
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        vocab = write_data_dir(data, data_dir)
        config = gptforge_config("same", data_dir, Path(tmp) / "run", vocab, REF["iters"])
        loader = SequenceLoader(data_dir, "train", config.seq_len, REF["batch_size"])
        torch.manual_seed(0)
        net = reference_model(len(chars))
        ref_opt = reference_optimizer(net)
        model = GPT(config.model)
        opt = build_optimizer(model, config.train, cpu)
        muon_model = GPT(config.model)
        muon_opt = build_optimizer(muon_model, dataclasses.replace(config.train, optimizer="muon"), cpu)
        bf16 = resolve_precision("auto", cpu)

        def gptforge_step(precision: str, muon: bool = False) -> None:
            net_, opt_ = (muon_model, muon_opt) if muon else (model, opt)
            with record_function("data"):
                x, y = loader.next_batch()
            with record_function("forward + backward"):
                loss = forward_backward(net_, [(x, y)], 1, cpu, precision)
            with record_function("clip + AdamW"):
                clip_and_step(net_, opt_, loss, REF["grad_clip"])

        arms = {"reference (eager fp32)": lambda: reference_step(net, ref_opt, train, REF["lr"]),
                "gptforge step, fp32": lambda: gptforge_step("fp32"),
                f"gptforge step, {bf16} (its default here)": lambda: gptforge_step(bf16),
                f"gptforge step, {bf16}, Muon": lambda: gptforge_step(bf16, muon=True)}
        times: dict[str, list[float]] = {k: [] for k in arms}
        for rnd in range(6):
            for name, step in arms.items():
                step()
                t0 = time.perf_counter()
                for _ in range(steps // 2):
                    step()
                if rnd:  # the first round warms up
                    times[name].append((time.perf_counter() - t0) / (steps // 2))
        ref = statistics.median(times["reference (eager fp32)"])
        print(f"{'step (in-process, interleaved, median)':44} {'ms/step':>8} {'vs reference':>12}")
        for name, ts in times.items():
            print(f"{name:44} {1e3 * statistics.median(ts):8.1f} {ref / statistics.median(ts):11.2f}x")

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                gptforge_step(bf16)
            wall = time.perf_counter() - t0
    events = prof.key_averages()
    phases = {e.key: e.cpu_time_total for e in events if e.key in ("data", "forward + backward", "clip + AdamW")}
    groups = {name: 0.0 for name, _ in OP_GROUPS}
    other = 0.0
    for e in events:
        if not e.key.startswith("aten::"):
            continue
        for name, fragments in OP_GROUPS:
            if any(f in e.key for f in fragments):
                groups[name] += e.self_cpu_time_total
                break
        else:
            other += e.self_cpu_time_total
    per_step = 1e3 * wall / steps
    print(f"\ngptforge {bf16} step under torch.profiler: {per_step:.1f} ms/step (profiling adds overhead)")
    print("by phase: " + ", ".join(f"{k} {v / 1e3 / steps:.1f} ms" for k, v in phases.items()))
    in_ops = sum(groups.values()) + other
    for name, us in list(groups.items()) + [("other aten ops", other)]:
        print(f"  {name:28} {us / 1e3 / steps:7.2f} ms {100 * us / 1e3 / steps / per_step:5.1f}%")
    python = per_step - in_ops / 1e3 / steps
    print(f"  {'Python, dispatcher, autograd':28} {python:7.2f} ms {100 * python / per_step:5.1f}%  (wall minus op time)")


# ---- driver ------------------------------------------------------------------------------------------


def start(arm: str, data: str, iters: int, threads: int) -> subprocess.Popen:
    """A fresh process training `arm`; a recipe arm then reads its target loss from stdin (the reference's
    final loss, which a concurrent reference may not have yet) and prints its result."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, __file__, "--child", arm, "--data", data, "--iters", str(iters), "--threads", str(threads)]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def finish(proc: subprocess.Popen, arm: str, target: float | None) -> dict:
    out, err = proc.communicate("" if target is None else f"{target!r}\n")
    if proc.returncode != 0:
        raise SystemExit(f"{arm} failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="path to tinyshakespeare.txt (input.txt of nanoGPT's shakespeare_char)")
    p.add_argument("--pairs", type=int, default=3, help="rounds of one run per arm (default 3)")
    p.add_argument("--iters", type=int, default=REF["iters"], help="reference iterations (default 2000)")
    p.add_argument("--threads", type=int, default=1, help="OMP threads for every run (default 1)")
    p.add_argument("--arms", default="reference,small-cpu",
                   help="comma list after `reference`: gptforge recipes (" + ", ".join(RECIPES) + "), each "
                        "optionally RECIPE:train.key=value;train.key=value")
    p.add_argument("--concurrent", action="store_true",
                   help="run each round's arms at the same time (they share whatever load the machine has, but an "
                        "arm that finishes first leaves the CPU to the others: this favours the longest run)")
    p.add_argument("--quick", action="store_true", help="1 round of 400 reference iterations (development)")
    p.add_argument("--profile", action="store_true",
                   help="instead: per-step times (in-process A/B) and where gptforge's step spends its time")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if not a.data:
        p.error("--data PATH is required: the tinyshakespeare text file (nanoGPT's data/shakespeare_char/input.txt)")
    if not Path(a.data).is_file():
        p.error(f"--data {a.data}: no such file")
    if a.profile:
        import torch
        torch.set_num_threads(a.threads)
        profile(a.data)
        return
    if a.child:
        import torch
        torch.set_num_threads(a.threads)
        if a.child == "reference":
            out = run_reference(a.data, a.iters)
        else:
            out = run_gptforge(a.data, a.iters, a.child, lambda: float(sys.stdin.readline()))
        print(json.dumps(out))
        return
    if a.quick:
        a.pairs, a.iters = 1, 400
    arms = [s.replace(";", ",") for s in a.arms.split(",")]
    if arms[0] != "reference":
        arms.insert(0, "reference")
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    print(f"{a.pairs} round(s) of {', '.join(arms)} ({'concurrent' if a.concurrent else 'one after the other'}); "
          f"reference {a.iters} iterations; OMP_NUM_THREADS={a.threads}; each round's target: its reference run's "
          "final held-out loss", flush=True)
    for i in range(a.pairs):
        if a.concurrent:
            procs = [start(arm, a.data, a.iters, a.threads) for arm in arms]
            results = [finish(procs[0], arms[0], None)]
            results += [finish(proc, arm, results[0]["target"]) for proc, arm in zip(procs[1:], arms[1:])]
        else:
            results = []
            for arm in arms:
                target = results[0]["target"] if results else None
                results.append(finish(start(arm, a.data, a.iters, a.threads), arm, target))
        for arm, r in zip(arms, results):
            runs[arm].append(r)
            reached = f"reached {r['target']:.4f} at step {r['step']}, {r['time']:6.1f} s" if r["step"] else \
                f"did not reach {r['target']:.4f}"
            print(f"  round {i + 1} {arm:36} final {r['final']:.4f} after {r['steps']} steps, {r['total']:6.1f} s; "
                  f"{reached}", flush=True)
    ref_times = [r["time"] for r in runs["reference"]]
    print(f"\n{'arm':36} {'time to target, each round (s)':>32} {'median':>7} {'ratio':>6} {'final loss':>10}")
    for arm in arms:
        times = [r["time"] for r in runs[arm]]
        ratios = [t / ref for t, ref in zip(times, ref_times)]
        each = " ".join(f"{t:.1f}" for t in times)
        final = statistics.median(r["final"] for r in runs[arm])
        print(f"{arm:36} {each:>32} {statistics.median(times):7.1f} {statistics.median(ratios):5.2f}x {final:10.4f}")
    print("ratio: median over rounds of (time / that round's reference time); times exclude scoring")


if __name__ == "__main__":
    main()
