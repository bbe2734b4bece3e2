"""Every failure lorasurg reports to a user is one of these exceptions.

Each message says what is wrong, where (file, tensor key, module name, shapes) and what to do about it.
The CLI turns a :class:`LorasurgError` into a one-paragraph message and its ``exit_code``; no traceback
reaches a user for a bad input.

Exit codes (``lorasurg`` CLI): 0 ok, 1 validation findings, 2 usage or input error.

A message names an option the way its reader types it: :func:`option` marks ``--force`` / ``force=True`` in the
text, ``str(err)`` gives the library's form with the flag (``--force (force=True)``), and
:meth:`LorasurgError.cli_message` the command line's alone (``--force``).
"""

from __future__ import annotations

import re

__all__ = [
    "LorasurgError",
    "InputError",
    "ConfigError",
    "ConfigTypeError",
    "ShapeMismatchError",
    "OutputError",
    "OutputExistsError",
    "UnsupportedError",
    "ValidationFailed",
    "LorasurgWarning",
    "option",
]

# An option in a message: _OPEN cli _SEP api _CLOSE (private-use characters, never in a user's text).
_OPEN, _SEP, _CLOSE = "\ue000", "\ue001", "\ue002"
_MARKED = re.compile(f"{_OPEN}([^{_SEP}]*){_SEP}([^{_CLOSE}]*){_CLOSE}")


def option(cli: str, api: str) -> str:
    """An option named in an error message: ``option("--force", "force=True")``.

    The command line shows ``--force``, the library ``--force (force=True)`` (see :meth:`LorasurgError.cli_message`).
    """
    return f"{_OPEN}{cli}{_SEP}{api}{_CLOSE}"


class LorasurgError(Exception):
    """Base class of every error lorasurg raises on purpose.

    Attributes:
        exit_code: the process exit status the CLI uses for this error.
    """

    exit_code: int = 2

    def __str__(self) -> str:
        return _MARKED.sub(r"\1 (\2)", super().__str__())

    def cli_message(self) -> str:
        """The message as the command line shows it: options by their flags only."""
        return _MARKED.sub(r"\1", super().__str__())


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


class OutputError(LorasurgError):
    """An output cannot be written: its directory cannot be created or written to, the disk is full, a file
    would pass the process's file-size limit. The message names the output, the file and the numbers."""


class OutputExistsError(OutputError):
    """The output path exists and is not empty; pass ``force=True`` (``--force``) to replace it."""


class UnsupportedError(LorasurgError, NotImplementedError):
    """A valid request that lorasurg does not implement (yet); the message says what to use instead."""


class ValidationFailed(LorasurgError):
    """``lorasurg validate`` found problems; the message lists every one of them."""

    exit_code = 1


class LorasurgWarning(UserWarning):
    """Something lorasurg did on its own that the user should know about (e.g. it removed a temporary directory a
    killed run left behind); the CLI prints it as one ``warning:`` line."""
