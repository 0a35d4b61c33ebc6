"""loss.png: train and validation loss against tokens seen, redrawn from metrics.jsonl, with a second
panel for benchmark scores (`train.eval_tasks`, columns named TASK/METRIC) when there are any.

Drawn with matplotlib's Agg backend (no display needed) into a temporary file and renamed, so a viewer
refreshing the picture never catches it half-written.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import atomic
from ..layout import METRICS_FILE, PLOT_FILE
from .metrics import read_metrics

BENCHMARK_METRICS = ("acc", "acc_norm", "acc_micro", "bpb")  # scores on a comparable scale; not ppl


def plot_losses(run_dir: str | os.PathLike) -> Path | None:
    """Redraw `run_dir`/loss.png from its metrics.jsonl; None when there is nothing to plot yet."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / METRICS_FILE)
    train = [(r["tokens"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float)) and "tokens" in r]
    val = [(r["tokens"], r["val_loss"]) for r in rows
           if isinstance(r.get("val_loss"), (int, float)) and "tokens" in r]
    if not train and not val:
        return None
    benchmarks = sorted({key for r in rows for key in r if "/" in key and isinstance(r[key], (int, float))
                         and key.rsplit("/", 1)[1] in BENCHMARK_METRICS})
    fig = Figure(figsize=(7, 6.8 if benchmarks else 4.2), dpi=100)
    ax = fig.add_subplot(2, 1, 1) if benchmarks else fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val), label="validation", marker="o", markersize=3, linewidth=1.5)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    if benchmarks:
        bench = fig.add_subplot(2, 1, 2, sharex=ax)
        for key in benchmarks:
            points = [(r["tokens"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "tokens" in r]
            bench.plot(*zip(*points), label=key, marker="o", markersize=3, linewidth=1.2)
        bench.set_xlabel("tokens seen")
        bench.set_ylabel("score")
        bench.grid(alpha=0.3)
        bench.legend(fontsize=8)
    fig.tight_layout()
    final = run_dir / PLOT_FILE
    with atomic.atomic_file(final) as tmp:
        fig.savefig(tmp, format="png")
    return final
