"""``lorasurg fuse``: an adapter merged into a checkpoint."""

from __future__ import annotations

import click

from ._app import device_option, dtype_option, emit, force_option, json_option, main, max_memory_option, progress_bar


@main.command("fuse")
@click.argument("base", metavar="BASE")
@click.argument("adapter", metavar="ADAPTER")
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              help="Model directory to write. Default: ./<BASE name>-fused.")
@dtype_option
@device_option
@max_memory_option
@click.option("--drop-unfusable-bias", is_flag=True,
              help="Leave out lora_B biases on layers the architecture cannot give a bias (listed with their norms) "
                   "instead of refusing.")
@force_option
@json_option
def fuse_command(base, adapter, output, dtype, device, max_memory, drop_unfusable_bias, force, as_json) -> None:
    """Write BASE with ADAPTER merged in, laid out like BASE (tensor names, dtypes, shards, non-weight files):
    plain LoRA, rsLoRA, rank/alpha patterns, DoRA, lora_bias, embedding and conv LoRA, modules_to_save, tied
    embeddings, trainable tokens (rows written in; a vocabulary the adapter grows grows, vocab_size updated) and
    layer_replication (the replicated layers written out and renumbered, num_hidden_layers updated). Transformers
    loads the result with from_pretrained.

    Mixtures of experts and multimodal models: adapters in every layout PEFT loads on transformers 5 (the model's
    names, per-expert LoRA, target_parameters on fused 3-D experts), merged into BASE's own keys (per-expert keys,
    gpt-oss's fused tensors, renamed towers). A module or expert BASE has no place for is refused, named.

    \b
    Example:
      lorasurg fuse fixtures/tiny-llama/base out/llama-r8 -o out/llama-fused
      lorasurg fuse out/gpt-oss-pissa/model out/gpt-oss-pissa/adapter -o out/gpt-oss-fused
    """
    from ..surgery.fuse import fuse

    report = fuse(base, adapter, output, dtype=dtype, device=device, drop_unfusable_bias=drop_unfusable_bias,
                  force=force, progress=None if as_json else progress_bar("fuse"), max_memory=max_memory)
    emit(report, as_json)
