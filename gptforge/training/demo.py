"""The offline demo behind a bare `gptforge train`: Python's own standard library in, a model that writes
something Python-shaped out, in a few minutes on a laptop CPU.

Needs no download: the corpus is the interpreter's own sources (`builtin:pystdlib`), tokenized with a small
byte-level BPE trained on them. The model is small (~2.5M parameters, 128-token windows) and trains for a fixed
`DEMO_STEPS` from a fixed seed (every machine fast enough runs the same recipe), unless a few timed steps show
they would not fit in `DEMO_SECONDS` here: then fewer, and the log says so. The timing also picks the thread
count (on a CPU shared with other busy processes one thread is faster than two). The plan is written to
config.json, so the run resumes bit for bit; `max_time` is a safety cap for a machine that turns busy mid-run,
and the log says when it ended a run.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Callable

from ..config import DataConfig, ModelConfig, RunConfig, TrainConfig
from ..layout import MANIFEST_FILE, PLOT_FILE, RUN_CONFIG_FILE, SAMPLES_FILE, latest_valid_checkpoint, list_checkpoints
from . import checkpoint as ckpt

DEMO_DATA = "data/pystdlib"
DEMO_RUN = "runs/demo"
DEMO_SOURCE = "builtin:pystdlib"
DEMO_TOKENIZER = "bpe:4096"
DEMO_VOCAB = 4096
DEMO_PROMPTS = ["def ", "import os\n\nclass ", "    for i in range("]
# The recipe's length: on an idle 2-core CPU with native bf16 about three and a half minutes. Muon for the blocks'
# matrices (AdamW for the rest, as everywhere): measured there, 800 AdamW steps ended at held-out loss 3.92 in 193 s
# of training; Muon reached 3.92 after 450 steps (126 s) and ended at 3.53 after 800 (220 s, each step ~14% dearer),
# so 700 Muon steps take AdamW's time and end far lower.
DEMO_STEPS = 700
DEMO_SECONDS = 270.0  # the most the demo plans to take here: a slower machine trains fewer steps (and says so)
TIME_CAP = 1.5  # max_time = this x the planned time: a machine that turns busy mid-run is stopped (and told)
MIN_DEMO_STEPS = 60  # calibration never plans fewer
MEANINGFUL_STEPS = 150  # below this the demo's samples are mostly noise: say so
CALIBRATION_STEPS = 6  # timed steps per thread count (after one warm-up step): a median survives a busy moment
STEP_OVERHEAD = 1.15  # + evaluation, logging and checkpoints, over the bare optimizer step


@dataclasses.dataclass
class Calibration:
    """What `calibrate_steps` found: the steps to plan, the expected seconds per step with the thread count
    chosen, and the median step time of every thread count tried."""

    steps: int
    per_step: float
    threads: int
    tried: dict[int, float]

    def describe(self, target: int) -> str:
        """One line for the log: the speed, the thread count and why, and what that makes of the target."""
        others = ", ".join(f"{n} thread{'s' * (n > 1)}: {t:.2f} s" for n, t in self.tried.items() if n != self.threads)
        line = (f"this machine: {self.per_step:.2f} s per step with {self.threads} thread{'s' * (self.threads > 1)}"
                + (f" ({others})" if others else "") + f" -> {self.steps} steps, about "
                f"{self.steps * self.per_step / 60:.1f} min")
        if self.steps < target:
            line += (f" (the recipe's {target} would take {target * self.per_step / 60:.1f} min here, so fewer: "
                     "expect weaker results)")
        return line


def thread_counts() -> list[int]:
    """Thread counts worth timing: torch's default, and 1 on a CPU shared with other busy processes (there a
    2-thread step waits for its slower half: measured 2-3x slower than 1 thread with one other busy process on
    2 cores, while on an idle machine 2 threads are ~1.6x faster). An explicit OMP_NUM_THREADS is obeyed."""
    import os

    import torch

    default = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS") or default == 1:
        return [default]
    return [default, 1]


def calibrate_steps(config: RunConfig, seconds: float = DEMO_SECONDS, target: int = DEMO_STEPS,
                    timed_steps: int = CALIBRATION_STEPS) -> Calibration:
    """Time steps of `config`'s model here and plan `target` steps, or as many as fit in `seconds` when fewer.

    On a CPU each candidate thread count (`thread_counts`) is timed in alternation, so a load that comes and
    goes hits them alike; the fastest is kept (`torch.set_num_threads`) for the run. The median of
    `timed_steps` steps, after one warm-up step each, sets the plan: one slow step on a busy machine does not."""
    import time

    import torch

    from ..model import GPT
    from .optim import build_optimizer
    from .precision import resolve_device, resolve_precision
    from .step import clip_and_step, forward_backward

    device = resolve_device(config.train.device)
    precision = resolve_precision(config.train.precision, device)
    counts = thread_counts() if device.type == "cpu" else [torch.get_num_threads()]
    times: dict[int, list[float]] = {n: [] for n in counts}
    with torch.random.fork_rng(devices=[]):
        model = GPT(config.model).to(device)
        opt = build_optimizer(model, config.train, device)
        x = torch.randint(0, config.model.vocab_size, (config.train.micro_batch_size, config.seq_len + 1))
        for _ in range(timed_steps + 1):
            for n in counts:
                torch.set_num_threads(n)
                t0 = time.perf_counter()
                loss = forward_backward(model, [(x[:, :-1], x[:, 1:])], 1, device, precision)
                clip_and_step(model, opt, loss, 1.0)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[n].append(time.perf_counter() - t0)
    tried = {n: statistics.median(t[1:]) for n, t in times.items()}
    threads = min(tried, key=lambda n: tried[n])  # ties: the first tried, torch's default
    torch.set_num_threads(threads)
    per_step = tried[threads] * STEP_OVERHEAD
    steps = int(min(target, max(MIN_DEMO_STEPS, seconds / per_step)))
    return Calibration(steps, per_step, threads, tried)


def with_steps(config: RunConfig, steps: int) -> RunConfig:
    """The demo config with its step count and every interval scaled to `steps`."""
    every = max(10, steps // 6)
    train = dataclasses.replace(config.train, max_steps=steps, warmup_steps=max(10, steps // 20),
                                eval_every=every, checkpoint_every=every, sample_every=max(10, steps // 2),
                                log_every=max(5, steps // 30))
    return dataclasses.replace(config, train=train)


def demo_config(data_dir: str = DEMO_DATA, out_dir: str = DEMO_RUN) -> RunConfig:
    """The demo run: a 4-layer, 192-wide GPT over 128-token windows of stdlib code (~2.5M parameters);
    max_steps here is the default, replaced by `calibrate_steps` for a new run."""
    model = ModelConfig(vocab_size=DEMO_VOCAB, block_size=128, n_layer=4, n_head=4, n_embd=192)
    train = TrainConfig(
        out_dir=out_dir, micro_batch_size=24, max_steps=DEMO_STEPS, max_time=TIME_CAP * DEMO_SECONDS,
        lr=2e-3, warmup_steps=30, schedule="cosine", min_lr_ratio=0.1, weight_decay=0.1, optimizer="muon",
        log_every=25, eval_every=100, eval_batches=8, sample_every=300, checkpoint_every=100,
        keep_checkpoints=2, sample_prompts=list(DEMO_PROMPTS), sample_tokens=96, sample_temperature=0.7,
        sample_top_k=40)
    return RunConfig(model=model, train=train, data=DataConfig(path=data_dir))


def ensure_demo_data(data_dir: str | Path, log: Callable[[str], None], replace_other: bool = True) -> None:
    """Prepare the stdlib corpus into `data_dir` unless the demo's own preparation is already there.

    With `replace_other`, data prepared differently under that name (another tokenizer or corpus, e.g. a
    `gptforge prepare builtin:pystdlib --out data/pystdlib` with the gpt2 default) is replaced rather than
    used: the demo's model size and samples assume the 4,096-token BPE over the standard library. Without
    it (a caller-supplied config), any prepared data there is used as it is."""
    from ..data.prepare import prepare, read_manifest
    from ..errors import UserError

    data_dir = Path(data_dir)
    replace = False
    if (data_dir / MANIFEST_FILE).is_file() and not replace_other:
        log(f"using the prepared data in {data_dir}")
        return
    if (data_dir / MANIFEST_FILE).is_file():
        try:
            manifest = read_manifest(data_dir)
            ours = (manifest["tokenizer"].get("spec") == DEMO_TOKENIZER and manifest["sources"] == [DEMO_SOURCE])
        except (UserError, KeyError, TypeError):
            ours = False
        if ours:
            log(f"using the prepared corpus in {data_dir}")
            return
        log(f"{data_dir} holds data prepared differently from the demo's ({DEMO_SOURCE}, {DEMO_TOKENIZER}): "
            "preparing the demo corpus in its place")
        replace = True
    log(f"preparing the demo corpus: Python's standard library -> {data_dir} "
        f"(training a {DEMO_VOCAB}-token BPE tokenizer first; about a minute)")
    prepare([DEMO_SOURCE], DEMO_TOKENIZER, data_dir, progress=True, force=replace)


def _resume_mode(config: RunConfig, log: Callable[[str], None]) -> tuple[str | None, bool]:
    """(resume, fresh) for the demo's run directory: continue an unfinished run, restart a finished one."""
    run_dir = Path(config.train.out_dir)
    latest = latest_valid_checkpoint(run_dir, report=log)
    if latest is None:
        if list_checkpoints(run_dir):
            log(f"{run_dir} has no usable checkpoint: starting the demo fresh")
            return None, True
        return None, False
    state = ckpt.read_state(latest)
    step = state["step"]
    try:
        saved = json.loads((run_dir / RUN_CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        saved = {}
    saved_train = saved.get("train", {})
    max_steps = saved_train.get("max_steps", config.train.max_steps)
    max_time = saved_train.get("max_time", config.train.max_time)
    out_of_time = bool(max_time) and state.get("elapsed", 0.0) >= max_time  # the safety cap ended it
    if step < max_steps and not out_of_time and saved.get("model") == config.model.to_dict():
        log(f"{run_dir} holds an unfinished demo run (step {step} of {max_steps}): resuming it "
            f"(delete {run_dir} to start over)")
        return "auto", False
    log(f"{run_dir} holds a finished (or different) demo run at step {step}: starting a fresh one in its place")
    return None, True


def run_demo(data_dir: str = DEMO_DATA, out_dir: str = DEMO_RUN, log: Callable[[str], None] | None = None,
             config: RunConfig | None = None, calibrate: bool = True):
    """Prepare the corpus if needed, train the demo model, print its final samples; returns a TrainResult.

    `calibrate=False` keeps `config`'s own max_steps."""
    from ..resolve import fit_vocab_to_data
    from .trainer import Trainer

    log = log or (lambda msg: print(msg, flush=True))
    own_config = config is None
    config = config or demo_config(data_dir, out_dir)
    ensure_demo_data(config.data.path, log, replace_other=own_config)
    config = fit_vocab_to_data(config, explicit_vocab=False)
    resume, fresh = _resume_mode(config, log)
    run_dir = Path(config.train.out_dir)
    if resume:
        saved = RunConfig.from_dict(json.loads((run_dir / RUN_CONFIG_FILE).read_text()))
        config = dataclasses.replace(config, train=saved.train)  # the step count it was started with
    elif calibrate:
        plan = calibrate_steps(config)
        config = with_steps(config, plan.steps)
        config = dataclasses.replace(config, train=dataclasses.replace(
            config.train, max_time=round(TIME_CAP * plan.steps * plan.per_step)))
        log(plan.describe(DEMO_STEPS) + f"; {plan.steps * config.train.micro_batch_size * config.seq_len:,} tokens, "
            f"stopped at {config.train.max_time:.0f} s at the latest")
    trainer = Trainer(config, resume=resume, fresh=fresh, log=log)
    result = trainer.fit()
    samples = trainer.samples.last
    if samples:
        log("\n==== samples from the trained model ====")
        for text in samples:
            log(text.rstrip() + "\n----")
    planned = config.train.max_steps
    if result.stopped == "max_time":
        log(f"the demo's time cap ({config.train.max_time:.0f} s) ended the run at step {result.step} of {planned}: "
            "this machine ran slower than its calibration (busy?)")
    if result.stopped != "interrupted" and result.step < MEANINGFUL_STEPS:
        log(f"warning: only {result.step} steps were trained (the demo needs about {MEANINGFUL_STEPS} for samples "
            "that look like Python): run it again on a less busy machine, or raise the step count with "
            f"`gptforge train --out {run_dir} --resume --set train.max_steps=N`")
    log(f"{'stopped' if result.stopped == 'interrupted' else 'done'}: {result.step} steps, {result.tokens:,} tokens; "
        + (f"val loss {result.val_loss:.3f}; " if result.val_loss is not None else "")
        + f"curve in {run_dir / PLOT_FILE}, samples in {run_dir / SAMPLES_FILE}; "
        f"try: gptforge sample --model {run_dir} \"def \"")
    return result

