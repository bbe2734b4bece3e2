"""lorasurg: offline LoRA adapter surgery and runtime, in Hugging Face PEFT's format.

The public API is what ``__all__`` lists; everything else is internal.
"""

import gc as _gc
import sys as _sys


def _quiet_interrupt(interrupt: BaseException) -> None:
    """Ctrl-C while this package imports (torch: the first second or two of every ``lorasurg`` command): if nothing
    catches ``interrupt``, print one line instead of the import machinery's traceback; any other uncaught exception
    is shown as before."""
    previous = _sys.excepthook

    def hook(kind, value, traceback) -> None:
        if value is interrupt:
            _sys.stderr.write("interrupted while starting: nothing was written\n")
        else:
            previous(kind, value, traceback)

    _sys.excepthook = hook


# Importing torch and this package creates about 180,000 objects that the collector tracks; every full collection
# that runs meanwhile traverses all of them (about 0.1 s each on a laptop-class CPU). None of them is garbage, so the collector is paused for the
# import and restored as it was.
_collecting = _gc.isenabled()
_gc.disable()
try:
    from .config import LoraConfig, TaskType
    from .errors import (
        ConfigError,
        ConfigTypeError,
        InputError,
        LorasurgError,
        LorasurgWarning,
        OutputError,
        OutputExistsError,
        ShapeMismatchError,
        UnsupportedError,
        ValidationFailed,
    )

    from .io.adapter import Adapter, AdapterModule
    from .io.checkpoint import Checkpoint
    from .io.writer import write_checkpoint
    from .runtime import (
        ParameterCount,
        delete_adapter,
        disable_adapters,
        inject,
        load_adapter,
        merge_adapter,
        merge_and_unload,
        save_adapter,
        set_adapter,
        trainable_parameters,
        unload,
        unmerge_adapter,
    )
    from .engine.factors import LoraFactors, lora_scale
    from .engine.init import init_factors
    from .engine.ranks import RankPolicy, parse_rank_policy
    from .engine.svd import decompose, truncated_svd
    from .surgery.budget import MemoryBudget, parse_size
    from .modules import ModuleInfo, describe_model
    from .consumers import ConsumerFinding, ForReport, consumer_delta, consumer_findings, prepare_for
    from .surgery.convert import ConvertReport, convert, convert_to_dir
    from .surgery.export import ExportReport, export_gguf
    from .surgery.extract import ExtractReport, extract, extract_to_dir
    from .surgery.fuse import FuseReport, fuse
    from .surgery.residualize import ResidualizeReport, residualize
    from .surgery.inspect import inspect_adapter
    from .surgery.validate import ValidationReport, validate, validate_adapter
    from .findings import Finding
    from .surgery.merge import MergeReport, merge_adapters, merge_to_dir
    from .surgery.rerank import RerankReport, rerank, rerank_to_dir
    from .targeting import (
        anchored_pattern_key,
        exact_target_modules,
        is_module_to_save,
        pattern_key,
        rank_alpha,
        select_modules,
    )
except KeyboardInterrupt as _interrupt:
    _quiet_interrupt(_interrupt)
    raise
finally:
    if _collecting:
        _gc.enable()
    del _collecting

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "LoraConfig",
    "TaskType",
    "Adapter",
    "AdapterModule",
    "Checkpoint",
    "write_checkpoint",
    "inspect_adapter",
    "validate",
    "validate_adapter",
    "ValidationReport",
    "Finding",
    "extract",
    "extract_to_dir",
    "ExtractReport",
    "MemoryBudget",
    "parse_size",
    "prepare_for",
    "export_gguf",
    "ExportReport",
    "ForReport",
    "consumer_delta",
    "consumer_findings",
    "ConsumerFinding",
    "rerank",
    "rerank_to_dir",
    "RerankReport",
    "merge_adapters",
    "merge_to_dir",
    "MergeReport",
    "residualize",
    "ResidualizeReport",
    "convert",
    "convert_to_dir",
    "ConvertReport",
    "fuse",
    "FuseReport",
    "LoraFactors",
    "lora_scale",
    "truncated_svd",
    "decompose",
    "parse_rank_policy",
    "RankPolicy",
    "init_factors",
    "ModuleInfo",
    "describe_model",
    "inject",
    "load_adapter",
    "save_adapter",
    "set_adapter",
    "disable_adapters",
    "delete_adapter",
    "merge_adapter",
    "unmerge_adapter",
    "merge_and_unload",
    "unload",
    "trainable_parameters",
    "ParameterCount",
    "select_modules",
    "rank_alpha",
    "pattern_key",
    "anchored_pattern_key",
    "exact_target_modules",
    "is_module_to_save",
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
]
