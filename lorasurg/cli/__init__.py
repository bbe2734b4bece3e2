"""The ``lorasurg`` command line: a thin table of library calls.

Each command lives in its own module here: it parses its options, calls one function of
:mod:`lorasurg.surgery`, and prints the report that function returns (``render()``, or ``to_dict()`` as JSON
with ``--json``). :mod:`._app` holds the group, the shared options and the error handling: a
:class:`~lorasurg.errors.LorasurgError` becomes a one-paragraph message on stderr and the error's exit code
(2 for bad input or usage, 1 for validation findings); no traceback reaches the user for a bad input.
"""

from __future__ import annotations

from . import (  # noqa: F401  (each module registers its command on ``main``)
    convert, extract, fuse, inspect, merge, rerank, residualize, validate,
)
from ._app import main

__all__ = ["main"]
