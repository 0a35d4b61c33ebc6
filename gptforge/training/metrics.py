"""Where training numbers go: metrics.jsonl always; TensorBoard and Weights & Biases when asked.

metrics.jsonl is an append-only log, one JSON object per line, each written with a single `write` of a
whole line and flushed. It is the one file not replaced atomically on every write (rewriting it each log
step would cost O(n^2)); instead readers skip a torn last line, and on resume the file is rewritten
atomically with only the rows up to the checkpoint's step, so a resumed run continues the same curve
without duplicates.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .. import atomic
from ..errors import UserError
from ..layout import METRICS_FILE


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete rows of a metrics.jsonl (a torn or garbled line is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def truncate_metrics(path: str | os.PathLike, step: int) -> None:
    """Keep only rows with step <= `step` (rows a killed run logged after its last checkpoint go)."""
    path = Path(path)
    if not path.exists():
        return
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the row valid
    return value


def import_backends(tensorboard: bool, wandb: bool) -> tuple[Any, Any]:
    """The modules train.tensorboard / train.wandb need (None where not asked for), or a one-line UserError
    naming the missing package. The trainer calls it before the run directory is touched, so a missing one
    is reported before --fresh moves the previous run aside; MetricsLogger then uses what it returns."""
    tensorboard_module = wandb_module = None
    if tensorboard:
        try:
            import torch.utils.tensorboard as tensorboard_module
        except ImportError:
            raise UserError("train.tensorboard=true needs the tensorboard package: "
                            "pip install 'gptforge[tensorboard]'") from None
    if wandb:
        try:
            import wandb as wandb_module
        except ImportError:
            raise UserError("train.wandb=true needs the wandb package: pip install 'gptforge[wandb]'") from None
    return tensorboard_module, wandb_module


class MetricsLogger:
    """Appends rows to metrics.jsonl and mirrors scalars to the optional TensorBoard / W&B backends."""

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = False, wandb: bool = False,
                 wandb_project: str = "gptforge", run_config: dict[str, Any] | None = None) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        self._wandb = None
        tensorboard_module, wandb_module = import_backends(tensorboard, wandb)
        if tensorboard_module is not None:
            self._tb = tensorboard_module.SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if wandb_module is not None:
            self._wandb = wandb_module.init(project=wandb_project, dir=str(run_dir), config=run_config,
                                            name=Path(run_dir).name, resume="allow")

    def log(self, row: dict[str, Any]) -> None:
        row = {k: _clean(v) for k, v in row.items()}
        line = (json.dumps(row) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        step = row.get("step", 0)
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


# Peak dense bf16 tensor throughput (FLOP/s) of devices we can name, for MFU. Matched by substring of
# torch.cuda.get_device_name(); unknown devices (and CPUs) get no MFU rather than a made-up one.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is lower but reports the same name family
    "GH200": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "A10": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def device_peak_flops(device_name: str, precision: str) -> float | None:
    """Peak FLOP/s for `device_name` at bf16, or None when unknown or training in fp32."""
    if precision != "bf16":
        return None
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_BF16_FLOPS[key]
    return None
