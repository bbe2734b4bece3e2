"""``lorasurg validate``: what is wrong with an adapter or a config, and a corrected copy with ``--fix``."""

from __future__ import annotations

from typing import Optional

import click

from ..errors import ValidationFailed
from ._app import parse_for, emit, force_option, json_option, main


@main.command("validate")
@click.argument("path", metavar="PATH")
@click.option("--base", metavar="BASE", help="The base model (directory, weights file or hub id) to check against.")
@click.option(
    "--for", "consumers", default="peft", show_default=True, metavar="CONSUMERS", callback=parse_for,
    help="Also check how these will read the adapter: vllm, llama.cpp, all or peft (comma-separated for several): "
         "what each refuses, drops silently, misreads or scales differently from PEFT. peft: PEFT's rules only.",
)
@click.option("--fix", "fix", is_flag=True,
              help="Write a corrected copy (safe fixes only) to -o OUT. It is not rewritten for --for consumers: "
                   "--for on the commands that write adapters (extract), or lorasurg.prepare_for, does that.")
@click.option("-o", "--output", metavar="OUT", help="Where --fix writes the corrected copy.")
@force_option
@json_option
def validate_command(path: str, base: Optional[str], consumers: tuple[str, ...], fix: bool, output: Optional[str],
                     force: bool, as_json: bool) -> None:
    """Check an adapter (or a config) against PEFT's rules and, with --base, against its base model.

    PATH is an adapter directory, its adapter_config.json (the config alone), or a hub repo id. Each
    finding has a severity, a stable code (listed in the README), the module or key, the evidence and what
    to do. Exit status: 0 without errors, 1 with errors, 2 when validation could not run.

    --fix -o OUT writes a corrected copy for the safe fixes (lora_bias when the tensors are there,
    init_lora_weights true, tensors of untargeted modules dropped, a pattern key anchored to the one module
    it was meant for, .bin as safetensors), never changing a tensor's values, lists the changes and
    validates the copy; the exit status then says whether the copy has errors.

    --for vllm,llama.cpp (or all) also reports, for each consumer named, what it refuses, what it drops
    silently, and on which modules it applies another scale than PEFT, with the factor (errors), and what
    depends on the model or the serving settings (warnings). --fix does not rewrite for them: write the
    adapter with --for (extract), or call lorasurg.prepare_for.

    \b
    Examples:
      lorasurg validate out/extracted --base fixtures/tiny-llama/base
      lorasurg validate my-adapter --fix -o my-adapter-fixed --json
      lorasurg validate out/extracted --base fixtures/tiny-llama/base --for vllm,llama.cpp
    """
    from ..surgery.validate import validate_adapter

    if fix != (output is not None):
        raise click.UsageError("--fix and -o/--output go together: --fix -o OUT")
    report = validate_adapter(path, base, consumers=consumers, fix_output=output, force=force)
    emit(report, as_json)
    if report.errors:
        raise ValidationFailed(f"{report.errors} error(s) found" + (" in the fixed copy" if report.fix else ""))
