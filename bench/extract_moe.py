"""Benchmark: ``lorasurg extract`` on a mixture-of-experts pair against a dense pair of the same bytes (issue 16).

Pairs (generated once under bench/.data/, git-ignored, reused when present), bf16, about 390 MB per checkpoint:

* ``moe``: Qwen3-MoE-shaped: hidden 1024, 4 layers, every layer MoE with 32 experts of intermediate 384 (gate, up,
  down: 384 matrices of 384 x 1024 and 1024 x 384 in all), 16 heads / 4 KV heads of 64, vocab 16384, untied;
  stored as checkpoints are (one key per expert matrix, ``mlp.experts.{e}.gate_proj.weight``);
* ``dense``: Qwen3-shaped with the same hidden size, layers, attention and vocabulary and a dense MLP of
  intermediate 12288 = 32 x 384: the same bytes in 12 matrices of 12288 x 1024 instead of 384 small ones.

``tuned = base + delta`` as fixtures/families.py perturbs its pairs: every linear weight and every expert matrix
gains its own power-law delta (``G1 diag(s) G2^T``, ``s_i ~ (i + 1) ** -0.5``, 5% of the weight's norm: the hard case
for a randomized SVD) except expert 3 of layer 0, which stays unchanged; the routers and norms change by noise;
the embedding by a power-law delta.

Measured, each tool in its own subprocess with ``--threads`` threads, rounds rotating which goes first
(``bench/_measure.py``): the I/O floor (import torch, read every tensor of both checkpoints once) of each pair,
``lorasurg extract --r 16`` of each pair; wall time (median of ``--repeats``), peak RSS. Reported: MoE / dense
(the cost of the experts being many small matrices), each against its floor, and the error of every expert against
its optimal rank-16 error. In process: the batched randomized SVD of one expert group (32 matrices of 384 x 1024,
one ``operator_svd(batch=32)``) against the same 32 matrices one call each (what extract did per matrix), median of
alternating runs. ``mergekit-extract-lora`` 0.1.5 is run once on the MoE pair to see what it carries.

    python bench/extract_moe.py                 # generate if needed, run, print, update bench/RESULTS.md
    python bench/extract_moe.py --repeats 3 --no-write
    python bench/extract_moe.py --device cuda   # also lorasurg --device cuda and the batched SVD on CUDA
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _measure import measure  # noqa: E402
from extract import DATA, FLOOR, MERGEKIT, _dir_bytes, _power_law_delta, run_measured, write_results  # noqa: E402

from lorasurg.io.writer import ShardedWriter  # noqa: E402

SECTION = "## Extract on a mixture of experts vs a dense model of the same bytes (issue 16)"
SHAPE = dict(vocab_size=16384, hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
             head_dim=64, max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
             dtype="bfloat16")
EXPERTS, MOE_INTERMEDIATE, UNCHANGED = 32, 384, (0, 3)
#: What extract does before it reads a tensor: import lorasurg, describe BASE (for the MoE pair: import
#: transformers' modeling code, build the model on the meta device, place the keys by its conversion rules; the
#: dense Qwen3 type is described from names and shapes).
DESCRIBE = "import sys\nfrom lorasurg.io.checkpoint import Checkpoint\nCheckpoint.open(sys.argv[1]).describe()\n"


def _config(name: str):
    from transformers import Qwen3Config, Qwen3MoeConfig

    if name == "moe":
        cfg = Qwen3MoeConfig(**SHAPE, intermediate_size=EXPERTS * MOE_INTERMEDIATE, decoder_sparse_step=1,
                             mlp_only_layers=[], moe_intermediate_size=MOE_INTERMEDIATE, num_experts=EXPERTS,
                             num_experts_per_tok=4)
        cfg.architectures = ["Qwen3MoeForCausalLM"]
    else:
        cfg = Qwen3Config(**SHAPE, intermediate_size=EXPERTS * MOE_INTERMEDIATE)
        cfg.architectures = ["Qwen3ForCausalLM"]
    return cfg


def _checkpoint_tensors(name: str, shape: tuple[int, ...]):
    """``(checkpoint key, shape, layer, expert)`` of a model parameter as checkpoints store it: a fused expert
    parameter ``(E, 2I, H)`` / ``(E, H, I)`` as one key per expert and projection."""
    module, _, leaf = name.rpartition(".")
    layer = int(name.split(".")[2]) if name.startswith("model.layers.") else -1
    if leaf == "gate_up_proj":
        half = shape[1] // 2
        for e in range(shape[0]):
            yield f"{module}.{e}.gate_proj.weight", (half, shape[2]), layer, e
            yield f"{module}.{e}.up_proj.weight", (half, shape[2]), layer, e
    elif leaf == "down_proj" and len(shape) == 3:
        for e in range(shape[0]):
            yield f"{module}.{e}.down_proj.weight", shape[1:], layer, e
    else:
        yield name, shape, layer, None


def generate(name: str, *, shard_bytes: int = 320 * 2**20) -> tuple[Path, Path]:
    """Write bench/.data/moe-<name>/{base,tuned} unless both exist (module docstring); returns their paths."""
    from transformers import AutoModelForCausalLM

    root = DATA / f"moe-{name}"
    base_dir, tuned_dir = root / "base", root / "tuned"
    if (base_dir / "config.json").is_file() and (tuned_dir / "config.json").is_file():
        return base_dir, tuned_dir
    shutil.rmtree(root, ignore_errors=True)
    cfg = _config(name)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg)
    gen = torch.Generator().manual_seed(0)
    writers = {}
    for directory in (base_dir, tuned_dir):
        directory.mkdir(parents=True)
        writers[directory] = ShardedWriter(directory, max_shard_size=shard_bytes)
    t0 = time.time()
    for pname, param in meta.named_parameters():
        for key, shape, layer, expert in _checkpoint_tensors(pname, tuple(param.shape)):
            if len(shape) == 1:  # norms
                w = torch.ones(shape) + 0.02 * torch.randn(shape, generator=gen)
                d = 0.01 * torch.randn(shape, generator=gen)
            elif key.endswith("mlp.gate.weight"):  # the router
                w = 0.02 * torch.randn(shape, generator=gen)
                d = 0.002 * torch.randn(shape, generator=gen)
            else:
                w = 0.02 * torch.randn(shape, generator=gen)
                d = _power_law_delta(shape[0], shape[1], 0.05 * float(torch.linalg.vector_norm(w)), gen)
                if (layer, expert) == UNCHANGED:
                    d = torch.zeros(shape)
            writers[base_dir].add(key, w.to(torch.bfloat16))
            writers[tuned_dir].add(key, (w + d).to(torch.bfloat16))
    for directory, writer in writers.items():
        writer.finish()
        cfg.save_pretrained(directory)
    _check_layout(base_dir, name)
    print(f"generated {root} in {time.time() - t0:.0f} s", file=sys.stderr)
    return base_dir, tuned_dir


def _check_layout(base: Path, name: str) -> None:
    """The generated MoE checkpoint is placed whole by transformers' rules (as a save_pretrained one would be)."""
    from lorasurg.io.checkpoint import Checkpoint

    description = Checkpoint.open(base).describe()
    expected = 3 * EXPERTS * SHAPE["num_hidden_layers"] if name == "moe" else 0
    if description.unplaced or len(description.experts) != expected:
        raise SystemExit(f"generated {base} does not match the model: {len(description.experts)} experts placed "
                         f"(expected {expected}), unplaced {list(description.unplaced)[:3]}")


# --------------------------------------------------------------------------------------------- checks
def expert_errors(base: Path, tuned: Path, adapter: Path, layer: int = 1) -> dict:
    """Error / optimal (exact float64 SVD) of every expert matrix of one layer in lorasurg's per-expert adapter."""
    from safetensors import safe_open

    from lorasurg.io.checkpoint import Checkpoint

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    b, t = Checkpoint.open(base), Checkpoint.open(tuned)
    ratios = []
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        for e in range(EXPERTS):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                module = f"model.layers.{layer}.mlp.experts.{e}.{proj}"
                A = f.get_tensor(f"base_model.model.{module}.lora_A.weight").double()  # (r, in)
                B = f.get_tensor(f"base_model.model.{module}.lora_B.weight").double()  # (out, r)
                dW = t.get(f"{module}.weight", dtype=torch.float64) - b.get(f"{module}.weight", dtype=torch.float64)
                optimal = float(torch.linalg.svdvals(dW)[A.shape[0]:].pow(2).sum().sqrt())
                error = float(torch.linalg.vector_norm(dW - cfg["lora_alpha"] / cfg["r"] * (B @ A)))
                ratios.append(error / optimal)
    return {"experts": len(ratios), "max_ratio": max(ratios), "median_ratio": sorted(ratios)[len(ratios) // 2]}


def mergekit_carries(base: Path, tuned: Path, out: Path, r: int, threads: int, work: Path) -> dict:
    """Run mergekit-extract-lora once on the MoE pair: its time and how many expert matrices its adapter adapts."""
    if not MERGEKIT.exists():
        return {"skipped": f"{MERGEKIT} is missing (bench/README.md says how to install it)"}
    from safetensors import safe_open

    shutil.rmtree(out, ignore_errors=True)
    run = run_measured([str(MERGEKIT), "--model", str(tuned), "--base-model", str(base), "--out-path", str(out),
                        "--max-rank", str(r)], threads, work / "mergekit-moe.log")
    if run["rc"] != 0:
        return {"rc": run["rc"]}
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    return {"rc": 0, "wall_s": run["wall_s"], "expert_lora_modules": sum(".experts." in k and "lora_A" in k
                                                                         for k in keys),
            "target_modules": json.loads((out / "adapter_config.json").read_text())["target_modules"]}


# --------------------------------------------------------------------------------------------- in process
def batched_vs_loop(device: str, r: int = 16, repeats: int = 7) -> dict:
    """One expert group, 32 matrices (384, 1024): ``operator_svd(batch=32)`` against 32 unbatched calls, the same
    4-pass scheme and test matrices; median wall of alternating runs."""
    from lorasurg.engine.sketch import operator_svd, sketch_matrix
    from lorasurg.surgery.extract.fit import PASSES, oversample

    gen = torch.Generator().manual_seed(0)
    shape = (MOE_INTERMEDIATE, SHAPE["hidden_size"])
    M = torch.randn(EXPERTS, *shape, generator=gen).to(device)  # (E, out, in)
    omega = sketch_matrix(shape, r, oversample(r), torch.Generator().manual_seed(1), batch=EXPERTS).to(device)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def batched():
        operator_svd(lambda X: M @ X, lambda Y: M.mT @ Y, shape, r, oversample=oversample(r), passes=PASSES,
                     batch=EXPERTS, sketch=M @ omega)  # (E, out, in) @ (E, in, l)

    def loop():
        for e in range(EXPERTS):
            operator_svd(lambda X: M[e] @ X, lambda Y: M[e].T @ Y, shape, r, oversample=oversample(r), passes=PASSES,
                         sketch=M[e] @ omega[e])  # (out, in) @ (in, l)

    times: dict[str, list[float]] = {"batched": [], "loop": []}
    for fn in (batched, loop):  # warm-up
        fn()
    for i in range(repeats):
        pairs = (("batched", batched), ("loop", loop))
        for name, fn in pairs if i % 2 == 0 else pairs[::-1]:
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"device": device, "batched_s": med["batched"], "loop_s": med["loop"], "times": times}


# --------------------------------------------------------------------------------------------- running
def bench(r: int, threads: int, repeats: int, device: str | None, work: Path) -> dict:
    pairs = {name: generate(name) for name in ("moe", "dense")}
    extract = [sys.executable, "-m", "lorasurg.cli", "extract", "--r", str(r), "--json", "--force"]
    cmds = {}
    for name, (base, tuned) in pairs.items():
        cmds[f"floor {name}"] = ([sys.executable, "-c", FLOOR, str(base), str(tuned)], work / f"floor-{name}")
        cmds[f"describe {name}"] = ([sys.executable, "-c", DESCRIBE, str(base)], work / f"describe-{name}")
        for dev in ("cpu",) + ((device,) if device else ()):
            out = work / f"lorasurg-{name}-{dev}"
            cmds[f"lorasurg {name} {dev}"] = (extract[:4] + [str(base), str(tuned)] + extract[4:]
                                               + ["-o", str(out), "--device", dev], out)
    measured = measure(cmds, repeats, threads, work)
    result = {"r": r, "threads": threads, "bytes": {n: _dir_bytes(p[0]) for n, p in pairs.items()},
              "measured": measured}
    for tool, (_, out) in cmds.items():
        if tool.startswith("lorasurg moe") and measured["tools"][tool]["rc"] == 0:
            result[f"errors {tool}"] = expert_errors(*pairs["moe"], out)
    torch.set_num_threads(threads)
    result["svd"] = [batched_vs_loop("cpu")] + ([batched_vs_loop(device)] if device else [])
    result["mergekit"] = mergekit_carries(*pairs["moe"], work / "mergekit-moe", r, threads, work)
    return result


def render(res: dict) -> str:
    tools = res["measured"]["tools"]
    loads = [float(x) for x in res["measured"]["loads"]]
    wall = {t: v["wall_s"] for t, v in tools.items()}
    cpu = platform.processor() or platform.machine()
    lines = [
        SECTION, "",
        f"Machine: {os.cpu_count()} CPU cores ({cpu}); torch {torch.__version__}; every process limited to "
        f"{res['threads']} threads; run {time.strftime('%Y-%m-%d')} with `python bench/extract_moe.py` (pairs and "
        f"method in its docstring). r={res['r']}. Wall and CPU (user + system) times: medians of "
        f"{len(tools['floor moe']['walls'])} runs per tool, rounds rotating which goes first; 1-minute load average "
        f"{min(loads):.2f} to {max(loads):.2f} (on a loaded machine the CPU times are the steadier measure).",
        "",
        "| pair | bytes / checkpoint | floor | describe BASE | lorasurg extract | lorasurg / floor | peak RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("moe", "dense"):
        for tool in (t for t in tools if t.startswith(f"lorasurg {name} ")):
            dev = tool.rsplit(" ", 1)[1]
            lines.append(f"| {name} (`--device {dev}`) | {res['bytes'][name] / 1e6:.0f} MB "
                         f"| {wall[f'floor {name}']:.2f} s | {wall[f'describe {name}']:.2f} s | {wall[tool]:.2f} s "
                         f"| {wall[tool] / wall[f'floor {name}']:.2f}x | {tools[tool]['peak_rss'] / 2**20:.0f} MiB |")
    lines.append("")
    for measure_name, of in (("wall", wall), ("CPU", {t: v["cpu_s"] for t, v in tools.items()})):
        for dev in sorted({t.rsplit(' ', 1)[1] for t in tools if t.startswith("lorasurg ")}):
            moe, dense = of[f"lorasurg moe {dev}"], of[f"lorasurg dense {dev}"]
            fixed = of["describe moe"] - of["describe dense"]
            lines.append(f"**MoE / dense, `--device {dev}`, {measure_name} time: {moe / dense:.2f}x** ({moe:.2f} s "
                         f"against {dense:.2f} s); without the {fixed:.2f} s more that describing the MoE BASE takes "
                         f"(transformers' modeling code and conversion rules: a cost per run, not per byte): "
                         f"**{(moe - fixed) / dense:.2f}x**.")
    for key in (k for k in res if k.startswith("errors ")):
        e = res[key]
        lines.append(f"{key.removeprefix('errors ')}: error / optimal rank-{res['r']} error over the {e['experts']} "
                     f"expert matrices of layer 1: max {e['max_ratio']:.4f}, median {e['median_ratio']:.4f}.")
    lines += ["", "Wall times (sorted): " + "; ".join(
        f"{t} " + ", ".join(f"{w:.2f}" for w in v["walls"]) + " s" for t, v in tools.items()) + ".",
        "CPU times (sorted): " + "; ".join(
        f"{t} " + ", ".join(f"{w:.2f}" for w in v["cpus"]) + " s" for t, v in tools.items()) + ".", ""]
    for s in res["svd"]:
        lines.append(f"Batched randomized SVD of one expert group ({EXPERTS} x {MOE_INTERMEDIATE}x"
                     f"{SHAPE['hidden_size']}, r={res['r']}, `{s['device']}`): **{s['loop_s'] / s['batched_s']:.1f}x** "
                     f"faster than one call per matrix ({1000 * s['batched_s']:.1f} ms against "
                     f"{1000 * s['loop_s']:.1f} ms, medians of {len(s['times']['loop'])} alternating runs).")
    mk = res["mergekit"]
    if "skipped" in mk:
        lines.append(f"mergekit-extract-lora: not run ({mk['skipped']}).")
    elif mk.get("rc"):
        lines.append(f"mergekit-extract-lora 0.1.5 failed on the MoE pair (exit {mk['rc']}).")
    else:
        lines.append(
            f"mergekit-extract-lora 0.1.5 on the MoE pair ({mk['wall_s']:.1f} s, one run) adapts "
            f"{mk['expert_lora_modules']} expert matrices (target_modules {mk['target_modules']}): it does not see "
            "transformers 5's fused experts and leaves every expert delta out without a word, so it is no comparison "
            "for the experts.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default=None, help="also time lorasurg with this --device (e.g. cuda)")
    parser.add_argument("--generate-only", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print, do not touch bench/RESULTS.md")
    args = parser.parse_args(argv)
    if args.generate_only:
        print(generate("moe"), generate("dense"))
        return 0
    device = args.device
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {device}: no CUDA device here, skipped", file=sys.stderr)
        device = None
    work = DATA / "runs-moe"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    result = bench(args.r, args.threads, args.repeats, device, work)
    (work / "result.json").write_text(json.dumps(result, indent=2))
    text = render(result)
    print(text)
    if not args.no_write:
        write_results(text, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
