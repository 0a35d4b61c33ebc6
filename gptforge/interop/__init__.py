"""Moving models between gptforge and other ecosystems.

`hf` writes and reads Hugging Face transformers directories (GPT-2 layout for dense models, GPT-Neo for
GPT-3-style alternating dense/banded models), `hf_tokenizer` gives each tokenizer kind its transformers
files, `gguf` writes llama.cpp's GGUF. Every exporter refuses a model it cannot represent exactly rather
than writing one that computes different logits.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError


def check_output(out: str | os.PathLike, force: bool, what: str = "--out") -> Path:
    """Refuse to replace an existing non-empty directory or an existing file unless `force` says so.

    Exports are written to a temporary name and renamed into place, so this check is the only thing that
    stands between a typo in `--out` and a user's lost files.
    """
    out = Path(out)
    if out.is_dir():
        if any(out.iterdir()) and not force:
            raise UserError(f"{what} {out} is a non-empty directory; choose a new path or pass --force "
                            "to replace it")
    elif out.exists() and not force:
        raise UserError(f"{what} {out} already exists; choose a new path or pass --force to replace it")
    return out
