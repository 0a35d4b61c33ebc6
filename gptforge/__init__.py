"""gptforge: from a folder of text to a trained GPT-2/GPT-3-family model you can sample, evaluate and export.

Every CLI command is a function here (`from gptforge import GPT, load_model, prepare, train, generate, ...`).
Nothing is imported until it is first used (PEP 562 module `__getattr__`), so `import gptforge` — and with
it `gptforge --help` and argument parsing — never imports torch.

Names: functions are verbs, modules are nouns, so no submodule import ever rebinds a function's name:
`gptforge.generate` is the function (the module is `gptforge.generation`) and `gptforge.train` the function
(the package is `gptforge.training`).
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

# public name -> module that defines it; imported on first access, then cached in this module's globals
_LAZY = {
    "GPT": "gptforge.model",
    "ModelConfig": "gptforge.config",
    "RunConfig": "gptforge.config",
    "TrainConfig": "gptforge.config",
    "PRESETS": "gptforge.config",
    "get_preset": "gptforge.config",
    "UserError": "gptforge.errors",
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
    "train": "gptforge.training.trainer",
    "sft": "gptforge.training.sft",
    "render_chat": "gptforge.chat.template",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gptforge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
