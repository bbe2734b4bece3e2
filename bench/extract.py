"""Benchmark: ``lorasurg extract`` against the I/O floor and ``mergekit-extract-lora`` on the same realistic pairs.

Pairs (generated once under bench/.data/, git-ignored, reused when present):

* ``llama``: Llama-shaped (hidden 2048, intermediate 5632, 32 heads / 4 KV heads, 4 layers, vocab 32000, untied),
  bf16, about 600 MB per checkpoint, two shards;
* ``qwen2``: Qwen2-shaped (same sizes, 4 layers, tied embeddings, q/k/v biases), bf16, about 600 MB per
  checkpoint.

``tuned = base + delta``: every linear weight (and the embedding) gains ``G1 diag(s) G2^T`` with Gaussian
``G1, G2`` and a power-law spectrum ``s_i ~ (i + 1) ** -0.5`` over the full rank (slow decay: the hard case for
randomized SVD), scaled to 5% of the weight's norm; norms change by 1% noise; Qwen2's q/k/v biases change.

Tools, each in its own subprocess with the same thread count (``--threads``, default 2: ``OMP_NUM_THREADS``/
``MKL_NUM_THREADS``), in rounds that rotate which goes first (so load from other processes hits all alike):

* ``floor``: a read-only ``python -c`` that imports torch and reads every tensor of both checkpoints once with
  safetensors (what any tool must at least do); ``--repeats`` runs;
* ``lorasurg``: ``lorasurg extract`` with the default memory budget; ``--repeats`` runs;
* ``lorasurg-400MB``: the same with ``--max-memory 400MB``; ``--repeats`` runs;
* ``mergekit``: ``mergekit-extract-lora`` with its defaults; ``--mergekit-repeats`` runs (it takes about a minute).

Measured: wall time (median of the runs) and peak RSS (largest of the runs; ``ru_maxrss`` of the subprocess via a
wrapper process), the 1-minute load average before each run, per-module Frobenius error relative to the optimal
(Eckart-Young, exact SVD in float64) on every module of lorasurg's adapters and a sample of mergekit's, and
whether PEFT loads each adapter cleanly (the keys in the file vs the keys PEFT expects for its config).

    python bench/extract.py                  # generate if needed, run, print, update bench/RESULTS.md
    python bench/extract.py --pairs llama --repeats 5 --mergekit-repeats 3 --no-write
    python bench/extract.py --device cuda    # also time lorasurg with --device cuda (skipped without CUDA)
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
SECTION = "## Extract vs the I/O floor and mergekit-extract-lora (issues 4, 12)"
#: The floor: import torch and read every tensor of both checkpoints once, as any tool must.
FLOOR = (
    "import sys, pathlib, torch\n"
    "from safetensors import safe_open\n"
    "n = 0\n"
    "for d in sys.argv[1:]:\n"
    "    for f in sorted(pathlib.Path(d).glob('*.safetensors')):\n"
    "        with safe_open(str(f), 'pt') as h:\n"
    "            for k in h.keys():\n"
    "                n += h.get_tensor(k).numel()\n"
    "print(n)\n"
)

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
    "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "print('BENCH', rc, wall, u.ru_utime + u.ru_stime, u.ru_maxrss, file=sys.stderr)\n"
)


def bench_env(threads: int) -> dict:
    """The environment every measured process runs in: ``threads`` OpenMP/MKL threads, no progress bars, this
    checkout's lorasurg."""
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TQDM_DISABLE="1",
                PYTHONPATH=str(ROOT))


def run_measured(cmd: list[str], threads: int, log: Path) -> dict:
    """Run ``cmd`` in a wrapper process: exit code, wall seconds, CPU seconds (user + system), peak RSS bytes."""
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], env=bench_env(threads), stdout=fh,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT)
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("BENCH ")][-1].split()
    with open(log, "a") as fh:
        fh.write(proc.stderr)
    return {"rc": int(line[1]), "wall_s": float(line[2]), "cpu_s": float(line[3]), "peak_rss": int(line[4]) * 1024}


def _adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def module_errors(base: Path, tuned: Path, adapter: Path, modules: list[str], optimal_cache: dict) -> dict[str, dict]:
    """Per module: rank, ``||dW - s B A||_F`` and the optimal rank-r error (exact SVD in float64, cached).

    Embeddings (``lora_embedding_A: (r, num)``, ``lora_embedding_B: (dim, r)``) are compared in their matrix view
    ``dW.T: (dim, num)``.
    """
    from lorasurg.io.checkpoint import Checkpoint

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    tensors = _adapter_tensors(adapter)
    b, t = Checkpoint.open(base), Checkpoint.open(tuned)
    out = {}
    for m in modules:
        key = f"base_model.model.{m}"
        if f"{key}.lora_A.weight" in tensors:
            A, B, embedding = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"], False
        elif f"{key}.lora_embedding_A" in tensors:
            A, B, embedding = tensors[f"{key}.lora_embedding_A"], tensors[f"{key}.lora_embedding_B"], True
        else:
            out[m] = None
            continue
        A, B = A.to(torch.float64), B.to(torch.float64)  # (r, in), (out, r)
        r = A.shape[0]
        alpha = next((v for k, v in cfg.get("alpha_pattern", {}).items() if k.lstrip("^").replace("\\", "") == m),
                     cfg["lora_alpha"])
        scale = alpha / (r**0.5 if cfg.get("use_rslora") else r)
        dW = t.get(f"{m}.weight", dtype=torch.float64) - b.get(f"{m}.weight", dtype=torch.float64)
        if embedding:
            dW = dW.T  # (num, dim) -> the matrix view (dim, num)
        if (m, r) not in optimal_cache:
            optimal_cache[(m, r)] = float(torch.linalg.svdvals(dW)[r:].pow(2).sum().sqrt())
        optimal = optimal_cache[(m, r)]
        error = float(torch.linalg.vector_norm(dW - scale * (B @ A)))  # (out, r) @ (r, in)
        out[m] = {"rank": r, "error": error, "optimal": optimal, "ratio": error / optimal if optimal else float("nan")}
        del dW
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


def _all_modules(pair: str) -> list[str]:
    names = ["model.embed_tokens"] + ([] if PAIRS[pair]["tied"] else ["lm_head"])
    for i in range(PAIRS[pair]["layers"]):
        names += [f"model.layers.{i}.self_attn.{p}_proj" for p in "qkvo"]
        names += [f"model.layers.{i}.mlp.{p}_proj" for p in ("gate", "up", "down")]
    return names


def _loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def bench_pair(pair: str, r: int, threads: int, work: Path, repeats: int = 5, mergekit_repeats: int = 3,
               device: str | None = None, errors: str = "all") -> dict:
    base, tuned = generate(pair)
    extract = [sys.executable, "-m", "lorasurg.cli", "extract", str(base), str(tuned), "--r", str(r), "--json",
               "--force"]
    outs = {"lorasurg": work / f"{pair}-lorasurg", "lorasurg-400MB": work / f"{pair}-lorasurg-400MB",
            "mergekit": work / f"{pair}-mergekit"}
    cmds = {
        "floor": [sys.executable, "-c", FLOOR, str(base), str(tuned)],
        "lorasurg": extract + ["-o", str(outs["lorasurg"]), "--device", "cpu"],
        "lorasurg-400MB": extract + ["-o", str(outs["lorasurg-400MB"]), "--device", "cpu", "--max-memory", "400MB"],
        "mergekit": [str(MERGEKIT), "--model", str(tuned), "--base-model", str(base), "--out-path",
                     str(outs["mergekit"]), "--max-rank", str(r)],
    }
    if device:
        outs[f"lorasurg-{device}"] = work / f"{pair}-lorasurg-{device}"
        cmds[f"lorasurg-{device}"] = extract + ["-o", str(outs[f"lorasurg-{device}"]), "--device", device]
    counts = {tool: (mergekit_repeats if tool == "mergekit" else repeats) for tool in cmds}
    cmds = {tool: cmd for tool, cmd in cmds.items() if counts[tool] > 0}  # --mergekit-repeats 0: without mergekit
    outs = {tool: out for tool, out in outs.items() if tool in cmds}
    result: dict = {"pair": pair, "r": r, "threads": threads, "checkpoint_bytes": _dir_bytes(base)}
    runs: dict[str, list[dict]] = {tool: [] for tool in cmds}
    tools = list(cmds)
    for i in range(max(counts.values())):
        order = tools[i % len(tools):] + tools[:i % len(tools)]  # rotate who goes first
        for tool in order:
            if len(runs[tool]) >= counts[tool]:
                continue
            if tool in outs:
                shutil.rmtree(outs[tool], ignore_errors=True)
            load = _loadavg()
            print(f"[{pair}] {tool} ({len(runs[tool]) + 1}/{counts[tool]}), load {load:.2f} ...", file=sys.stderr)
            run = run_measured(cmds[tool], threads, work / f"{pair}-{tool}.log")
            run["load"] = load
            print(f"[{pair}] {tool}: {run['wall_s']:.2f} s, {run['peak_rss'] / 2**20:.0f} MiB", file=sys.stderr)
            runs[tool].append(run)
    for tool in cmds:
        walls = sorted(run["wall_s"] for run in runs[tool])
        result[tool] = {
            "rc": max(run["rc"] for run in runs[tool]),
            "wall_s": walls[len(walls) // 2],  # median (upper for an even count)
            "walls": [run["wall_s"] for run in runs[tool]],
            "loads": [run["load"] for run in runs[tool]],
            "peak_rss": max(run["peak_rss"] for run in runs[tool]),
            "adapter_bytes": _dir_bytes(outs[tool]) if tool in outs and outs[tool].exists() else 0,
        }
    optimal: dict = {}
    for tool, out in outs.items():
        if result[tool]["rc"] == 0:
            sample = _all_modules(pair) if tool.startswith("lorasurg") and errors == "all" else _sample_modules(pair)
            result[tool]["errors"] = module_errors(base, tuned, out, sample, optimal)
            if tool in ("lorasurg", "mergekit"):
                result[tool]["peft"] = peft_load_check(base, out)
            if tool.startswith("lorasurg"):
                log = (work / f"{pair}-{tool}.log").read_text()
                report, _ = json.JSONDecoder().raw_decode(log[log.index("{"):])
                result[tool]["streamed"] = [t["name"] for t in report["memory"]["streamed"]]
                result[tool]["budget"] = report["memory"]["budget"]
    return result


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------- reporting
def _max_ratio(res: dict) -> float:
    ratios = [e["ratio"] for e in (res.get("errors") or {}).values() if e]
    return max(ratios) if ratios else float("nan")


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def render(results: list[dict], threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        SECTION, "",
        f"Machine: {os.cpu_count()} CPU cores ({cpu}), no GPU; torch {torch.__version__}; every tool limited to "
        f"{threads} threads; run {time.strftime('%Y-%m-%d')} with `python bench/extract.py`. mergekit 0.1.5 in "
        "bench/.venv-mergekit (see bench/README.md), with its defaults at the same rank. Each tool in its own process, "
        "in rounds that rotate which goes first. Wall: median of the runs; peak RSS: the largest of the runs. "
        "The floor is a `python -c` that imports torch and reads every tensor of both checkpoints once with "
        "safetensors. lorasurg's error is over every LoRA module, mergekit's over a sample (it uses an exact SVD).",
        "",
        "| pair | r | floor | lorasurg (default budget) | lorasurg / floor | lorasurg --max-memory 400MB | mergekit "
        "| mergekit / lorasurg (speed) | peak RSS lorasurg / mergekit (default; 400MB) | error / optimal, lorasurg "
        "(max over modules; 400MB) | PEFT loads lorasurg / mergekit cleanly |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    missing = {"wall_s": float("nan"), "peak_rss": float("nan"), "adapter_bytes": 0}
    for res in results:
        fl, ls, l4, mk = res["floor"], res["lorasurg"], res["lorasurg-400MB"], res.get("mergekit", missing)
        lines.append(
            f"| {res['pair']} ({res['checkpoint_bytes'] / 1e6:.0f} MB/ckpt) | {res['r']} "
            f"| {fl['wall_s']:.2f} s, {_mib(fl['peak_rss'])} | {ls['wall_s']:.2f} s, {_mib(ls['peak_rss'])} "
            f"| **{ls['wall_s'] / fl['wall_s']:.2f}x** | {l4['wall_s']:.2f} s, {_mib(l4['peak_rss'])} "
            f"| {mk['wall_s']:.1f} s, {_mib(mk['peak_rss'])} | {mk['wall_s'] / ls['wall_s']:.1f}x "
            f"| {ls['peak_rss'] / mk['peak_rss']:.2f}; **{l4['peak_rss'] / mk['peak_rss']:.2f}** "
            f"| {_max_ratio(ls):.4f}; {_max_ratio(l4):.4f} | {_peft_cell(ls)} / {_peft_cell(mk)} |"
        )
        for tool in (t for t in res if t.startswith("lorasurg-") and t != "lorasurg-400MB"):
            lines.append(f"| {res['pair']}, `--device {tool.split('-', 1)[1]}` | {res['r']} | | "
                         f"{res[tool]['wall_s']:.2f} s | {res[tool]['wall_s'] / fl['wall_s']:.2f}x | | | | | "
                         f"{_max_ratio(res[tool]):.4f} | |")
    lines.append("")
    for res in results:
        runs = "; ".join(
            f"{tool} " + ", ".join(f"{w:.2f}" for w in res[tool]["walls"]) + " s"
            for tool in res if isinstance(res[tool], dict) and "walls" in res[tool])
        loads = [x for tool in res if isinstance(res[tool], dict) and "loads" in res[tool] for x in res[tool]["loads"]]
        lines.append(f"{res['pair']}: wall times in run order: {runs}. 1-minute load average before the runs: "
                     f"{min(loads):.2f} to {max(loads):.2f} (median {sorted(loads)[len(loads) // 2]:.2f}).")
        rounds = [f"{ls / fl:.2f} (load {load:.1f})" for ls, fl, load in
                  zip(res["lorasurg"]["walls"], res["floor"]["walls"], res["lorasurg"]["loads"])]
        lines.append(f"{res['pair']}: lorasurg / floor round by round: {', '.join(rounds)}.")
        for tool in (t for t in res if t.startswith("lorasurg")):
            streamed = res[tool].get("streamed")
            if streamed is not None:
                lines.append(f"{res['pair']}, {tool}: budget {res[tool]['budget']}; streamed: "
                             + (", ".join(streamed) if streamed else "none") + ".")
    lines += ["", "Adapter sizes: " + "; ".join(
        f"{r['pair']}: lorasurg {r['lorasurg']['adapter_bytes'] / 1e6:.0f} MB, mergekit "
        f"{r.get('mergekit', missing)['adapter_bytes'] / 1e6:.0f} MB" for r in results) + ".", ""]
    for res in results:
        mk = res.get("mergekit", {}).get("peft") or {}
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
    """Replace ``section`` of bench/RESULTS.md where it stands (or append it at the end)."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if section not in old:
        RESULTS.write_text(old.rstrip("\n") + "\n\n" + text)
        return
    start = old.index(section)
    nxt = old.find("\n## ", start + len(section))
    rest = old[nxt + 1:] if nxt != -1 else ""
    RESULTS.write_text(old[:start] + text.rstrip("\n") + "\n" + ("\n" + rest if rest else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=["llama"], choices=list(PAIRS))
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="runs of the floor and lorasurg; median wall time")
    parser.add_argument("--mergekit-repeats", type=int, default=3, help="runs of mergekit (about a minute each)")
    parser.add_argument("--device", default=None, help="also time lorasurg with this --device (e.g. cuda)")
    parser.add_argument("--errors", choices=["all", "sample"], default="all",
                        help="check lorasurg's error on every module (default) or on a sample")
    parser.add_argument("--generate-only", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print, do not touch bench/RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.generate_only:
        for pair in args.pairs:
            print(generate(pair))
        return 0
    if args.mergekit_repeats and not MERGEKIT.exists():
        print(f"{MERGEKIT} is missing; install mergekit as bench/README.md says", file=sys.stderr)
        return 2
    device = args.device
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {device}: no CUDA device here, skipped", file=sys.stderr)
        device = None
    results = []
    work = DATA / "runs"  # adapters and logs of the last run, kept for inspection
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for pair in args.pairs:
        results.append(bench_pair(pair, args.r, args.threads, work, args.repeats, args.mergekit_repeats, device,
                                  args.errors))
        (work / f"result-{pair}.json").write_text(json.dumps(results[-1], indent=2))
    text = render(results, args.threads)
    print(text)
    if not args.no_write:
        write_results(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
