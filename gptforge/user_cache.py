"""gptforge's cache folder on the user's machine: `$GPTFORGE_CACHE`, or `~/.cache/gptforge`.

What lives there is gptforge's own and can always be made again: GPT-2's BPE ranks (gptforge.tokenizer.gpt2)
and quantized copies of weights files (gptforge.generation.quantized_cache). Standard library only, so any
module may ask where it is.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_CACHE = "GPTFORGE_CACHE"


def cache_dir() -> Path:
    """gptforge's cache: `$GPTFORGE_CACHE` or `~/.cache/gptforge`."""
    env = os.environ.get(ENV_CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gptforge"
