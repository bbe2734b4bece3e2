"""Benchmark: ``lorasurg fuse`` against PEFT's ``merge_and_unload`` + ``save_pretrained`` on the same pair.

BASE is bench/extract.py's Llama-shaped checkpoint (~600 MB, bf16, two shards; generated once under
bench/.data/llama/). The adapter is a seeded random LoRA, r=16, alpha=32, on every linear layer but lm_head (float32
factors, as PEFT trains them), written once to bench/.data/fuse-adapter/. Two tools, each in its own subprocess with
the same thread count (``--threads``, default 2):

* ``lorasurg fuse BASE ADAPTER -o OUT``;
* PEFT: ``from_pretrained(dtype=bfloat16)``, ``PeftModel.from_pretrained``, ``merge_and_unload()``,
  ``save_pretrained``: what a user writes to ship a merged model.

``--repeats`` runs each, alternating which goes first; the median wall time and the largest peak RSS are reported,
and the two fused checkpoints are compared tensor by tensor (``||ours - theirs|| / ||theirs||``, maximum).

    python bench/fuse.py                 # runs, prints, updates bench/RESULTS.md
    python bench/fuse.py --repeats 1 --no-write
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
from extract import DATA, ROOT, _dir_bytes, generate, write_results  # noqa: E402
from _measure import measure  # noqa: E402

sys.path.insert(0, str(ROOT))
SECTION = "## Fuse vs PEFT merge_and_unload + save_pretrained (issue 8)"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base: Path, r: int) -> Path:
    """A seeded random rank-``r`` adapter on every linear layer but lm_head (reused when present)."""
    from lorasurg.config import LoraConfig
    from lorasurg.io.adapter import Adapter, AdapterModule
    from lorasurg.io.checkpoint import Checkpoint

    out = DATA / f"fuse-adapter-r{r}"
    if (out / "adapter_config.json").is_file():
        return out
    gen = torch.Generator().manual_seed(0)
    modules = {}
    with Checkpoint.open(base) as ckpt:
        for name in ckpt.names():
            module = name[: -len(".weight")]
            if name.endswith(".weight") and module.rsplit(".", 1)[-1] in TARGETS:
                rows, cols = ckpt.shape(name)
                A = torch.randn(r, cols, generator=gen) / cols**0.5  # (r, in)
                B = torch.randn(rows, r, generator=gen) * 0.01  # (out, r)
                modules[module] = AdapterModule(module, A, B)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, base_model_name_or_path=str(base),
                        task_type="CAUSAL_LM")
    Adapter(config, modules).save(out, force=True)
    return out


def peft_run(base: Path, adapter: Path, out: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out)


def compare(ours: Path, theirs: Path) -> dict:
    from lorasurg.io.checkpoint import Checkpoint

    worst, name_of = 0.0, None
    with Checkpoint.open(ours) as a, Checkpoint.open(theirs) as b:
        assert set(a.names()) == set(b.names()), "the two fused checkpoints hold different tensors"
        for name in a.names():
            x, y = a.get(name, dtype=torch.float64), b.get(name, dtype=torch.float64)
            rel = float(torch.linalg.vector_norm(x - y) / max(float(torch.linalg.vector_norm(y)), 1e-30))
            if rel > worst:
                worst, name_of = rel, name
        dtypes = {str(a.dtype(n)) for n in a.names()}, {str(b.dtype(n)) for n in b.names()}
    return {"max_relative_difference": worst, "where": name_of, "tensors": len(a.names()),
            "dtypes": [sorted(d) for d in dtypes]}


def bench(r: int, threads: int, repeats: int) -> dict:
    base, _ = generate("llama")
    adapter = make_adapter(base, r)
    work = DATA / "runs-fuse"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    outs = {"lorasurg fuse": work / "lorasurg", "peft merge_and_unload": work / "peft"}
    cmds = {
        "lorasurg fuse": [sys.executable, "-m", "lorasurg.cli", "fuse", str(base), str(adapter), "-o",
                          str(outs["lorasurg fuse"]), "--device", "cpu", "--json", "--force"],
        "peft merge_and_unload": [sys.executable, str(Path(__file__)), "--peft-run", str(base), str(adapter),
                                  str(outs["peft merge_and_unload"])],
    }
    measured = measure({tool: (cmd, outs[tool]) for tool, cmd in cmds.items()}, repeats, threads, work)
    result = {"r": r, "threads": threads, "repeats": repeats, "checkpoint_bytes": _dir_bytes(base),
              "loads": measured["loads"], "tools": measured["tools"]}
    for tool, out in outs.items():
        result["tools"][tool]["files"] = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if all(t["rc"] == 0 for t in result["tools"].values()):
        result["compare"] = compare(outs["lorasurg fuse"], outs["peft merge_and_unload"])
    (work / "result.json").write_text(json.dumps(result, indent=2))
    return result


def render(res: dict) -> str:
    ours, peft = res["tools"]["lorasurg fuse"], res["tools"]["peft merge_and_unload"]
    lines = [
        SECTION, "",
        f"`python bench/fuse.py --repeats {res['repeats']}` on {time.strftime('%Y-%m-%d')}: bench/extract.py's "
        f"Llama-shaped base ({res['checkpoint_bytes'] / 1e6:.0f} MB, bf16, 2 shards) and a seeded random adapter, "
        f"r={res['r']}, alpha={2 * res['r']}, on all 28 linear layers but lm_head (float32 factors). Machine: "
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), shared with other sessions, no "
        f"GPU; torch {torch.__version__}; both tools limited to {res['threads']} threads. Load average (1 min) at each "
        f"start: {', '.join(res['loads'])}. Wall: median of the runs, alternating which tool goes first; peak RSS: "
        "largest of the runs.", "",
        "| tool | wall (median) | runs | peak RSS | files written |",
        "|---|---|---|---|---|",
    ]
    for tool, v in res["tools"].items():
        lines.append(f"| {tool} | {v['wall_s']:.1f} s | {', '.join(f'{w:.1f}' for w in v['walls'])} s | "
                     f"{v['peak_rss'] / 2**20:.0f} MiB | {', '.join(v['files'])} |")
    lines += ["", f"lorasurg fuse: {peft['wall_s'] / ours['wall_s']:.2f}x PEFT's speed, "
                  f"{ours['peak_rss'] / peft['peak_rss']:.2f}x its peak RSS."]
    c = res.get("compare")
    if c:
        same = ("are bitwise identical" if c["max_relative_difference"] == 0 else
                f"differ by at most {c['max_relative_difference']:.2e} relative ({c['where']}), bf16 rounding")
        lines.append(f"The two fused checkpoints hold the same {c['tensors']} tensors, all "
                     f"{', '.join(t.replace('torch.', '') for t in c['dtypes'][0])} on both sides, and {same}; "
                     "lorasurg keeps BASE's two shards, transformers writes one file (and a generation_config.json "
                     "BASE does not have).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print, do not touch bench/RESULTS.md")
    parser.add_argument("--peft-run", nargs=3, metavar=("BASE", "ADAPTER", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--render", type=Path, help="render a saved result.json instead of running")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.peft_run:
        peft_run(*(Path(p) for p in args.peft_run))
        return 0
    result = json.loads(args.render.read_text()) if args.render else bench(args.r, args.threads, args.repeats)
    text = render(result)
    print(text)
    if not args.no_write:
        write_results(text, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
