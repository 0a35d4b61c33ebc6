"""gptforge: from a folder of text to a trained GPT-2/GPT-3-family model you can sample, evaluate and export.

Every CLI command is a function here; the heavier ones are imported on first use, so `import gptforge`
stays quick and `gptforge info` never loads the trainer.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from .config import PRESETS, ModelConfig, RunConfig, TrainConfig, get_preset  # noqa: E402
from .errors import UserError  # noqa: E402
from .model import GPT  # noqa: E402

# `train` is also a submodule name, and importing a submodule (anywhere, any time) sets the package
# attribute to the module. Importing it now, then binding the name, keeps the function here; later imports
# of the submodule find it in sys.modules and leave this name alone. (`generate` lives in gptforge.generation.)
from .train import trainer as _trainer_module  # noqa: E402

train = _trainer_module.train

_LAZY = {
    "load_model": "gptforge.loading",
    "get_tokenizer": "gptforge.tokenizer",
    "load_tokenizer": "gptforge.tokenizer",
    "prepare": "gptforge.data.prepare",
    "SequenceLoader": "gptforge.data.loader",
    "generate": "gptforge.generation",
    "SamplingConfig": "gptforge.generation",
    "generate_text": "gptforge.generation",
    "run_tasks": "gptforge.evals.runner",
    "export_hf": "gptforge.interop.hf",
    "export_gguf": "gptforge.interop.gguf",
}

__all__ = ["GPT", "ModelConfig", "PRESETS", "RunConfig", "TrainConfig", "UserError", "get_preset",
           "train", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gptforge' has no attribute {name!r}")
