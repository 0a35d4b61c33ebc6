"""The offline demo behind a bare `gptforge train`: Python's own standard library in, a model that writes
something Python-shaped out, in a few minutes on a laptop CPU.

Needs no download: the corpus is the interpreter's own sources (`builtin:pystdlib`), tokenized with a small
byte-level BPE trained on them. The model is sized for ~4 minutes on 2 CPU cores with bf16 autocast;
`max_time` caps it on slower machines (the LR schedule still ends at max_steps, so a capped run stops
early on a higher LR, which is fine for a demo).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from ..config import DataConfig, ModelConfig, RunConfig, TrainConfig
from . import checkpoint as ckpt

DEMO_DATA = "data/pystdlib"
DEMO_RUN = "runs/demo"
DEMO_SOURCE = "builtin:pystdlib"
DEMO_TOKENIZER = "bpe:4096"
DEMO_VOCAB = 4096
DEMO_PROMPTS = ["def ", "import os\n\nclass ", "    for i in range("]


def demo_config(data_dir: str = DEMO_DATA, out_dir: str = DEMO_RUN) -> RunConfig:
    """The demo run: a 4-layer, 256-wide GPT over 256-token windows of stdlib code (~4.2M parameters)."""
    model = ModelConfig(vocab_size=DEMO_VOCAB, block_size=256, n_layer=4, n_head=4, n_embd=256)
    train = TrainConfig(
        out_dir=out_dir, micro_batch_size=16, max_steps=600, max_time=330.0,
        lr=2e-3, warmup_steps=30, schedule="cosine", min_lr_ratio=0.1, weight_decay=0.1,
        log_every=25, eval_every=100, eval_batches=8, sample_every=300, checkpoint_every=100,
        keep_checkpoints=2, sample_prompts=list(DEMO_PROMPTS), sample_tokens=96, sample_temperature=0.7,
        sample_top_k=40)
    return RunConfig(model=model, train=train, data=DataConfig(path=data_dir))


def ensure_demo_data(data_dir: str | Path, log: Callable[[str], None]) -> None:
    """Prepare the stdlib corpus into `data_dir` unless a prepared copy is already there."""
    data_dir = Path(data_dir)
    if (data_dir / "manifest.json").is_file():
        log(f"using the prepared corpus in {data_dir}")
        return
    from ..data.prepare import prepare

    log(f"preparing the demo corpus: Python's standard library -> {data_dir} "
        f"(training a {DEMO_VOCAB}-token BPE tokenizer first; about a minute)")
    prepare([DEMO_SOURCE], DEMO_TOKENIZER, data_dir, progress=True)


def _resume_mode(config: RunConfig, log: Callable[[str], None]) -> tuple[str | None, bool]:
    """(resume, fresh) for the demo's run directory: continue an unfinished run, restart a finished one."""
    run_dir = Path(config.train.out_dir)
    latest = ckpt.latest_valid_checkpoint(run_dir, report=log)
    if latest is None:
        if ckpt.list_checkpoints(run_dir):
            log(f"{run_dir} has no usable checkpoint: starting the demo fresh")
            return None, True
        return None, False
    step = ckpt.read_state(latest)["step"]
    if step < config.train.max_steps:
        log(f"{run_dir} holds an unfinished demo run (step {step} of {config.train.max_steps}): resuming it "
            f"(delete {run_dir} to start over)")
        return "auto", False
    log(f"{run_dir} holds a finished demo run (step {step}): starting a fresh one in its place")
    return None, True


def run_demo(data_dir: str = DEMO_DATA, out_dir: str = DEMO_RUN, log: Callable[[str], None] | None = None,
             config: RunConfig | None = None):
    """Prepare the corpus if needed, train the demo model, print its final samples; returns a TrainResult."""
    from .run_config import fit_vocab_to_data
    from .trainer import Trainer

    log = log or (lambda msg: print(msg, flush=True))
    config = config or demo_config(data_dir, out_dir)
    ensure_demo_data(config.data.path, log)
    config = fit_vocab_to_data(config, explicit_vocab=False)
    resume, fresh = _resume_mode(config, log)
    trainer = Trainer(config, resume=resume, fresh=fresh, log=log)
    result = trainer.fit()
    samples = getattr(trainer, "last_samples", None)
    if samples:
        log("\n==== samples from the trained model ====")
        for text in samples:
            log(text.rstrip() + "\n----")
    run_dir = Path(config.train.out_dir)
    log(f"done: {result.step} steps, {result.tokens:,} tokens; "
        + (f"val loss {result.val_loss:.3f}; " if result.val_loss is not None else "")
        + f"curve in {run_dir / 'loss.png'}, samples in {run_dir / 'samples.txt'}; "
        f"try: gptforge sample --model {run_dir} \"def \"")
    return result


def tiny_demo_config(data_dir: str, out_dir: str, max_steps: int = 60) -> RunConfig:
    """The demo's recipe shrunk for tests: same LR/schedule family, a model that trains in seconds."""
    config = demo_config(data_dir, out_dir)
    model = dataclasses.replace(config.model, block_size=64, n_layer=2, n_embd=64, n_head=2)
    train = dataclasses.replace(config.train, max_steps=max_steps, max_time=0.0, micro_batch_size=8,
                                warmup_steps=5, eval_every=max_steps // 2, sample_every=max_steps,
                                checkpoint_every=max_steps, sample_tokens=16, log_every=10)
    return dataclasses.replace(config, model=model, train=train)
