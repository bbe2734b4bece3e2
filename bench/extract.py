"""Benchmark: ``lorasurg extract`` against ``mergekit-extract-lora`` on the same realistic pairs.

Pairs (generated once under bench/.data/, git-ignored, reused when present):

* ``llama``: Llama-shaped (hidden 2048, intermediate 5632, 32 heads / 4 KV heads, 4 layers, vocab 32000, untied),
  bf16, about 600 MB per checkpoint, two shards;
* ``qwen2``: Qwen2-shaped (same sizes, 4 layers, tied embeddings, q/k/v biases), bf16, about 600 MB per
  checkpoint.

``tuned = base + delta``: every linear weight (and the embedding) gains ``G1 diag(s) G2^T`` with Gaussian
``G1, G2`` and a power-law spectrum ``s_i ~ (i + 1) ** -0.5`` over the full rank (slow decay: the hard case for
randomized SVD), scaled to 5% of the weight's norm; norms change by 1% noise; Qwen2's q/k/v biases change.

Both tools run in their own subprocess, one after the other (``--repeats`` times each, alternating which goes first;
the median wall time is reported), with the same thread count (``--threads``, default
2: ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``), at the same rank, with their defaults otherwise. Measured: wall time,
peak RSS of the subprocess (``resource.getrusage(RUSAGE_CHILDREN)`` in a wrapper process), per-module Frobenius
error relative to the optimal (Eckart-Young, exact SVD in float64) on a sample of modules, and whether PEFT
loads each adapter cleanly (the keys in the file vs the keys PEFT expects for its config).

    python bench/extract.py                  # generate if needed, run, print, append to bench/RESULTS.md
    python bench/extract.py --pairs llama --r 16 --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from safetensors import safe_open

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # lorasurg from this checkout, for the error and load checks
from lorasurg.io.writer import ShardedWriter  # noqa: E402
DATA = HERE / ".data"
MERGEKIT = HERE / ".venv-mergekit" / "bin" / "mergekit-extract-lora"
RESULTS = HERE / "RESULTS.md"
SECTION = "## Extract vs mergekit-extract-lora (issue 4)"

PAIRS = {
    "llama": dict(arch="LlamaForCausalLM", layers=4, tied=False, biases=False),
    "qwen2": dict(arch="Qwen2ForCausalLM", layers=4, tied=True, biases=True),
}


# --------------------------------------------------------------------------------------------- generation
def _config(name: str):
    from transformers import LlamaConfig, Qwen2Config

    spec = PAIRS[name]
    common = dict(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=spec["layers"],
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
        tie_word_embeddings=spec["tied"], bos_token_id=1, eos_token_id=2, dtype="bfloat16",
    )
    cfg = (Qwen2Config if name == "qwen2" else LlamaConfig)(**common)
    cfg.architectures = [spec["arch"]]
    return cfg


def _power_law_delta(out_f: int, in_f: int, norm: float, gen: torch.Generator) -> torch.Tensor:
    """``G1 diag(s) G2^T`` (float32, (out, in)) with ``s_i = (i + 1) ** -0.5``, scaled to Frobenius norm ``norm``."""
    k = min(out_f, in_f)
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -0.5
    g1 = torch.randn(out_f, k, generator=gen) / out_f**0.5  # (out, k)
    g2 = torch.randn(in_f, k, generator=gen) / in_f**0.5  # (in, k)
    delta = (g1 * s) @ g2.T  # (out, k) * (k,) @ (k, in) -> (out, in)
    return delta * (norm / float(torch.linalg.vector_norm(delta)))


def generate(name: str, *, shard_bytes: int = 320 * 2**20) -> tuple[Path, Path]:
    """Write bench/.data/<name>/{base,tuned} unless both exist; returns their paths."""
    from transformers import AutoModelForCausalLM

    root = DATA / name
    base_dir, tuned_dir = root / "base", root / "tuned"
    if (base_dir / "config.json").is_file() and (tuned_dir / "config.json").is_file():
        return base_dir, tuned_dir
    shutil.rmtree(root, ignore_errors=True)
    cfg = _config(name)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg)
    params = [(n, tuple(p.shape)) for n, p in meta.named_parameters()]  # tied duplicates removed
    gen = torch.Generator().manual_seed(0)
    for directory in (base_dir, tuned_dir):
        directory.mkdir(parents=True)
    writers = {d: ShardedWriter(d, max_shard_size=shard_bytes) for d in (base_dir, tuned_dir)}
    t0 = time.time()
    for pname, shape in params:
        if pname.endswith("norm.weight"):
            w = torch.ones(shape) + 0.02 * torch.randn(shape, generator=gen)
            d = 0.01 * torch.randn(shape, generator=gen)
        elif pname.endswith(".bias"):
            w = 0.02 * torch.randn(shape, generator=gen)
            d = 0.01 * torch.randn(shape, generator=gen)
        else:
            w = 0.02 * torch.randn(shape, generator=gen)
            d = _power_law_delta(shape[0], shape[1], 0.05 * float(torch.linalg.vector_norm(w)), gen)
        writers[base_dir].add(pname, w.to(torch.bfloat16))
        writers[tuned_dir].add(pname, (w + d).to(torch.bfloat16))
    for directory, writer in writers.items():
        writer.finish()
        cfg.save_pretrained(directory)
    print(f"generated {root} in {time.time() - t0:.0f} s", file=sys.stderr)
    return base_dir, tuned_dir


# --------------------------------------------------------------------------------------------- running
_WRAPPER = (
    "import resource, subprocess, sys, time\n"
    "t = time.perf_counter(); rc = subprocess.call(sys.argv[1:]); wall = time.perf_counter() - t\n"
    "print('BENCH', rc, wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
)


def run_measured(cmd: list[str], threads: int, log: Path) -> dict:
    """Run ``cmd`` in a wrapper process; returns wall seconds, peak RSS bytes, exit code."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TQDM_DISABLE="1",
               PYTHONPATH=str(ROOT))
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], env=env, stdout=fh, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT)
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("BENCH ")][-1].split()
    with open(log, "a") as fh:
        fh.write(proc.stderr)
    return {"rc": int(line[1]), "wall_s": float(line[2]), "peak_rss": int(line[3]) * 1024}


def _adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def module_errors(base: Path, tuned: Path, adapter: Path, modules: list[str]) -> dict[str, dict]:
    """Per sampled module: rank, ``||dW - s B A||_F`` and the optimal rank-r error (exact SVD, float64)."""
    from lorasurg.io.checkpoint import Checkpoint

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    tensors = _adapter_tensors(adapter)
    b, t = Checkpoint.open(base), Checkpoint.open(tuned)
    out = {}
    for m in modules:
        key = f"base_model.model.{m}"
        if f"{key}.lora_A.weight" not in tensors:
            out[m] = None
            continue
        A = tensors[f"{key}.lora_A.weight"].to(torch.float64)  # (r, in)
        B = tensors[f"{key}.lora_B.weight"].to(torch.float64)  # (out, r)
        r = A.shape[0]
        alpha = next((v for k, v in cfg.get("alpha_pattern", {}).items() if k.lstrip("^").replace("\\", "") == m),
                     cfg["lora_alpha"])
        scale = alpha / (r**0.5 if cfg.get("use_rslora") else r)
        dW = t.get(f"{m}.weight", dtype=torch.float64) - b.get(f"{m}.weight", dtype=torch.float64)  # (out, in)
        S = torch.linalg.svdvals(dW)
        optimal = float(S[r:].pow(2).sum().sqrt())
        error = float(torch.linalg.vector_norm(dW - scale * (B @ A)))  # (out, r) @ (r, in)
        out[m] = {"rank": r, "error": error, "optimal": optimal, "ratio": error / optimal if optimal else float("nan")}
    return out


def peft_load_check(base: Path, adapter: Path) -> dict:
    """Load ``adapter`` onto ``base`` with PEFT; compare the file's keys with the keys PEFT expects."""
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(model, adapter)
    expected = set(get_peft_model_state_dict(pm, save_embedding_layers=False).keys())
    stored = set(_adapter_tensors(adapter))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    messages = sorted({str(w.message).split("\n")[0][:160] for w in caught if "deprecated" not in str(w.message)})
    del pm, model
    return {
        "missing": sorted(expected - stored),
        "unexpected": sorted(stored - expected),
        "lora_bias_in_config": bool(cfg.get("lora_bias")),
        "lora_B_bias_tensors": sum(k.endswith("lora_B.bias") for k in stored),
        "warnings": messages,
        "clean": not (expected - stored) and not (stored - expected),
    }


def _sample_modules(pair: str) -> list[str]:
    last = PAIRS[pair]["layers"] - 1
    names = []
    for i in sorted({0, last}):
        names += [f"model.layers.{i}.self_attn.q_proj", f"model.layers.{i}.self_attn.k_proj",
                  f"model.layers.{i}.mlp.down_proj"]
    return names


def bench_pair(pair: str, r: int, threads: int, work: Path, repeats: int = 1) -> dict:
    base, tuned = generate(pair)
    outs = {"lorasurg": work / f"{pair}-lorasurg", "mergekit": work / f"{pair}-mergekit"}
    cmds = {
        "lorasurg": [sys.executable, "-m", "lorasurg.cli", "extract", str(base), str(tuned), "-o",
                     str(outs["lorasurg"]), "--r", str(r), "--device", "cpu", "--json", "--force"],
        "mergekit": [str(MERGEKIT), "--model", str(tuned), "--base-model", str(base), "--out-path",
                     str(outs["mergekit"]), "--max-rank", str(r)],
    }
    result: dict = {"pair": pair, "r": r, "threads": threads, "checkpoint_bytes": _dir_bytes(base)}
    runs: dict[str, list[dict]] = {tool: [] for tool in cmds}
    for i in range(repeats):
        order = list(cmds) if i % 2 == 0 else list(reversed(cmds))  # alternate who goes first
        for tool in order:
            shutil.rmtree(outs[tool], ignore_errors=True)
            print(f"[{pair}] running {tool} ({i + 1}/{repeats}) ...", file=sys.stderr)
            runs[tool].append(run_measured(cmds[tool], threads, work / f"{pair}-{tool}.log"))
    for tool in cmds:
        walls = sorted(run["wall_s"] for run in runs[tool])
        result[tool] = {
            "rc": max(run["rc"] for run in runs[tool]),
            "wall_s": walls[len(walls) // 2],  # median (upper for an even count)
            "walls": walls,
            "peak_rss": max(run["peak_rss"] for run in runs[tool]),
            "adapter_bytes": _dir_bytes(outs[tool]) if outs[tool].exists() else 0,
        }
    for tool, out in outs.items():
        if result[tool]["rc"] == 0:
            result[tool]["errors"] = module_errors(base, tuned, out, _sample_modules(pair))
            result[tool]["peft"] = peft_load_check(base, out)
    return result


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------- reporting
def _max_ratio(res: dict) -> float:
    ratios = [e["ratio"] for e in (res.get("errors") or {}).values() if e]
    return max(ratios) if ratios else float("nan")


def render(results: list[dict], threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        SECTION, "",
        f"Machine: {os.cpu_count()} CPU cores ({cpu}), no GPU; torch {torch.__version__}; both tools limited to "
        f"{threads} threads; run {time.strftime('%Y-%m-%d')} with `python bench/extract.py`. mergekit 0.1.5 in "
        "bench/.venv-mergekit (see bench/README.md). Each tool with its defaults at the same rank. Wall time: median "
        "of the runs (the tools alternate which goes first); peak RSS: the largest of the runs.", "",
        "| pair | r | speed (mergekit wall / lorasurg wall) | peak RSS (lorasurg / mergekit) | error / optimal, "
        "lorasurg (max over sample) | error / optimal, mergekit | PEFT loads lorasurg cleanly | PEFT loads mergekit "
        "cleanly |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        ls, mk = res["lorasurg"], res["mergekit"]
        speed = mk["wall_s"] / ls["wall_s"]
        mem = ls["peak_rss"] / mk["peak_rss"]
        lines.append(
            f"| {res['pair']} ({res['checkpoint_bytes'] / 1e6:.0f} MB/ckpt) | {res['r']} | {speed:.1f}x "
            f"({ls['wall_s']:.1f} s vs {mk['wall_s']:.1f} s) | {mem:.2f} ({ls['peak_rss'] / 2**20:.0f} MiB vs "
            f"{mk['peak_rss'] / 2**20:.0f} MiB) | {_max_ratio(ls):.4f} | {_max_ratio(mk):.4f} | "
            f"{_peft_cell(ls)} | {_peft_cell(mk)} |"
        )
    lines += ["", "Wall times of every run: " + "; ".join(
        f"{r['pair']}: lorasurg {', '.join(f'{w:.1f}' for w in r['lorasurg']['walls'])} s, mergekit "
        f"{', '.join(f'{w:.1f}' for w in r['mergekit']['walls'])} s" for r in results) + "."]
    lines += ["", "Adapter sizes: " + "; ".join(
        f"{r['pair']}: lorasurg {r['lorasurg']['adapter_bytes'] / 1e6:.0f} MB, mergekit "
        f"{r['mergekit']['adapter_bytes'] / 1e6:.0f} MB" for r in results) + ".", ""]
    for res in results:
        mk = res["mergekit"].get("peft") or {}
        if mk.get("lora_B_bias_tensors") and not mk.get("lora_bias_in_config"):
            lines.append(
                f"{res['pair']}: mergekit wrote {mk['lora_B_bias_tensors']} `lora_B.bias` tensors without "
                "`lora_bias: true` in its config, so PEFT drops them on load (the bias deltas are lost); "
                f"{len(mk['unexpected'])} unexpected keys."
            )
    return "\n".join(lines) + "\n"


def _peft_cell(res: dict) -> str:
    p = res.get("peft")
    if p is None:
        return "run failed"
    if p["clean"]:
        return "yes"
    return f"no ({len(p['missing'])} missing, {len(p['unexpected'])} unexpected keys)"


def write_results(text: str, section: str = SECTION) -> None:
    """Replace ``section`` of bench/RESULTS.md (or append it)."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if section in old:
        start = old.index(section)
        nxt = old.find("\n## ", start + len(section))
        old = old[:start].rstrip("\n") + "\n" + (old[nxt:] if nxt != -1 else "")
    RESULTS.write_text(old.rstrip("\n") + "\n\n" + text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each tool, alternating; median wall time")
    parser.add_argument("--generate-only", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print, do not touch bench/RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.generate_only:
        for pair in args.pairs:
            print(generate(pair))
        return 0
    if not MERGEKIT.exists():
        print(f"{MERGEKIT} is missing; install mergekit as bench/README.md says", file=sys.stderr)
        return 2
    results = []
    work = DATA / "runs"  # adapters and logs of the last run, kept for inspection
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for pair in args.pairs:
        results.append(bench_pair(pair, args.r, args.threads, work, args.repeats))
        (work / f"result-{pair}.json").write_text(json.dumps(results[-1], indent=2))
    text = render(results, args.threads)
    print(text)
    if not args.no_write:
        write_results(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
