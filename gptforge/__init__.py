"""gptforge: from a folder of text to a trained GPT-2/GPT-3-family model you can sample, evaluate and export."""

__version__ = "0.1.0"

from .config import ModelConfig, get_preset, PRESETS  # noqa: E402
from .errors import UserError  # noqa: E402
from .model import GPT  # noqa: E402

__all__ = ["GPT", "ModelConfig", "PRESETS", "UserError", "get_preset", "__version__"]
