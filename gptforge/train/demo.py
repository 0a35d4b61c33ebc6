"""The offline demo behind a bare `gptforge train`: Python's own standard library in, a model that writes
something Python-shaped out, in a few minutes on a laptop CPU.

Needs no download: the corpus is the interpreter's own sources (`builtin:pystdlib`), tokenized with a small
byte-level BPE trained on them. The model is small (~2.5M parameters, 128-token windows) and, before a
new run, a few timed steps on this machine set `max_steps` so the whole cosine schedule fits in about four
minutes (a fixed step count, written to config.json, keeps the run resumable bit for bit); `max_time`
is only a safety cap.
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
DEMO_SECONDS = 240.0
MIN_DEMO_STEPS = 60  # calibration never plans fewer
MEANINGFUL_STEPS = 150  # below this the demo's samples are mostly noise: say so
CALIBRATION_STEPS = 8  # timed steps (after one warm-up step): the median survives a busy moment


def calibrate_steps(config: RunConfig, seconds: float = DEMO_SECONDS,
                    timed_steps: int = CALIBRATION_STEPS) -> tuple[int, float]:
    """(steps that fit in `seconds`, seconds per step) from the median of `timed_steps` timed steps of the demo
    model here, after one warm-up step (a single slow step on a busy machine does not set the plan)."""
    import time

    import torch

    from ..model import GPT
    from .optim import build_optimizer
    from .precision import resolve_device, resolve_precision
    from .step import clip_and_step, forward_backward

    device = resolve_device(config.train.device)
    precision = resolve_precision(config.train.precision, device)
    with torch.random.fork_rng(devices=[]):
        model = GPT(config.model).to(device)
        opt = build_optimizer(model, config.train, device)
        x = torch.randint(0, config.model.vocab_size, (config.train.micro_batch_size, config.seq_len + 1))
        times = []
        for _ in range(timed_steps + 1):
            t0 = time.perf_counter()
            loss = forward_backward(model, [(x[:, :-1], x[:, 1:])], 1, device, precision)
            clip_and_step(model, opt, loss, 1.0)
            times.append(time.perf_counter() - t0)
    per_step = statistics.median(times[1:]) * 1.15  # + evaluation, logging and checkpoint overhead
    return int(min(3000, max(MIN_DEMO_STEPS, seconds / per_step))), per_step


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
        out_dir=out_dir, micro_batch_size=24, max_steps=300, max_time=1.5 * DEMO_SECONDS,
        lr=2e-3, warmup_steps=30, schedule="cosine", min_lr_ratio=0.1, weight_decay=0.1,
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
        steps, per_step = calibrate_steps(config)
        config = with_steps(config, steps)
        log(f"this machine: {per_step:.2f} s per step -> {steps} steps "
            f"({steps * config.train.micro_batch_size * config.seq_len:,} tokens, about "
            f"{steps * per_step / 60:.0f} min)")
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

