"""`gptforge consolidate CKPT_DIR`: one model.safetensors from an FSDP run's sharded checkpoint.

An FSDP2 run writes each checkpoint as per-rank shards (torch.distributed.checkpoint); `sample`, `eval` and
`export` read a single safetensors file. The trainer consolidates the final checkpoint itself; this command
does it for any other one (or for a run directory's newest), in one process, without GPUs.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "consolidate", help="merge an FSDP run's sharded checkpoint into one model.safetensors",
        description="Gather the weights of a sharded (train.parallel=fsdp) checkpoint into model.safetensors "
                    "inside it (or --out FILE), so that sample / eval / export can load it.")
    p.add_argument("checkpoint", metavar="CKPT_DIR",
                   help="checkpoints/step_N of an FSDP run, or the run directory (its newest valid checkpoint)")
    p.add_argument("--out", metavar="FILE",
                   help="write here instead of CKPT_DIR/model.safetensors (a new file: nothing is replaced)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import UserError
    from ..layout import CHECKPOINTS_DIR, latest_valid_checkpoint
    from ..training.dist_checkpoint import consolidate

    path = Path(args.checkpoint)
    if not path.is_dir():
        raise UserError(f"{path} is not a directory; pass checkpoints/step_N of an FSDP run or its run directory")
    if (path / CHECKPOINTS_DIR).is_dir():
        newest = latest_valid_checkpoint(path, report=lambda line: print(line, file=sys.stderr))
        if newest is None:
            raise UserError(f"run directory {path} has no valid checkpoint to consolidate")
        path = newest
    written = consolidate(path, args.out)
    print(f"wrote {written}")
    return 0
