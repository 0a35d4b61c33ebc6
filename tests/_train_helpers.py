"""Helpers shared by the training tests: a small prepared corpus written by the tests themselves, and a
tiny run config over it (seconds to train on one core)."""

from __future__ import annotations

from pathlib import Path

from gptforge.config import RunConfig, apply_overrides

TINY = {"model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 32,
        "train.micro_batch_size": 4, "train.max_steps": 4, "train.warmup_steps": 1, "train.lr": 3e-3,
        "train.log_every": 1, "train.eval_every": 2, "train.eval_batches": 2, "train.checkpoint_every": 2,
        "train.sample_every": 1000, "train.device": "cpu", "train.precision": "fp32"}


def make_corpus(root: Path) -> Path:
    """A char-level prepared directory of generated Python-like text: 20 documents, a fifth held out."""
    from gptforge.data.prepare import prepare
    (root / "src").mkdir()
    for doc in range(20):
        text = "".join(f"def f{i}(x):\n    return x * {i % 7} + {i % 5}\n\n" for i in range(30 * doc, 30 * doc + 30))
        (root / "src" / f"m{doc:02d}.py").write_text(text)
    prepare([str(root / "src")], "char", root / "data", workers=1, val_fraction=0.2)
    return root / "data"


def tiny_config(data: Path, out: Path, **overrides) -> RunConfig:
    from gptforge.resolve import fit_vocab_to_data
    config = apply_overrides(RunConfig(), {"data.path": str(data), "train.out_dir": str(out), **TINY, **overrides})
    return fit_vocab_to_data(config, explicit_vocab=False)


def cli_args(data: Path, out: Path, **overrides) -> list[str]:
    args = ["train", "--data", str(data), "--out", str(out)]
    for key, value in {**TINY, **overrides}.items():
        args += ["--set", f"{key}={value}"]
    return args
