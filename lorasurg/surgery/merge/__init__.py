"""``lorasurg merge``: several adapters into one (every PEFT combination type), on the adapter files alone.

:mod:`.run` has the operation and its conventions, :mod:`.checks` what it refuses, :mod:`.report` what it reports;
the math is :mod:`lorasurg.engine.combine`.
"""

from .report import InputSummary, MergeReport, ModuleMerge
from .run import default_merge_path, merge_adapters, merge_to_dir

__all__ = ["merge_adapters", "merge_to_dir", "default_merge_path", "MergeReport", "ModuleMerge", "InputSummary"]
