"""Benchmark: ``lorasurg merge``/``rerank`` against PEFT's ``add_weighted_adapter`` and a kohya-style dense re-rank.

Data (generated once under bench/.data/, git-ignored): the ~600 MB Llama-shaped base of ``bench/extract.py``
(its generator; hidden 2048, intermediate 5632, 4 layers, vocab 32000), and on all 28 of its linear modules (q, k, v,
o, gate, up, down of each layer) two r=16 adapters ``a`` and ``b`` (lora_alpha 32) and one r=64 adapter ``r64``, with
seeded Gaussian factors (``A ~ N(0, 1/in)``, ``B ~ N(0, 0.02^2)``), float32.

Merge (weights 0.5, 0.5; ``svd`` and ``ties_svd`` with density 0.5; new rank 16, PEFT's default):

* PEFT 0.21.2 in its own process: the base loaded in float32, both adapters loaded with ``PeftModel``, then the
  ``add_weighted_adapter`` call alone is timed (what the issue's ~64 s refers to); its merged adapter is saved.
* ``lorasurg merge`` as a whole process (``python -m lorasurg.cli merge a b ...``: start-up, imports, reading the
  adapters, the merge, writing), wall time.
* lorasurg's ``merge_adapters`` function alone, on adapters already in memory, in its own process.

Each run alternates which tool goes first; the median of ``--repeats`` runs is reported. Same results: the largest
relative difference ``||D_peft - D_lorasurg||_F / ||D_peft||_F`` over the modules' deltas (from the factors, never
dense).

Rerank (``r64`` to 16): lorasurg's ``rerank`` (exact, from the factors) against a kohya-style dense re-rank written
here after sd-scripts' ``networks/resize_lora.py`` (form ``scale * B @ A``, ``torch.linalg.svd`` with its defaults,
keep 16), both in one process on the same adapter, alternating; the errors of both against the optimum.

    python bench/merge.py                 # generate if needed, run, print, update bench/RESULTS.md
    python bench/merge.py --repeats 1 --methods svd --no-write
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
from extract import DATA, bench_env, generate, run_measured, write_results  # noqa: E402  (bench/extract.py's)

from lorasurg.config import LoraConfig  # noqa: E402
from lorasurg.engine.factors import lora_scale  # noqa: E402
from lorasurg.engine.lowrank import lowrank_norm_sq  # noqa: E402
from lorasurg.io.adapter import Adapter, AdapterModule  # noqa: E402

SECTION = "## Merge and rerank vs PEFT add_weighted_adapter and kohya-style resize (issue 9)"
WORK = DATA / "merge"
LEAVES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DENSITY = 0.5


# --------------------------------------------------------------------------------------------- data
def _linear_shapes(base: Path) -> dict[str, tuple[int, int]]:
    from lorasurg.io.checkpoint import Checkpoint

    ckpt = Checkpoint.open(base)
    try:
        return {name: tuple(info.weight_shape) for name, info in ckpt.module_infos().items()
                if name.rsplit(".", 1)[-1] in LEAVES}
    finally:
        ckpt.close()


def make_adapters(base: Path) -> dict[str, Path]:
    """bench/.data/merge/{a,b,r64}: PEFT adapters on every linear module of the base (made once)."""
    paths = {name: WORK / name for name in ("a", "b", "r64")}
    if all((p / "adapter_config.json").is_file() for p in paths.values()):
        return paths
    shapes = _linear_shapes(base)
    for seed, (name, r) in enumerate((("a", 16), ("b", 16), ("r64", 64))):
        gen = torch.Generator().manual_seed(100 + seed)
        modules = {}
        for module, (out_f, in_f) in shapes.items():
            A = torch.randn(r, in_f, generator=gen) / in_f**0.5  # (r, in)
            B = torch.randn(out_f, r, generator=gen) * 0.02  # (out, r)
            modules[module] = AdapterModule(module, A, B)
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=LEAVES, task_type="CAUSAL_LM",
                         base_model_name_or_path=str(base))
        Adapter(cfg, modules).save(paths[name], force=True)
    return paths


# --------------------------------------------------------------------------------------------- workers
def peft_worker(base: str, a: str, b: str, method: str, out: str) -> None:
    """Load the base (float32) and both adapters into PEFT; time add_weighted_adapter alone; save the result."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    pm = PeftModel.from_pretrained(model, a, adapter_name="a")
    pm.load_adapter(b, adapter_name="b")
    loaded = time.perf_counter() - t0
    kwargs = {"density": DENSITY} if method != "svd" else {}
    t1, c1 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        pm.add_weighted_adapter(["a", "b"], [0.5, 0.5], "merged", combination_type=method, **kwargs)
    call, cpu = time.perf_counter() - t1, time.process_time() - c1
    pm.save_pretrained(out, selected_adapters=["merged"])
    print("RESULT " + json.dumps({"load_s": loaded, "call_s": call, "call_cpu_s": cpu}))


def lorasurg_worker(a: str, b: str, method: str) -> None:
    """Time merge_adapters alone on adapters already in memory (and the reading, for the record)."""
    from lorasurg.surgery.merge import merge_adapters

    t0 = time.perf_counter()
    adapters = [Adapter.load(a), Adapter.load(b)]
    loaded = time.perf_counter() - t0
    kwargs = {"density": DENSITY} if method != "svd" else {}
    t1, c1 = time.perf_counter(), time.process_time()
    merge_adapters(adapters, [0.5, 0.5], method=method, **kwargs)
    call, cpu = time.perf_counter() - t1, time.process_time() - c1
    print("RESULT " + json.dumps({"load_s": loaded, "call_s": call, "call_cpu_s": cpu}))


def _worker(args: list[str], threads: int, log: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__)), *args], env=bench_env(threads), capture_output=True,
                          text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed, see {log}:\n{proc.stderr[-2000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return dict(json.loads(line[len("RESULT "):]), wall_s=wall)


# --------------------------------------------------------------------------------------------- comparison
def _deltas(adapter: Adapter) -> dict[str, tuple[float, torch.Tensor, torch.Tensor]]:
    out = {}
    for name, mod in adapter.modules.items():
        r, alpha = adapter.rank_alpha(name)
        out[name] = (lora_scale(r, alpha, adapter.config.use_rslora), mod.B.double(), mod.A.double())
    return out


def max_rel_diff(peft_dir: Path, ours_dir: Path) -> float:
    """Largest ``||D_peft - D_ours||_F / ||D_peft||_F`` over the modules, from the factors (float64)."""
    theirs, ours = _deltas(Adapter.load(peft_dir)), _deltas(Adapter.load(ours_dir))
    assert set(theirs) == set(ours), (sorted(set(theirs) ^ set(ours)))[:4]
    worst = 0.0
    for name, (s, B, A) in theirs.items():
        so, Bo, Ao = ours[name]
        diff = lowrank_norm_sq([(s, B, A), (-so, Bo, Ao)])
        worst = max(worst, (diff / lowrank_norm_sq([(s, B, A)])) ** 0.5)
    return worst


def reference_errors(paths: dict[str, Path], method: str, peft_dir: Path, ours_dir: Path) -> dict[str, float]:
    """Largest relative error of each tool's deltas against a float64 reference of the same merge: for svd the
    exact low-rank SVD in float64 on every module; for ties_svd TIES on the dense float64 deltas and a float64 SVD,
    on the q/k/v projections of layer 0."""
    from lorasurg.engine.lowrank import truncate_terms
    from lorasurg.engine.sparsify import TENSOR_METHODS

    a, b = (_deltas(Adapter.load(paths[n])) for n in ("a", "b"))
    tools = {"peft": _deltas(Adapter.load(peft_dir)), "lorasurg": _deltas(Adapter.load(ours_dir))}
    modules = list(a) if method == "svd" else [m for m in a if ".layers.0.self_attn." in m and "o_proj" not in m]
    worst = {tool: 0.0 for tool in tools}
    for name in modules:
        (sa, Ba, Aa), (sb, Bb, Ab) = a[name], b[name]
        if method == "svd":
            fit = truncate_terms([(0.5 * sa, Ba, Aa), (0.5 * sb, Bb, Ab)], 16)
            ref = [(1.0, fit.B, fit.A)]
        else:
            dense = [sa * Ba @ Aa, sb * Bb @ Ab]  # (out, r) @ (r, in)
            merged = TENSOR_METHODS["ties"](dense, [0.5, 0.5], DENSITY, "total", None)
            U, S, Vh = torch.linalg.svd(merged, full_matrices=False)
            ref = [(1.0, U[:, :16] * S[:16], Vh[:16])]
        ref_sq = lowrank_norm_sq(ref)
        for tool, deltas in tools.items():
            s, B, A = deltas[name]
            err = lowrank_norm_sq(ref + [(-s, B, A)]) / ref_sq
            worst[tool] = max(worst[tool], err**0.5)
    return worst


def bench_merge(paths: dict[str, Path], base: Path, method: str, repeats: int, threads: int) -> dict:
    logs = WORK / "logs"
    logs.mkdir(exist_ok=True)
    outs = {"peft": WORK / f"out-peft-{method}", "cli": WORK / f"out-lorasurg-{method}"}
    density = ["--density", str(DENSITY)] if method != "svd" else []
    cli = [sys.executable, "-m", "lorasurg.cli", "merge", str(paths["a"]), str(paths["b"]), "--weights", "0.5,0.5",
           "--method", method, *density, "-o", str(outs["cli"]), "--force", "--json"]
    runs: dict[str, list[dict]] = {"peft": [], "cli": [], "function": []}
    for i in range(repeats):
        tools = ["peft", "cli", "function"] if i % 2 == 0 else ["function", "cli", "peft"]
        for tool in tools:
            print(f"[{method}] {tool} ({i + 1}/{repeats}) ...", file=sys.stderr, flush=True)
            if tool == "peft":
                shutil.rmtree(outs["peft"], ignore_errors=True)
                runs[tool].append(_worker(["--peft-worker", str(base), str(paths["a"]), str(paths["b"]), method,
                                           str(outs["peft"])], threads, logs / f"peft-{method}-{i}.log"))
            elif tool == "cli":
                run = run_measured(cli, threads, logs / f"cli-{method}-{i}.log")
                assert run["rc"] == 0, f"lorasurg merge failed, see {logs}"
                runs[tool].append(run)
            else:
                runs[tool].append(_worker(["--lorasurg-worker", str(paths["a"]), str(paths["b"]), method], threads,
                                          logs / f"function-{method}-{i}.log"))
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731  (median; upper for an even count)
    return {
        "method": method,
        "peft_call_cpu_s": med([r["call_cpu_s"] for r in runs["peft"]]),
        "peft_call_s": med([r["call_s"] for r in runs["peft"]]),
        "peft_calls": [(r["call_cpu_s"], r["call_s"]) for r in runs["peft"]],
        "peft_process_s": med([r["wall_s"] for r in runs["peft"]]),
        "cli_cpu_s": med([r["cpu_s"] for r in runs["cli"]]),
        "cli_s": med([r["wall_s"] for r in runs["cli"]]),
        "cli_runs": [(r["cpu_s"], r["wall_s"]) for r in runs["cli"]],
        "cli_peak_rss": max(r["peak_rss"] for r in runs["cli"]),
        "function_cpu_s": med([r["call_cpu_s"] for r in runs["function"]]),
        "function_s": med([r["call_s"] for r in runs["function"]]),
        "function_runs": [(r["call_cpu_s"], r["call_s"]) for r in runs["function"]],
        "max_rel_diff": max_rel_diff(outs["peft"] / "merged", outs["cli"]),
        "vs_float64": reference_errors(paths, method, outs["peft"] / "merged", outs["cli"]),
    }


# --------------------------------------------------------------------------------------------- rerank
def kohya_style_rerank(adapter: Adapter, rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Dense re-rank as sd-scripts' resize_lora.py does it: the full product, a full SVD, the leading ``rank``."""
    out = {}
    for name, mod in adapter.modules.items():
        r, alpha = adapter.rank_alpha(name)
        dense = lora_scale(r, alpha) * (mod.B.float() @ mod.A.float())  # (out, r) @ (r, in) -> (out, in)
        U, S, Vh = torch.linalg.svd(dense)  # full_matrices=True, torch's default (as resize_lora.py calls it)
        out[name] = (U[:, :rank] * S[:rank], Vh[:rank])  # B (out, rank) with the singular values, A (rank, in)
    return out


def bench_rerank(paths: dict[str, Path], repeats: int, threads: int) -> dict:
    from lorasurg.surgery.rerank import rerank

    torch.set_num_threads(threads)
    adapter = Adapter.load(paths["r64"])
    times: dict[str, list[tuple[float, float]]] = {"lorasurg": [], "kohya": []}
    results = {}
    for i in range(repeats):
        for tool in (["lorasurg", "kohya"] if i % 2 == 0 else ["kohya", "lorasurg"]):
            print(f"[rerank] {tool} ({i + 1}/{repeats}) ...", file=sys.stderr, flush=True)
            t0, c0 = time.perf_counter(), time.process_time()
            results[tool] = rerank(adapter, r=16)[0] if tool == "lorasurg" else kohya_style_rerank(adapter, 16)
            times[tool].append((time.process_time() - c0, time.perf_counter() - t0))
    ratios = []
    for name in list(adapter.modules)[:: max(1, len(adapter.modules) // 7)]:  # a sample of every module type
        r, alpha = adapter.rank_alpha(name)
        mod = adapter.modules[name]
        dense = lora_scale(r, alpha) * (mod.B.double() @ mod.A.double())
        S = torch.linalg.svdvals(dense)
        optimal = float(S[16:].pow(2).sum().sqrt())
        new = results["lorasurg"]
        r2, a2 = new.rank_alpha(name)
        ours = lora_scale(r2, a2) * (new.modules[name].B.double() @ new.modules[name].A.double())
        kB, kA = results["kohya"][name]
        kohya = kB.double() @ kA.double()
        ratios.append((float(torch.linalg.norm(dense - ours)) / optimal, float(torch.linalg.norm(dense - kohya)) / optimal))
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    cli = run_measured([sys.executable, "-m", "lorasurg.cli", "rerank", str(paths["r64"]), "--r", "16", "-o",
                        str(WORK / "out-rerank"), "--force", "--json"], threads, WORK / "logs" / "rerank-cli.log")
    return {
        "lorasurg_cpu_s": med([c for c, _ in times["lorasurg"]]), "kohya_cpu_s": med([c for c, _ in times["kohya"]]),
        "lorasurg_s": med([w for _, w in times["lorasurg"]]), "kohya_s": med([w for _, w in times["kohya"]]),
        "runs": times, "cli_cpu_s": cli["cpu_s"],
        "error_ratio_lorasurg": max(r[0] for r in ratios), "error_ratio_kohya": max(r[1] for r in ratios),
        "cli_s": cli["wall_s"], "modules": len(adapter.modules),
    }


# --------------------------------------------------------------------------------------------- report
def _ratio(x: float) -> str:
    return f"{x:.1f}x" if x < 10 else f"{x:.0f}x"


def _pairs(runs) -> str:
    return ", ".join(f"{cpu:.2f}/{wall:.2f}" for cpu, wall in runs)


def render(merges: list[dict], rerank_result: dict, threads: int, loads: tuple[str, str], base_bytes: int) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        SECTION, "",
        f"Machine: {os.cpu_count()} CPU cores ({cpu}), shared with other sessions, no GPU; torch {torch.__version__}; "
        f"every process limited to {threads} thread(s); run {time.strftime('%Y-%m-%d')} with `python bench/merge.py`. "
        f"`cat /proc/loadavg` before: `{loads[0]}`, after: `{loads[1]}`. With the cores that busy, wall time measures "
        "the other sessions as much as the tools, so the ratios are taken on CPU time (user + system of the process, "
        "or `time.process_time()` around a call); wall times are listed with them.", "",
        f"Two r=16 adapters (lora_alpha 32, float32, weights 0.5/0.5) on the 28 linear modules of the "
        f"{base_bytes / 1e6:.0f} MB generated Llama-shaped base of `bench/extract.py`; new rank 16 (PEFT's default), "
        f"density {DENSITY} for ties_svd. PEFT 0.21.2: base in float32, adapters loaded, the `add_weighted_adapter` "
        "call alone timed. lorasurg: the whole `lorasurg merge` process (start-up, imports, reading, merging, "
        "writing), and `merge_adapters` alone on adapters in memory. Medians of alternating runs.", "",
        "| method | PEFT call, CPU s | lorasurg process, CPU s | process speed-up (target >= 20x) | "
        "lorasurg merge_adapters, CPU s | function speed-up (target >= 100x) | max rel. diff of deltas | "
        "error vs float64 reference, PEFT / lorasurg |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in merges:
        lines.append(
            f"| {m['method']} | {m['peft_call_cpu_s']:.1f} | {m['cli_cpu_s']:.2f} | "
            f"{_ratio(m['peft_call_cpu_s'] / m['cli_cpu_s'])} | {m['function_cpu_s']:.3f} | "
            f"{_ratio(m['peft_call_cpu_s'] / m['function_cpu_s'])} | {m['max_rel_diff']:.1e} | "
            f"{m['vs_float64']['peft']:.1e} / {m['vs_float64']['lorasurg']:.1e} |"
        )
    lines += ["", "Every run, CPU/wall seconds: " + "; ".join(
        f"{m['method']}: PEFT call {_pairs(m['peft_calls'])} (whole PEFT process {m['peft_process_s']:.0f} s wall, "
        f"median); lorasurg process {_pairs(m['cli_runs'])} (peak RSS {m['cli_peak_rss'] / 2**20:.0f} MiB); "
        f"merge_adapters {_pairs(m['function_runs'])}" for m in merges) + ".",
        "", "Wall-time ratios (same runs, medians): " + "; ".join(
            f"{m['method']}: process {_ratio(m['peft_call_s'] / m['cli_s'])}, function "
            f"{_ratio(m['peft_call_s'] / m['function_s'])}" for m in merges) + "."]
    rr = rerank_result
    lines += [
        "",
        f"Rerank of an r=64 adapter (same 28 modules) to r=16, in one process, alternating: lorasurg `rerank` "
        f"{rr['lorasurg_cpu_s']:.3f} CPU s vs kohya-style dense SVD {rr['kohya_cpu_s']:.1f} CPU s: "
        f"**{rr['kohya_cpu_s'] / rr['lorasurg_cpu_s']:.0f}x** ({rr['kohya_s'] / rr['lorasurg_s']:.0f}x in wall time); "
        f"error / optimal (max over a sample of 7 modules, float64): lorasurg {rr['error_ratio_lorasurg']:.6f}, "
        f"kohya-style {rr['error_ratio_kohya']:.6f}. The whole `lorasurg rerank` process: {rr['cli_cpu_s']:.2f} CPU s, "
        f"{rr['cli_s']:.2f} s wall. Runs, CPU/wall s: lorasurg {_pairs(rr['runs']['lorasurg'])}; kohya-style "
        f"{_pairs(rr['runs']['kohya'])}.",
    ]
    return "\n".join(lines) + "\n"


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unavailable"


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--peft-worker":
        peft_worker(*sys.argv[2:7])
        return 0
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--lorasurg-worker":
        lorasurg_worker(*sys.argv[2:5])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["svd", "ties_svd"], choices=["svd", "ties_svd"])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each tool, alternating; median")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads of every process (default 1: on a shared machine more threads spin at barriers)")
    parser.add_argument("--no-write", action="store_true", help="print, do not touch bench/RESULTS.md")
    parser.add_argument("--render-only", action="store_true", help="re-render the last run's bench/.data/merge/result.json")
    args = parser.parse_args(argv)
    if args.render_only:
        saved = json.loads((WORK / "result.json").read_text())
        text = render(saved["merges"], saved["rerank"], saved["threads"], tuple(saved["loads"]), saved["base_bytes"])
        print(text)
        if not args.no_write:
            write_results(text)
        return 0
    torch.set_num_threads(args.threads)
    before = _loadavg()
    base, _ = generate("llama")
    paths = make_adapters(base)
    (WORK / "logs").mkdir(parents=True, exist_ok=True)
    merges = []
    for method in args.methods:
        merges.append(bench_merge(paths, base, method, args.repeats, args.threads))
        print(json.dumps(merges[-1]), file=sys.stderr)
    rerank_result = bench_rerank(paths, args.repeats, args.threads)
    print(json.dumps(rerank_result), file=sys.stderr)
    base_bytes = sum(p.stat().st_size for p in base.rglob("*") if p.is_file())
    loads = (before, _loadavg())
    text = render(merges, rerank_result, args.threads, loads, base_bytes)
    (WORK / "result.json").write_text(json.dumps({"merges": merges, "rerank": rerank_result, "threads": args.threads,
                                                  "loads": loads, "base_bytes": base_bytes}, indent=2))
    print(text)
    if not args.no_write:
        write_results(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
