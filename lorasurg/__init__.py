"""lorasurg: offline LoRA adapter surgery and runtime, in Hugging Face PEFT's format.

The public API is what ``__all__`` lists; everything else is internal.
"""

from .config import LoraConfig, TaskType
from .errors import (
    ConfigError,
    ConfigTypeError,
    InputError,
    LorasurgError,
    OutputExistsError,
    ShapeMismatchError,
    UnsupportedError,
    ValidationFailed,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "LoraConfig",
    "TaskType",
    "LorasurgError",
    "InputError",
    "ConfigError",
    "ConfigTypeError",
    "ShapeMismatchError",
    "OutputExistsError",
    "UnsupportedError",
    "ValidationFailed",
]
