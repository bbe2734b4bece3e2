"""``lorasurg extract``: a LoRA adapter from a full fine-tune."""

from __future__ import annotations

import click

from ._app import (
    device_option, dtype_option, emit, for_option, force_option, json_option, main, max_memory_option,
    progress_bar, selection, to_option,
)


@main.command("extract")
@click.argument("base", metavar="BASE")
@click.argument("tuned", metavar="TUNED")
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              help="Adapter directory to write. Default: ./<TUNED name>-lora-r<R> (printed).")
@click.option("--r", "r", type=click.IntRange(min=1), default=16, show_default=True,
              help="LoRA rank (the cap for --rank-policy); clamped per module to min(out, in), and said so.")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True), default=None,
              help="lora_alpha for rank R; default R (scale 1). Every module keeps the scale alpha/R.")
@click.option("--rank-policy", default=None, metavar="POLICY",
              help="Per-module rank: energy:F, sv_ratio:X, sv_fro:F, sv_cumulative:F, sv_epsilon:E (capped by --r).")
@click.option("--target-modules", multiple=True, metavar="NAME",
              help="Fit only these layers (names or suffixes, repeatable or comma-separated; one value with regex "
                   "characters is a regex). Default: every changed LoRA-able layer.")
@click.option("--exclude-modules", multiple=True, metavar="NAME",
              help="Leave these modules out (their changes are listed as dropped). Same syntax as --target-modules.")
@click.option("--embeddings", type=click.Choice(["auto", "tokens", "lora", "full", "skip"]), default="auto",
              show_default=True,
              help="Changed embedding layers (input embedding, output head): tokens = trainable_token_indices (the "
                   "changed rows, exact), lora = LoRA factors, full = saved whole (modules_to_save), skip = left out "
                   "(listed); auto = tokens when no larger than the LoRA, else the LoRA (both sizes reported). "
                   "TUNED may add rows (a resized vocabulary) except with lora.")
@click.option("--lora-bias/--no-lora-bias", default=None,
              help="Carry bias deltas of LoRA layers as lora_B.bias. Default: on iff one changed.")
@click.option("--svd", type=click.Choice(["randomized", "exact"]), default="randomized", show_default=True,
              help="Randomized SVD (seeded, within 1% of optimal) or exact SVD.")
@device_option
@dtype_option
@max_memory_option
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVD.")
@for_option
@to_option
@click.option("--serving", is_flag=True, help="An alias of --for vllm (added to --for when both are given).")
@click.option("--allow-empty", is_flag=True, help="For identical checkpoints, write a no-op adapter instead of failing.")
@click.option("--allow-dropped", is_flag=True,
              help="Write the adapter although changed tensors it cannot carry are left out (a key the model has no "
                   "place for, a bias PEFT cannot load beside target_parameters); they are listed. Without it "
                   "extract fails (exit 2) naming them, and writes nothing.")
@force_option
@json_option
def extract_command(base: str, tuned: str, output, r, alpha, rank_policy, target_modules, exclude_modules,
                    embeddings, lora_bias, svd, device, dtype, max_memory, seed, consumers, to, outtype, serving,
                    allow_empty, allow_dropped, force, as_json) -> None:
    """Extract a LoRA adapter from a full fine-tune: TUNED ~ BASE + adapter, by truncated SVD of each delta.

    BASE and TUNED are checkpoints (a directory, a sharded checkpoint, a .safetensors or .bin file, or a
    hub repo id) of the same architecture. Every tensor that differs is accounted for in the report:
    LoRA factors, lora_B.bias, modules_to_save, or dropped with its share of the delta. With --for, the
    adapter is written so that vLLM and/or llama.cpp compute the same per-module delta as PEFT, and the
    report lists what each of them leaves out.

    \b
    Examples:
      lorasurg extract fixtures/tiny-llama/base fixtures/tiny-llama/tuned -o out/extracted --r 8
      lorasurg extract fixtures/tiny-llama/base fixtures/tiny-llama/tuned -o out/gguf-ready --for llama.cpp
      lorasurg extract fixtures/tiny-llama/base fixtures/tiny-llama/tuned -o out/extracted.gguf --to gguf
    """
    from ..surgery.extract import extract_to_dir

    report = extract_to_dir(
        base, tuned, output, force=force, r=r, alpha=alpha, rank_policy=rank_policy,
        target_modules=selection(target_modules), exclude_modules=selection(exclude_modules),
        embeddings=embeddings, lora_bias=lora_bias, svd=svd, device=device, dtype=dtype, seed=seed,
        consumers=consumers, serving=serving, allow_empty=allow_empty, allow_dropped=allow_dropped,
        progress=None if as_json else progress_bar("extract"), max_memory=max_memory, to=to, outtype=outtype,
    )
    emit(report, as_json)
