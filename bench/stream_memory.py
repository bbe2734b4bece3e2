"""Peak memory of streaming a ~600 MB checkpoint tensor by tensor, against the ways users load one.

    python bench/stream_memory.py            # generate (once) under bench/.data/, measure, update bench/RESULTS.md

The checkpoint is Llama-shaped (hidden 1024, intermediate 2816, 18 layers, vocab 32000, untied lm_head), bf16,
seeded random weights, in 200 MB shards, written by lorasurg's own writer (whose peak memory is measured too).
Each way of reading runs in a fresh subprocess with one torch thread; every tensor is reduced to its norm (in
bf16, so no up-cast copy), and the sums are compared so all ways are known to read the same data. Peak memory
is the process's high-water resident set (``VmHWM`` from /proc/self/status, which counts mapped file pages a
process touches, as ``ru_maxrss`` does); "above baseline" subtracts the resident set after imports.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / ".data" / "llama-bf16-600mb"
RESULTS = ROOT / "bench" / "RESULTS.md"
SECTION = "## Checkpoint streaming (issue 2)"
SHAPE = dict(hidden=1024, intermediate=2816, layers=18, vocab=32000, heads=16)
MODES = {
    "write": "(writing) lorasurg `write_checkpoint`: make each bf16 tensor, write it",
    "lorasurg": "lorasurg `Checkpoint.get`, one tensor at a time",
    "load_file_each": "safetensors `load_file`, one shard at a time (dropped after use)",
    "load_file_all": "safetensors `load_file` of every shard into one state dict",
    "from_pretrained": "transformers `LlamaForCausalLM.from_pretrained(dtype=bfloat16)`",
}


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def _llama_tensors():
    """(name, shape) of every tensor of the Llama-shaped model, in model order."""
    h, f, v = SHAPE["hidden"], SHAPE["intermediate"], SHAPE["vocab"]
    yield "model.embed_tokens.weight", (v, h)
    for i in range(SHAPE["layers"]):
        p = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield f"{p}.self_attn.{proj}.weight", (h, h)
        yield f"{p}.mlp.gate_proj.weight", (f, h)
        yield f"{p}.mlp.up_proj.weight", (f, h)
        yield f"{p}.mlp.down_proj.weight", (h, f)
        yield f"{p}.input_layernorm.weight", (h,)
        yield f"{p}.post_attention_layernorm.weight", (h,)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (v, h)


def _config() -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": SHAPE["hidden"],
        "intermediate_size": SHAPE["intermediate"], "num_hidden_layers": SHAPE["layers"],
        "num_attention_heads": SHAPE["heads"], "num_key_value_heads": SHAPE["heads"], "vocab_size": SHAPE["vocab"],
        "tie_word_embeddings": False, "dtype": "bfloat16", "max_position_embeddings": 2048,
    }


def _norm(t) -> float:
    """The tensor's norm, computed in its own dtype (an up-cast copy would dominate the memory measured)."""
    return float(t.norm())


def run_mode(mode: str, data: Path) -> dict:
    """Run one way of reading (or the write) in this process; return its measurements."""
    import torch

    torch.set_num_threads(1)
    if mode == "from_pretrained":
        import transformers  # noqa: F401  (imported before the baseline, like the others' libraries)
    from safetensors.torch import load_file

    from lorasurg.io.checkpoint import Checkpoint
    from lorasurg.io.writer import write_checkpoint

    baseline = _status("VmRSS")
    start = time.perf_counter()
    total = 0.0
    shards = sorted(data.glob("model-*.safetensors"))
    if mode == "write":
        gen = torch.Generator().manual_seed(0)

        def tensors():
            for name, shape in _llama_tensors():
                yield name, torch.randn(shape, generator=gen, dtype=torch.bfloat16).mul_(0.02)

        data.parent.mkdir(parents=True, exist_ok=True)
        write_checkpoint(data, tensors(), max_shard_size="200MB", force=True)
        (data / "config.json").write_text(json.dumps(_config(), indent=2))
    elif mode == "lorasurg":
        with Checkpoint.open(data) as ckpt:
            for name in ckpt.names():
                total += _norm(ckpt.get(name))
    elif mode == "load_file_each":
        for shard in shards:
            state = load_file(shard)
            total += sum(_norm(t) for t in state.values())
            del state
    elif mode == "load_file_all":
        state = {}
        for shard in shards:
            state.update(load_file(shard))
        total = sum(_norm(t) for t in state.values())
    elif mode == "from_pretrained":
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(data, dtype=torch.bfloat16)
        total = sum(_norm(p) for p in model.state_dict().values())
    else:
        raise SystemExit(f"unknown mode {mode}")
    return {
        "mode": mode, "seconds": time.perf_counter() - start, "baseline": baseline, "peak": _status("VmHWM"),
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "checksum": total,
    }


def _measure(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--mode", mode], cwd=ROOT, check=True, capture_output=True, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def _cpu_name() -> str:
    found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    return found.group(1).strip() if found else platform.machine()


def _table(rows: list[dict], ckpt_bytes: int, largest: int, shards: int) -> str:
    mb = 1e6
    lines = [
        SECTION,
        "",
        f"Streaming every tensor of a {ckpt_bytes / mb:.0f} MB bf16 Llama-shaped checkpoint ({shards} safetensors "
        f"shards; largest tensor {largest / mb:.1f} MB) and reducing each to its norm. Peak = VmHWM of a fresh "
        "process; above baseline = peak minus the resident set after imports (torch + the reader). "
        f"Machine: {os.cpu_count()} cores, CPU only ({_cpu_name()}), "
        f"Python {platform.python_version()}, torch {__import__('torch').__version__}, 1 torch thread. "
        "Made by `python bench/stream_memory.py`.",
        "",
        "| way of reading | peak RSS (MB) | above baseline (MB) | / largest tensor | / checkpoint | seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        above = row["peak"] - row["baseline"]
        lines.append(
            f"| {MODES[row['mode']]} | {row['peak'] / mb:.0f} | {above / mb:.0f} | {above / largest:.2f} | "
            f"{above / ckpt_bytes:.2f} | {row['seconds']:.1f} |"
        )
    lines += [
        "",
        "The writing row was measured when the checkpoint was generated (200 MB shards). "
        "All reading ways printed the same checksum (sum of norms). Page-cache pages are not counted in RSS unless a "
        "process maps them, which is why mmap-based loaders (safetensors `load_file`, from_pretrained) show the "
        "shards they touch while `Checkpoint.get` (pread into fresh memory) shows about one tensor.",
        "",
    ]
    return "\n".join(lines)


def _update_results(section: str) -> None:
    """Replace this benchmark's section of bench/RESULTS.md (or append it), leaving other sections alone."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + (text[end + 1 :] if end >= 0 else "")
    RESULTS.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=sorted(MODES), help="run one measurement in this process (internal)")
    parser.add_argument("--skip", nargs="*", default=[], help="modes to leave out")
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, DATA)))
        return
    written = DATA / "write-measurement.json"  # the write row, kept with the data it made
    if not (DATA / "model.safetensors.index.json").is_file() or not written.is_file():
        written.parent.mkdir(parents=True, exist_ok=True)
        row = _measure("write")
        written.write_text(json.dumps(row))
    rows = [json.loads(written.read_text())]
    for mode in ("lorasurg", "load_file_each", "load_file_all", "from_pretrained"):
        if mode not in args.skip:
            rows.append(_measure(mode))
            print(f"{mode}: peak {rows[-1]['peak'] / 1e6:.0f} MB, {rows[-1]['seconds']:.1f} s", file=sys.stderr)
    sums = [r["checksum"] for r in rows if r["mode"] != "write"]
    if max(sums) - min(sums) > 1e-9 * abs(max(sums)):
        raise SystemExit(f"the ways of reading disagree on the data: checksums {sums}")
    import torch

    sizes = [torch.Size(s).numel() * 2 for _, s in _llama_tensors()]
    section = _table(rows, sum(sizes), max(sizes), len(list(DATA.glob("model-*.safetensors"))))
    _update_results(section)
    print(section)


if __name__ == "__main__":
    main()
