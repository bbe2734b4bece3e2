"""The ``lorasurg`` group, the options its commands share, and how reports and errors are printed.

Each command parses its options, calls one function of :mod:`lorasurg.surgery`, and prints the report it
returns (``render()``, or ``to_dict()`` as JSON with ``--json``). A :class:`~lorasurg.errors.LorasurgError`
becomes a one-paragraph message on stderr and the error's exit code (2 for bad input or usage, 1 for
validation findings); no traceback reaches the user for a bad input. So does a failed ``OSError`` (exit 2), Ctrl-C
(exit 130) and SIGTERM (exit 143), after the outputs being written were removed.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import warnings
from typing import Any, Callable, Iterator, Optional

import click

from .. import __version__
from ..errors import LorasurgError
from ..surgery.report import Report

__all__ = [
    "main", "emit", "json_option", "force_option", "device_option", "dtype_option", "max_memory_option",
    "for_option", "selection", "progress_bar", "parse_for", "to_option", "gguf_base_option", "ignore_signals",
    "Terminated",
]

F = Callable[..., Any]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the signal arrives (as SIGINT raises ``KeyboardInterrupt``), so that every cleanup that
    runs on Ctrl-C (the atomic outputs' removal of what was half-written) runs for it too."""


class _Group(click.Group):
    """Turns lorasurg errors, failed I/O, Ctrl-C and SIGTERM into one-line messages and exit codes (2, 2, 130, 143);
    warnings are printed as one ``warning:`` line each."""

    def invoke(self, ctx: click.Context) -> Any:
        with _sigterm_raises(), _warnings_as_lines():
            try:
                return super().invoke(ctx)
            except LorasurgError as err:
                click.echo(f"error: {err.cli_message()}", err=True)
                ctx.exit(err.exit_code)
            except OSError as err:  # the machine's I/O failed (EIO, a file gone meanwhile): not a bug to trace
                where = f"{err.filename}: " if err.filename is not None else ""
                click.echo(f"error: {where}{err.strerror or err}", err=True)
                ctx.exit(2)
            except KeyboardInterrupt as err:
                terminated = isinstance(err, Terminated)
                click.echo(f"{'terminated' if terminated else 'interrupted'}: nothing was written", err=True)
                ctx.exit(128 + (signal.SIGTERM if terminated else signal.SIGINT))


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While a command runs, SIGTERM raises :class:`Terminated` (main thread only; the previous handler is put back)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum: int, frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """While a command runs, a warning is printed as ``warning: MESSAGE`` on stderr (not Python's two lines with the
    file and the source line)."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        click.echo(f"warning: {message}", err=True)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def ignore_signals() -> None:
    """Ignore Ctrl-C and SIGTERM from now on: the command is over, and one arriving while the interpreter shuts down
    (atexit callbacks) could only print a traceback."""
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_IGN)


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


class _SizeType(click.ParamType):
    """A memory size for the whole process (:class:`lorasurg.surgery.budget.WholeProcess`); a percentage is
    resolved against the memory available when the operation starts."""

    name = "SIZE"

    def convert(self, value: Any, param, ctx) -> Any:
        from ..errors import ConfigError
        from ..surgery.budget import WholeProcess, parse_size

        if isinstance(value, WholeProcess):
            return value
        try:
            parse_size(value, available=1 << 40)  # syntax only; the operation resolves the size itself
        except ConfigError as err:
            self.fail(str(err).replace("--max-memory ", "", 1), param, ctx)
        return WholeProcess(str(value))


def max_memory_option(f: Optional[F] = None, *, help: Optional[str] = None) -> Any:
    """``--max-memory SIZE``: the memory budget (see :mod:`lorasurg.surgery.budget`); ``help`` replaces the text
    where a command uses the budget differently (``@max_memory_option(help=...)``).

    The value is a :class:`~lorasurg.surgery.budget.WholeProcess` (or None for the default); a command passes it
    on unchanged as its surgery function's ``max_memory=``, which resolves it with
    :meth:`lorasurg.surgery.budget.MemoryBudget.resolve`.
    """
    from ..surgery.budget import DEFAULT_MAX_MEMORY

    if f is None:
        return lambda g: max_memory_option(g, help=help)
    text = help or (
        "Peak memory of the whole process, Python and torch included (they take about 0.25 GB of it): a tensor whose "
        "work fits in the rest is processed in memory from one read, a larger one is streamed from disk in row "
        "blocks."
    )
    return click.option(
        "--max-memory",
        "max_memory",
        type=_SizeType(),
        default=None,
        metavar="SIZE",
        help=f"{text} SIZE: 500MB, 2GB, 1.5GiB, a number of bytes, or N% (a share of the memory available at start, "
             f"for the tensors). Default: {DEFAULT_MAX_MEMORY} of the memory available at start.",
    )(f)


def parse_for(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    from ..consumers import parse_consumers
    from ..errors import ConfigError

    try:
        return parse_consumers(value, hidden=False)
    except ConfigError as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from err


def for_option(f: Optional[F] = None, *, help: Optional[str] = None) -> Any:
    """``--for peft|vllm|llama.cpp|all`` (comma lists allowed) -> parameter ``consumers``: a tuple of names; ``help``
    replaces the text where a command treats what a consumer cannot carry differently (``@for_option(help=...)``).

    A command that writes an adapter passes it to :func:`lorasurg.consumers.prepare_for` (or to a surgery
    function that does) and puts the returned report's ``render()``/``to_dict()`` into its own.
    """
    if f is None:
        return lambda g: for_option(g, help=help)
    return click.option(
        "--for", "consumers", default="peft", show_default=True, metavar="CONSUMERS", callback=parse_for,
        help=help or "Who will load the adapter: peft, vllm, llama.cpp or all (comma-separated for several). The "
                     "output is written so that each computes PEFT's per-module delta; what one cannot carry is left "
                     "out and listed.",
    )(f)


def to_option(f: Optional[F] = None, *, help: Optional[str] = None) -> Any:
    """``--to peft|gguf`` -> parameter ``to``, with ``--outtype`` -> ``outtype`` (see
    :mod:`lorasurg.surgery.export.output`); ``help`` replaces ``--to``'s text where a command treats what llama.cpp
    cannot carry differently (``@to_option(help=...)``)."""
    if f is None:
        return lambda g: to_option(g, help=help)
    f = click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default="f32", show_default=True,
                     help="With --to gguf: the tensor type of the GGUF file (q8_0 writes rows that are not a multiple "
                          "of 32 as f16, as llama.cpp's converter does).")(f)
    return click.option(
        "--to", "to", type=click.Choice(["peft", "gguf"]), default="peft", show_default=True,
        help=help or "Output format: a PEFT adapter directory, or gguf: a llama.cpp GGUF LoRA file at -o (written "
                     "for llama.cpp: what it cannot carry is left out and listed).",
    )(f)


def gguf_base_option(f: F) -> F:
    """``--base BASE`` for commands that read adapters only: what a GGUF file needs to know of the base model."""
    return click.option(
        "--base", "base", metavar="BASE", default=None,
        help="With --to gguf: the base model (directory, file or hub id), only its config.json is read, for what the "
             "adapter does not say (architecture, head tying, heads, experts). Default: the adapter's "
             "base_model_name_or_path when it is a local directory.",
    )(f)


def emit(report: Report, as_json: bool) -> None:
    """Print a report as text or JSON on stdout, ending with exactly one newline (a prompt starts on a new line)."""
    text = json.dumps(report.to_dict(), indent=2, sort_keys=False) if as_json else report.render()
    click.echo(text.rstrip("\n"))


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


_REGEX_CHARS = set("^$*+?()[]{}|\\")


def selection(values: tuple[str, ...]):
    """Repeated --target-modules/--exclude-modules values: a list of names, or one regex string."""
    if not values:
        return None
    if len(values) == 1 and _REGEX_CHARS & set(values[0]):
        return values[0]
    return [name for value in values for name in value.split(",") if name]


def progress_bar(desc: str):
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
