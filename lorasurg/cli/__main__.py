"""``python -m lorasurg.cli``: the same as the ``lorasurg`` command."""

import sys

from . import run

if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
