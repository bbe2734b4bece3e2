"""``lorasurg inspect``: what is in an adapter."""

from __future__ import annotations

import click

from ._app import emit, json_option, main


@main.command("inspect")
@click.argument("adapter", metavar="ADAPTER")
@json_option
def inspect_command(adapter: str, as_json: bool) -> None:
    """Show what is in an adapter: config, modules, ranks, scales, sizes, and any inconsistency.

    ADAPTER is a directory with adapter_config.json and adapter_model.safetensors (or .bin), or a hub repo id.

    \b
    Example:
      lorasurg inspect out/extracted --json
    """
    from ..surgery.inspect import inspect_adapter

    emit(inspect_adapter(adapter), as_json)
