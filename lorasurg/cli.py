"""The ``lorasurg`` command line: a thin table of library calls.

Each command parses its options, calls one function of :mod:`lorasurg.surgery`, and prints the report it
returns (``render()``, or ``to_dict()`` as JSON with ``--json``). A :class:`~lorasurg.errors.LorasurgError`
becomes a one-paragraph message on stderr and the error's exit code (2 for bad input or usage, 1 for
validation findings); no traceback reaches the user for a bad input.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

import click

from . import __version__
from .errors import LorasurgError
from .surgery.report import Report

__all__ = ["main", "emit", "json_option", "force_option", "device_option", "dtype_option"]

F = Callable[..., Any]


class _Group(click.Group):
    """Turns lorasurg errors and Ctrl-C into clean messages and exit codes."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LorasurgError as err:
            click.echo(f"error: {err}", err=True)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written", err=True)
            ctx.exit(130)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of text.")(f)


def force_option(f: F) -> F:
    return click.option("--force", is_flag=True, help="Replace an existing, non-empty output directory.")(f)


def device_option(f: F) -> F:
    return click.option(
        "--device",
        default="auto",
        show_default=True,
        help="Where the arithmetic runs: auto (CUDA when present), cpu, cuda or cuda:N.",
    )(f)


def dtype_option(f: F) -> F:
    return click.option(
        "--dtype",
        type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
        default="auto",
        show_default=True,
        help="Dtype of the written tensors; auto keeps the input's dtype.",
    )(f)


def emit(report: Report, as_json: bool) -> None:
    """Print a report as text or JSON on stdout."""
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, sort_keys=False))
    else:
        click.echo(report.render())


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", "-V", prog_name="lorasurg")
def main() -> None:
    """Offline surgery on LoRA adapters, in Hugging Face PEFT's format.

    Every command reads checkpoints (a directory, a sharded checkpoint, a .safetensors or .bin file, or a
    hub repo id) and adapters (adapter_config.json + adapter_model.safetensors), and writes outputs that
    PEFT loads as they are. Outputs are written atomically and never overwrite anything without --force.

    \b
    Examples:
      lorasurg extract fixtures/tiny-llama/base fixtures/tiny-llama/tuned -o out/extracted --r 8
      lorasurg inspect out/extracted

    Run `lorasurg COMMAND --help` for a command's options.
    """


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
    from .surgery.inspect import inspect_adapter

    emit(inspect_adapter(adapter), as_json)


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
@click.option("--embeddings", type=click.Choice(["lora", "full", "skip"]), default="lora", show_default=True,
              help="Changed embeddings: LoRA factors, saved in full (modules_to_save), or left out (listed).")
@click.option("--lora-bias/--no-lora-bias", default=None,
              help="Carry bias deltas of LoRA layers as lora_B.bias. Default: on iff one changed.")
@click.option("--svd", type=click.Choice(["randomized", "exact"]), default="randomized", show_default=True,
              help="Randomized SVD (seeded, within 1% of optimal) or exact SVD.")
@device_option
@dtype_option
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVD.")
@click.option("--serving", is_flag=True,
              help="Write only LoRA factors on linear layers (what vLLM-style servers accept); list the rest.")
@click.option("--allow-empty", is_flag=True, help="For identical checkpoints, write a no-op adapter instead of failing.")
@force_option
@json_option
def extract_command(base: str, tuned: str, output, r, alpha, rank_policy, target_modules, exclude_modules,
                    embeddings, lora_bias, svd, device, dtype, seed, serving, allow_empty, force, as_json) -> None:
    """Extract a LoRA adapter from a full fine-tune: TUNED ~ BASE + adapter, by truncated SVD of each delta.

    BASE and TUNED are checkpoints (a directory, a sharded checkpoint, a .safetensors or .bin file, or a
    hub repo id) of the same architecture. Every tensor that differs is accounted for in the report:
    LoRA factors, lora_B.bias, modules_to_save, or dropped with its share of the delta.

    \b
    Example:
      lorasurg extract fixtures/tiny-llama/base fixtures/tiny-llama/tuned -o out/extracted --r 8
    """
    from .surgery.extract import extract_to_dir

    report = extract_to_dir(
        base, tuned, output, force=force, r=r, alpha=alpha, rank_policy=rank_policy,
        target_modules=_selection(target_modules), exclude_modules=_selection(exclude_modules),
        embeddings=embeddings, lora_bias=lora_bias, svd=svd, device=device, dtype=dtype, seed=seed,
        serving=serving, allow_empty=allow_empty, progress=None if as_json else _progress_bar("extract"),
    )
    emit(report, as_json)


_REGEX_CHARS = set("^$*+?()[]{}|\\")


def _selection(values: tuple[str, ...]):
    """Repeated --target-modules/--exclude-modules values: a list of names, or one regex string."""
    if not values:
        return None
    if len(values) == 1 and _REGEX_CHARS & set(values[0]):
        return values[0]
    return [name for value in values for name in value.split(",") if name]


def _progress_bar(desc: str):
    """A progress callback drawing a tqdm bar with ETA on stderr when it is a terminal, else None."""
    if not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    bar = None

    def update(done: int, total: int, name: str) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit="param", unit_scale=True, leave=False, file=sys.stderr)
        bar.update(done - bar.n)
        bar.set_postfix_str(name[-40:], refresh=False)
        if done >= total:
            bar.close()

    return update


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
