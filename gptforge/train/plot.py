"""loss.png: train and validation loss against tokens seen, redrawn from metrics.jsonl.

Drawn with matplotlib's Agg backend (no display needed) into a temporary file and renamed, so a viewer
refreshing the picture never catches it half-written.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import atomic
from .metrics import read_metrics

PLOT_FILE = "loss.png"


def plot_losses(run_dir: str | os.PathLike) -> Path | None:
    """Redraw `run_dir`/loss.png from its metrics.jsonl; None when there is nothing to plot yet."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    train = [(r["tokens"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float)) and "tokens" in r]
    val = [(r["tokens"], r["val_loss"]) for r in rows
           if isinstance(r.get("val_loss"), (int, float)) and "tokens" in r]
    if not train and not val:
        return None
    fig = Figure(figsize=(7, 4.2), dpi=100)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val), label="validation", marker="o", markersize=3, linewidth=1.5)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    final = run_dir / PLOT_FILE
    with atomic.atomic_file(final) as tmp:
        fig.savefig(tmp, format="png")
    return final
