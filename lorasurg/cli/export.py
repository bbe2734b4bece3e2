"""``lorasurg export``: an adapter as a llama.cpp GGUF LoRA file."""

from __future__ import annotations

import click

from ._app import emit, force_option, json_option, main


@main.command("export")
@click.argument("adapter", metavar="ADAPTER")
@click.option("--to", "to", type=click.Choice(["gguf"]), required=True,
              help="The format to write: gguf, a llama.cpp (llama-cli, llama-server, Ollama) LoRA adapter file.")
@click.option("--base", metavar="BASE", default=None,
              help="The base model (directory, file or hub id); only its config.json is read, for what the adapter "
                   "does not say (architecture, head tying, attention heads, experts). Default: the adapter's "
                   "base_model_name_or_path when it is a local directory.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="The .gguf file to write. Default: ./<ADAPTER name>.gguf (printed).")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default="f32", show_default=True,
              help="Tensor type (q8_0 writes rows that are not a multiple of 32 as f16, as llama.cpp's converter "
                   "does).")
@force_option
@json_option
def export_command(adapter: str, to: str, base, output, outtype: str, force: bool, as_json: bool) -> None:
    """Write ADAPTER (a PEFT adapter directory or hub id) as a GGUF LoRA file that llama.cpp loads with --lora and
    applies as PEFT does: the factors are scaled so that llama.cpp's alpha / r gives every module PEFT's scale, laid
    out as its loader reads them, streamed one tensor at a time.

    What llama.cpp cannot carry (lora_B.bias, DoRA magnitudes, conv LoRA, a LoRA on a tied head, position
    embeddings, saved norms) is left out and listed with its share of the delta's energy. Refused: whole embeddings
    or heads in modules_to_save (fuse, then convert the fused model), architectures with no GGUF name map, MoE
    layers with experts missing or of unequal ranks.

    \b
    Examples:
      lorasurg export out/llama-r8 --to gguf --base fixtures/tiny-llama/base -o out/llama-r8.gguf
      lorasurg export out/qwen2-energy --to gguf --outtype q8_0 -o out/qwen2.gguf
    """
    from ..surgery.export import export_gguf

    emit(export_gguf(adapter, output, base=base, outtype=outtype, force=force), as_json)
