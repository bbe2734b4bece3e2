"""``lorasurg inspect``: what is in an adapter."""

from __future__ import annotations

from typing import Optional

import click

from ._app import emit, json_option, main


@main.command("inspect")
@click.argument("adapter", metavar="ADAPTER")
@click.option("--base", metavar="BASE", help="The base model: delta norms are also given relative to its weights.")
@click.option("--plot", metavar="FILE.png", help="Draw the spectra and delta norms into this PNG (needs matplotlib).")
@click.option("--force", is_flag=True, help="Replace an existing --plot file.")
@json_option
def inspect_command(adapter: str, base: Optional[str], plot: Optional[str], force: bool, as_json: bool) -> None:
    """Show what is in an adapter: config, modules, ranks, scales, sizes, the spectrum of each module's delta,
    and any inconsistency.

    ADAPTER is a directory with adapter_config.json and adapter_model.safetensors (or .bin), or a hub repo id.
    Per module: ||scale * B @ A||_F (relative to the base weight with --base), its exact singular values (from
    the factors), effective rank and the ranks keeping 90% / 99% of its energy; then totals per layer type,
    trainable tokens (rows, indices, change from BASE's rows) and a layer_replication map.
    --plot needs matplotlib: pip install lorasurg[plot]. --force replaces an existing plot file.

    \b
    Example:
      lorasurg inspect out/extracted --base fixtures/tiny-llama/base --plot spectra.png
    """
    from ..surgery.inspect import inspect_adapter

    emit(inspect_adapter(adapter, base, plot=plot, force=force), as_json)
