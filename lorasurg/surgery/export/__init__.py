"""``lorasurg export``: an adapter in another file format. ``--to gguf``: a llama.cpp GGUF LoRA file (:mod:`.run`)."""

from .report import ExportReport, GgufPair
from .run import CONSUMER, default_gguf_path, export_gguf

__all__ = ["ExportReport", "GgufPair", "CONSUMER", "export_gguf", "default_gguf_path"]
