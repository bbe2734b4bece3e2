"""``lorasurg rerank``: an adapter at another rank, optimally, from its factors alone."""

from __future__ import annotations

import click

from ._app import emit, for_option, force_option, gguf_base_option, json_option, main, to_option


@main.command("rerank")
@click.argument("adapter", metavar="ADAPTER")
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              help="Adapter directory to write. Default: ./<ADAPTER name>-r<N> (printed).")
@click.option("--r", "r", type=int, default=None,
              help="New rank of every module (the cap for --rank-policy). Below a module's rank: optimal truncation; "
                   "above: zero-padded, lossless; clamped to min(out, in), and said so.")
@click.option("--rank-policy", default=None, metavar="POLICY",
              help="Per-module rank from each module's spectrum: energy:F, sv_ratio:X, sv_fro:F, sv_cumulative:F, "
                   "sv_epsilon:E (capped by --r, default the module's rank).")
@for_option
@to_option
@gguf_base_option
@force_option
@json_option
def rerank_command(adapter: str, output, r, rank_policy, consumers, to, outtype, base, force, as_json) -> None:
    """Change an adapter's rank: the best rank-N approximation of every module's delta (Eckart-Young),
    computed exactly from the factors, with every module keeping its scale.

    ADAPTER is a directory with adapter_config.json and adapter_model.safetensors (or .bin), or a hub repo id.
    Give --r N, --rank-policy P, or both. lora_B.bias, DoRA magnitudes and modules_to_save carry over unchanged
    (with --for, what a named consumer cannot carry is left out and listed).

    \b
    Examples:
      lorasurg rerank out/llama-r8 --r 4 -o out/llama-r4
      lorasurg rerank out/qwen2-energy --rank-policy energy:0.9 --for llama.cpp -o out/qwen2-gguf
      lorasurg rerank out/llama-r8 --r 4 --to gguf -o out/llama-r4.gguf
    """
    from ..surgery.rerank import rerank_to_dir

    emit(rerank_to_dir(adapter, output, force=force, r=r, rank_policy=rank_policy, consumers=consumers, to=to,
                       base=base, outtype=outtype), as_json)
