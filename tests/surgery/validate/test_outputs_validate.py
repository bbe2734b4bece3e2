"""Every adapter a lorasurg command writes validates with no error and no warning against its base.

``WRITERS`` lists one entry per (command, interesting option set): a function that writes an adapter into the
directory it is given and returns the base model to validate against. Add an entry when a command that writes
adapters lands (residualize, convert, rerank, merge, fuse, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from lorasurg import extract_to_dir, validate

ROOT = Path(__file__).resolve().parents[3]


def _pair(arch: str) -> tuple[Path, Path]:
    return ROOT / "fixtures" / f"tiny-{arch}" / "base", ROOT / "fixtures" / f"tiny-{arch}" / "tuned"


def _extract(arch: str, **options) -> Callable[[Path], Path]:
    def write(out: Path) -> Path:
        base, tuned = _pair(arch)
        extract_to_dir(base, tuned, out, device="cpu", **options)
        return base

    return write


WRITERS: dict[str, Callable[[Path], Path]] = {
    "extract-llama-r8": _extract("llama", r=8),
    "extract-llama-r64-clamped": _extract("llama", r=64, embeddings="full"),
    "extract-qwen2-energy-bias": _extract("qwen2", r=32, rank_policy="energy:0.9"),
    "extract-qwen2-serving": _extract("qwen2", r=4, serving=True),
    "extract-gpt2-conv1d": _extract("gpt2", r=4),
    "extract-gpt2-embeddings-skip": _extract("gpt2", r=4, embeddings="skip", lora_bias=False),
}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_written_adapter_validates_clean(tmp_path, name):
    base = WRITERS[name](tmp_path / name)
    findings = validate(tmp_path / name, base)
    assert [(f.code, f.where, f.message) for f in findings] == []
