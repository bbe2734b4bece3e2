"""Every failure lorasurg reports to a user is one of these exceptions.

Each message says what is wrong, where (file, tensor key, module name, shapes) and what to do about it.
The CLI turns a :class:`LorasurgError` into a one-paragraph message and its ``exit_code``; no traceback
reaches a user for a bad input.

Exit codes (``lorasurg`` CLI): 0 ok, 1 validation findings, 2 usage or input error.
"""

from __future__ import annotations

__all__ = [
    "LorasurgError",
    "InputError",
    "ConfigError",
    "ConfigTypeError",
    "ShapeMismatchError",
    "OutputExistsError",
    "UnsupportedError",
    "ValidationFailed",
]


class LorasurgError(Exception):
    """Base class of every error lorasurg raises on purpose.

    Attributes:
        exit_code: the process exit status the CLI uses for this error.
    """

    exit_code: int = 2


class InputError(LorasurgError):
    """A file, directory, repo id or tensor given to lorasurg cannot be read or is malformed."""


class ConfigError(LorasurgError, ValueError):
    """A LoRA configuration is invalid: a field or a combination of fields PEFT would refuse.

    Subclasses ``ValueError`` so code written against PEFT's ``LoraConfig`` keeps working.
    """


class ConfigTypeError(ConfigError, TypeError):
    """A config field has the wrong type (PEFT raises ``TypeError`` for those it checks)."""


class ShapeMismatchError(LorasurgError, ValueError):
    """Tensors that must agree in shape do not (adapter vs model, base vs tuned checkpoint, ...)."""


class OutputExistsError(LorasurgError):
    """The output path exists and is not empty; pass ``force=True`` (``--force``) to replace it."""


class UnsupportedError(LorasurgError, NotImplementedError):
    """A valid request that lorasurg does not implement (yet); the message says what to use instead."""


class ValidationFailed(LorasurgError):
    """``lorasurg validate`` found problems; the message lists every one of them."""

    exit_code = 1
