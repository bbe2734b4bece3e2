"""``lorasurg residualize``: a PiSSA/OLoRA residual base and its initial adapter, offline."""

from __future__ import annotations

import click

from ._app import (
    device_option, dtype_option, emit, for_option, force_option, json_option, main, max_memory_option, progress_bar,
    selection, to_option,
)


@main.command("residualize")
@click.argument("base", metavar="BASE")
@click.option("--init", "init", default="pissa", show_default=True, metavar="METHOD",
              help="pissa (exact SVD), pissa_niter_N (randomized SVD, N power iterations) or olora (QR).")
@click.option("--r", "r", type=click.IntRange(min=1), default=16, show_default=True,
              help="LoRA rank; clamped per module to min(out, in), and said so.")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True), default=None,
              help="lora_alpha; default R (scale 1).")
@click.option("--rslora", "use_rslora", is_flag=True, help="Scale alpha/sqrt(r) instead of alpha/r.")
@click.option("--target-modules", multiple=True, metavar="NAME",
              help="Layers to factor, by the model's names (names or suffixes, repeatable or comma-separated; one value "
                   "with regex characters is a regex); experts by their checkpoint names, or a fused 3-D expert tensor "
                   "(gpt-oss gate_up_proj) by its name. Default: every linear layer and expert except the output head "
                   "(all-linear).")
@click.option("--exclude-modules", multiple=True, metavar="NAME", help="Leave these modules out. Same syntax.")
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              help="Directory to write (model/, adapter/, README.md). Default: ./<BASE name>-<init>-r<R>.")
@dtype_option
@device_option
@max_memory_option(help=(
    "Peak memory of the whole process, Python and torch included (they take about 0.25 GB of it): it bounds the "
    "tensors held at once besides the adapter being built. The SVD/QR needs a target weight whole: a target whose "
    "working set does not fit is refused before anything is written, naming it, its working set and the smallest "
    "workable budget; other tensors larger than the budget are copied in row blocks, byte for byte."))
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of pissa_niter_N's random sketches (and of embedding inits).")
@for_option(help=(
    "Who will load OUT/adapter: peft, vllm, llama.cpp or all (comma-separated for several). Lossless only: the scale "
    "is rewritten (factors rescaled, or zero-padded to one rank for all); a consumer that cannot carry the whole "
    "initial adapter is refused before any work, naming the modules to --exclude-modules."))
@to_option(help=(
    "Output format of the initial adapter: a PEFT directory (OUT/adapter), or gguf: a llama.cpp GGUF LoRA file "
    "(OUT/adapter.gguf), written losslessly as for --for llama.cpp (what it cannot carry is refused before any work)."))
@force_option
@json_option
def residualize_command(base, init, r, alpha, use_rslora, target_modules, exclude_modules, output, dtype, device,
                        max_memory, seed, consumers, to, outtype, force, as_json) -> None:
    """Write OUT/model (BASE with each target weight replaced by its PiSSA/OLoRA residual) and OUT/adapter (the
    initial adapter): together they compute what BASE computes; train the adapter on the residual model.

    BASE is streamed one tensor at a time; untouched tensors and every non-weight file (config, tokenizer) are
    copied as they are. The adapter's config says init_lora_weights: true (PEFT would decompose the residual again
    on load otherwise); OUT/README.md and the adapter's safetensors metadata record where it came from.

    --for applies to OUT/adapter and is lossless: only how the scale is written changes (factors rescaled, or
    zero-padded to one rank for all), so OUT/model + OUT/adapter still compute BASE. A consumer that cannot carry
    the whole initial adapter (vLLM: embedding/lm_head or conv LoRA; llama.cpp: GPT-2 Conv1D or conv LoRA) is
    refused before any work, naming the modules to exclude: leaving a part out would break that sum.

    \b
    Examples:
      lorasurg residualize fixtures/tiny-llama/base --init pissa_niter_4 --r 8 -o out/pissa
      lorasurg residualize fixtures/tiny-llama/base --init olora --r 8 --rslora --for all -o out/olora-everywhere
    """
    from ..surgery.residualize import residualize

    report = residualize(
        base, output, init=init, r=r, alpha=alpha, use_rslora=use_rslora,
        target_modules=selection(target_modules), exclude_modules=selection(exclude_modules), dtype=dtype,
        device=device, seed=seed, force=force, progress=None if as_json else progress_bar("residualize"),
        consumers=consumers,
        max_memory=max_memory, to=to, outtype=outtype,
    )
    emit(report, as_json)
