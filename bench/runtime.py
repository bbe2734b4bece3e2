"""Forward+backward time of a LoRA-wrapped model: lorasurg's runtime against PEFT, side by side in one run.

Both wrap copies of one seeded base model with the same LoraConfig and carry identical adapter tensors (PEFT's
are copied into lorasurg's wrappers, key for key). Each repeat times one forward+backward of each, alternating
which goes first; the report gives the median of each and their ratio (lorasurg / PEFT; below 1 is faster).
Times are CPU time of the process (``time.process_time``), so other jobs on a shared machine disturb them less
than wall-clock time; keep ``--threads`` fixed (default 1).

    python bench/runtime.py                     # small Llama, LoRA on every linear layer
    python bench/runtime.py --dora --threads 1  # DoRA
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import peft  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from lorasurg.config import LoraConfig  # noqa: E402
from lorasurg.runtime import inject  # noqa: E402


def _models(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 2, num_hidden_layers=args.layers,
                      num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 64),
                      vocab_size=1000, max_position_embeddings=args.seq)
    base = LlamaForCausalLM(cfg)
    lora = dict(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear", use_dora=args.dora,
                lora_dropout=args.dropout, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**lora))
    ours = inject(copy.deepcopy(base), LoraConfig(**lora))
    ours.load_state_dict(theirs.base_model.model.state_dict())  # identical tensors, key for key
    return ours.train(), theirs.train()


def _step(model: torch.nn.Module, ids: torch.Tensor) -> float:
    start = time.process_time()  # CPU time of this process: robust to other jobs on a shared machine
    out = model(input_ids=ids).logits
    out.float().pow(2).mean().backward()
    elapsed = time.process_time() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--dora", action="store_true")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ours, theirs = _models(args)
    ids = torch.randint(0, 1000, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    for _ in range(args.warmup):
        _step(ours, ids), _step(theirs, ids)
    times: dict[str, list[float]] = {"lorasurg": [], "peft": []}
    for i in range(args.repeats):
        order = [("lorasurg", ours), ("peft", theirs)] if i % 2 == 0 else [("peft", theirs), ("lorasurg", ours)]
        for name, model in order:
            times[name].append(_step(model, ids))

    med = {name: statistics.median(t) for name, t in times.items()}
    setup = (f"Llama hidden={args.hidden} layers={args.layers}, batch {args.batch} x seq {args.seq}, LoRA r={args.r} "
             f"on all linear layers{' with DoRA' if args.dora else ''}, dropout={args.dropout}, "
             f"{args.threads} thread(s), {args.repeats} interleaved repeats after {args.warmup} warm-up")
    print(f"setup: {setup}")
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, peft {peft.__version__}")
    print("| runtime | median fwd+bwd CPU time (ms) | min (ms) |")
    print("|---|---|---|")
    for name in ("lorasurg", "peft"):
        print(f"| {name} | {1000 * med[name]:.1f} | {1000 * min(times[name]):.1f} |")
    print(f"ratio lorasurg / peft (median): {med['lorasurg'] / med['peft']:.3f}")


if __name__ == "__main__":
    main()
