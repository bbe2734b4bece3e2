"""``inspect --plot FILE.png``: the modules' spectra and delta norms in one picture (matplotlib, optional).

Left: each module's singular values divided by its largest, against their index, log scale, one line per
module, one colour per layer type. Right: one bar per module, its ``||scale * B @ A||_F`` (relative to the
base weight's norm when a base was given), coloured the same way. The image is
:data:`FIGSIZE` inches at :data:`DPI`, so its pixel size is known (1400 x 600).

matplotlib is an optional extra (``pip install lorasurg[plot]``); it is imported only here, and only the
object-oriented API is used (no pyplot, no global backend state).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from ...errors import InputError, OutputExistsError, UnsupportedError
from ...io.writer import atomic_output_file, check_writable
from .report import InspectReport

__all__ = ["FIGSIZE", "DPI", "check_plot_path", "write_plot"]

FIGSIZE = (14.0, 6.0)
DPI = 100

PathLike = Union[str, "os.PathLike[str]"]


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise UnsupportedError(
            "--plot needs matplotlib, which is not installed: pip install lorasurg[plot] (or pip install matplotlib)"
        ) from err


def check_plot_path(path: PathLike, force: bool) -> None:
    """Refuse, before any work, a plot that cannot be drawn or would clobber a file.

    Raises:
        UnsupportedError: matplotlib is not installed.
        OutputExistsError: ``path`` exists and ``force`` is false.
        InputError: ``path`` is a directory, or does not end in ``.png``.
        OutputError: nothing can be created where ``path`` would go (a parent that is a file, ``/proc``, ...).
    """
    _require_matplotlib()
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise InputError(f"--plot writes a PNG image: give a file name ending in .png, not {out.name!r}")
    if out.is_dir():
        raise InputError(f"--plot {out} is a directory; give a file name ending in .png")
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; choose another --plot file or pass --force to replace it")
    check_writable(out)


def write_plot(report: InspectReport, path: PathLike) -> None:
    """Draw the spectra and delta norms of ``report`` into the PNG ``path`` (written to a temporary file in the
    same directory, then renamed)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    spectra, norms = fig.subplots(1, 2)
    types = list(dict.fromkeys(m.layer_type for m in report.modules))
    colours = {t: f"C{i % 10}" for i, t in enumerate(types)}
    labelled: set[str] = set()
    for m in report.modules:
        values = [s / m.spectrum[0] for s in m.spectrum if m.spectrum[0] > 0 and s > 0]
        if not values:
            continue
        label = None if m.layer_type in labelled else m.layer_type
        labelled.add(m.layer_type)
        spectra.plot(range(1, len(values) + 1), values, color=colours[m.layer_type], alpha=0.7, lw=1, label=label)
    spectra.set_yscale("log")
    spectra.set_xlabel("singular value index")
    spectra.set_ylabel("sigma_i / sigma_1")
    spectra.set_title("spectra of scale * B @ A, per module")
    if labelled:
        spectra.legend(title="layer type", fontsize="small")
    relative = report.base is not None
    heights = [(m.relative_norm or 0.0) if relative else m.delta_norm for m in report.modules]
    norms.bar(range(len(heights)), heights, color=[colours[m.layer_type] for m in report.modules])
    norms.set_xticks(range(len(heights)), [_short(m.name) for m in report.modules], rotation=90,
                     fontsize="x-small")
    norms.set_ylabel("||dW||_F / ||W||_F" if relative else "||dW||_F")
    norms.set_title("delta norm per module" + (" (relative to the base weight)" if relative else ""))
    with atomic_output_file(path, force=True) as tmp:  # check_plot_path refused an existing file without --force
        fig.savefig(tmp, format="png", dpi=DPI)


def _short(name: str) -> str:
    """``model.layers.3.self_attn.q_proj -> 3.self_attn.q_proj``: the name without its leading containers."""
    parts = name.split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[digits[0]:]) if digits else name
