"""Where llama.cpp's own ``convert_lora_to_gguf.py`` accepts an adapter, it and ``lorasurg export --to gguf`` write
the same pairs: the same tensor names and, after llama.cpp's scale rule, the same deltas (bit for bit for f32: both
permute Llama's q/k rows and stack experts the same way, and with one rank and alpha there is nothing to rescale).

Runs only where a llama.cpp source tree is given (``LORASURG_LLAMA_CPP=/path/to/llama.cpp``, holding
``convert_lora_to_gguf.py``, ``convert_hf_to_gguf.py``, ``conversion/`` and ``gguf-py/``; e.g. the ``vendor/llama.cpp``
of the llama-cpp-python sdist). The converter is run as a separate process and is never a dependency.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorasurg import export_gguf
from tests.surgery.gguf_helpers import FIXTURES, build_base, gguf_deltas, read_gguf, random_adapter

LLAMA_CPP = os.environ.get("LORASURG_LLAMA_CPP")
pytestmark = pytest.mark.skipif(
    not LLAMA_CPP or not (Path(LLAMA_CPP) / "convert_lora_to_gguf.py").is_file(),
    reason="set LORASURG_LLAMA_CPP to a llama.cpp source tree to compare with its convert_lora_to_gguf.py",
)


def convert(adapter_dir: Path, base: Path, out: Path) -> None:
    result = subprocess.run([sys.executable, str(Path(LLAMA_CPP) / "convert_lora_to_gguf.py"), str(adapter_dir),
                             "--base", str(base), "--outfile", str(out), "--outtype", "f32"],
                            capture_output=True, text=True, cwd=out.parent)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "phi3", "qwen3moe"])
def test_same_pairs_as_llama_cpps_converter(tmp_path, arch):
    base = FIXTURES.get(arch) or build_base(arch, tmp_path / "base")
    adapter = random_adapter(base, r=4, mixed=False, targets=[
        "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj"])
    adapter.save(tmp_path / "adapter")
    convert(tmp_path / "adapter", base, tmp_path / "theirs.gguf")
    export_gguf(tmp_path / "adapter", tmp_path / "ours.gguf", base=base)
    meta_t, theirs = read_gguf(tmp_path / "theirs.gguf")
    meta_o, ours = read_gguf(tmp_path / "ours.gguf")
    assert sorted(ours) == sorted(theirs)
    for key in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha"):
        assert meta_o[key][0] == meta_t[key][0], key
    for name in ours:
        assert ours[name].shape == theirs[name].shape and bool((ours[name] == theirs[name]).all()), name
    assert gguf_deltas(tmp_path / "ours.gguf")[1].keys() == gguf_deltas(tmp_path / "theirs.gguf")[1].keys()
