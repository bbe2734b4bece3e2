"""``lorasurg merge``: several adapters into one, by any of PEFT's add_weighted_adapter combination types."""

from __future__ import annotations

import click

from ..engine.combine import METHODS
from ..errors import ConfigError
from ._app import emit, for_option, force_option, gguf_base_option, json_option, main, to_option


def _weights(text):
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",") if w.strip()]
    except ValueError as err:
        raise ConfigError(f"--weights {text!r}: give numbers separated by commas, one per adapter (e.g. 0.7,0.3)") from err


@main.command("merge")
@click.argument("adapters", nargs=-1, required=True, metavar="A [B ...]")
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              help="Adapter directory to write. Default: ./<A>+<B>...-<method> (printed).")
@click.option("--weights", default=None, metavar="W1,W2,...",
              help="One weight per adapter, comma-separated, any sign. Default: equal, 1/n each (the mean).")
@click.option("--method", type=click.Choice(list(METHODS)), default="svd", show_default=True,
              help="PEFT's combination type. svd and cat are the exact weighted sum of the deltas (svd truncated "
                   "optimally to --r); linear/ties/dare_*/magnitude_prune combine A and B separately; the *_svd "
                   "variants trim the dense deltas, then truncate.")
@click.option("--r", "r", type=int, default=None,
              help="New rank for the svd methods. Default: the largest input rank (PEFT's default).")
@click.option("--density", type=float, default=None,
              help="Fraction of entries each adapter keeps, in (0, 1]: ties, dare_*, magnitude_prune* need it.")
@click.option("--majority-sign", type=click.Choice(["total", "frequency"]), default=None,
              help="How ties and dare_ties elect the sign of an entry. Default: total.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the dare methods' random drops; the other methods draw nothing, and their report's seed "
                   "is null.")
@for_option
@to_option
@gguf_base_option
@force_option
@json_option
def merge_command(adapters, output, weights, method, r, density, majority_sign, seed, consumers, to, outtype, base,
                  force, as_json) -> None:
    """Merge adapters A B [C ...] into one, offline, from the adapter files alone (no base model). One adapter is
    taken too, as PEFT's add_weighted_adapter takes it: --weights W scales its delta (default 1: the same delta at
    scale 1, re-expressed by the method).

    Each input is read at its own scale (alpha/r or alpha/sqrt(r), rank and alpha patterns applied); a module
    missing from an input counts as zero there; lora_B.bias deltas add with the same weights. The result has
    scale 1 on every module. DoRA adapters are refused (their merge needs the base weights). With --for, the
    result is written so that each named consumer computes PEFT's per-module delta (what one cannot carry is
    left out and listed).

    \b
    Examples:
      lorasurg merge out/llama-r8 out/llama-r4 --weights 0.7,0.3 -o out/merged
      lorasurg merge out/llama-r8 out/llama-r4 --method cat --for all -o out/merged-everywhere
    """
    from ..surgery.merge import merge_to_dir

    report = merge_to_dir(list(adapters), output, _weights(weights), force=force, method=method, r=r,
                          density=density, majority_sign=majority_sign, seed=seed, consumers=consumers, to=to,
                          base=base, outtype=outtype)
    emit(report, as_json)
