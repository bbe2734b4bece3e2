"""``lorasurg convert``: a trained PiSSA/OLoRA adapter as a plain LoRA for the original base."""

from __future__ import annotations

import click

from ._app import emit, for_option, force_option, gguf_base_option, json_option, main, to_option


@main.command("convert")
@click.argument("trained", metavar="TRAINED")
@click.option("--initial", required=True, metavar="INIT",
              help="The adapter's initial state: residualize's OUT/adapter, or the adapter PEFT saved before training.")
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              help="Adapter directory to write. Default: ./<TRAINED name>-lora.")
@click.option("--r", "r", type=click.IntRange(min=1), default=None,
              help="Re-rank every module to R by the exact SVD of its stacked factors (energy kept is reported). "
                   "Default: the exact conversion, rank 2r.")
@for_option
@to_option
@gguf_base_option
@force_option
@json_option
def convert_command(trained, initial, output, r, consumers, to, outtype, base, force, as_json) -> None:
    """Turn a trained PiSSA/OLoRA adapter into a plain LoRA that gives the trained model's outputs on the
    ORIGINAL base: dW = s (B A - B0 A0) = s [B | -B0] [A ; A0], rank 2r, alpha adjusted so the scale is
    unchanged (rsLoRA and rank/alpha patterns included; DoRA magnitudes kept). With --for, it is written so
    that each named consumer computes PEFT's per-module delta (what one cannot carry is left out and listed).

    \b
    Examples:
      lorasurg convert fixtures/tiny-llama/pissa/trained --initial fixtures/tiny-llama/pissa/adapter -o out/pissa-lora
      lorasurg convert fixtures/tiny-llama/pissa/trained --initial fixtures/tiny-llama/pissa/adapter --r 4 --for all \
          -o out/pissa-lora-served
    """
    from ..surgery.convert import convert_to_dir

    emit(convert_to_dir(trained, initial, output, r=r, force=force, consumers=consumers, to=to, base=base,
                        outtype=outtype), as_json)
