"""The ``lorasurg`` command line: a thin table of library calls.

Each command lives in its own module here: it parses its options, calls one function of
:mod:`lorasurg.surgery`, and prints the report that function returns (``render()``, or ``to_dict()`` as JSON
with ``--json``). :mod:`._app` holds the group, the shared options and the error handling: a
:class:`~lorasurg.errors.LorasurgError` becomes a one-paragraph message on stderr and the error's exit code
(2 for bad input or usage, 1 for validation findings); no traceback reaches the user for a bad input.
"""

from __future__ import annotations

from . import (  # noqa: F401  (each module registers its command on ``main``)
    convert, export, extract, fuse, inspect, merge, rerank, residualize, validate,
)
from ._app import ignore_signals, main

__all__ = ["main", "run"]


def run() -> None:
    """The ``lorasurg`` console script: :func:`main` after freezing the garbage collector's view of the start-up.

    What torch and lorasurg created on import lives until the process exits; ``gc.freeze()`` moves it out of the
    collector's generations, so the full collections a command triggers (extract allocates tensors by the
    thousand) no longer traverse the ~180,000 start-up objects (0.1 s) each time: 0.3-0.7 s of a 4 s extract of a 600 MB pair.
    Only the console script does this; :func:`main` called from Python (tests, ``CliRunner``) leaves the collector
    alone. Once the command is over, Ctrl-C and SIGTERM are ignored (:func:`ignore_signals`): the process is
    exiting, and a signal during the interpreter's shutdown would only print a traceback.
    """
    import gc

    gc.freeze()
    try:
        main()
    finally:
        ignore_signals()
