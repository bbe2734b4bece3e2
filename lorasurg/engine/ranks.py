"""Rank policies: how many singular triplets of a matrix a LoRA keeps.

A policy is parsed from text (``--rank-policy``) and chooses a rank from the singular values ``S`` (descending)
and a cap ``max_rank`` (``--r``). Every policy returns a rank in ``[0, min(max_rank, len(S))]``, and 0 for a zero
matrix (all singular values 0); a caller leaves a rank-0 module out.

=====================  ====================================================================================
text                   rank chosen
=====================  ====================================================================================
``fixed``              ``max_rank``
``fixed:N``, ``N``     ``min(N, max_rank)``
``energy:F``           the smallest k with ``sum_{i<=k} S_i^2 >= F * ||M||_F^2`` (0 < F <= 1)
``sv_fro:F``           kohya's: the smallest k with ``sqrt(sum_{i<=k} S_i^2) >= F * ||M||_F`` (0 < F <= 1);
                       the same as ``energy:F^2``
``sv_cumulative:F``    kohya's: the smallest k with ``sum_{i<=k} S_i >= F * sum_i S_i`` (0 < F <= 1)
``sv_ratio:X``         kohya's: the number of singular values ``> S_1 / X``, at least 1 (X >= 1)
``sv_epsilon:E``       mergekit's ``--sv-epsilon``: the number of singular values ``> E`` (may be 0); ``E = 0``
                       keeps ``max_rank``, as mergekit does (E >= 0)
=====================  ====================================================================================

All are capped by ``max_rank``. kohya's ``resize_lora.py`` (sd-scripts) also clamps a result to at least 1 and,
for a zero matrix (``S_1 <= 1e-6``), returns 1; here a zero matrix gives 0 and the cap is ``max_rank``. mergekit's
``extract_lora`` computes ``min(count(S > E), max_rank)`` when ``E > 0`` and ignores E otherwise.

What a policy needs from the caller (:attr:`RankPolicy.needs_full_spectrum`): ``sv_cumulative`` needs the whole
spectrum (its total ``sum_i S_i`` is the nuclear norm, which has no cheap formula). The others need only the
leading ``max_rank`` singular values, and ``energy``/``sv_fro`` also the total ``||M||_F^2`` (pass ``total_sq``;
by default it is ``sum(S^2)``, right only when S is the whole spectrum).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ..errors import ConfigError

__all__ = ["RankPolicy", "RANK_POLICIES", "parse_rank_policy", "effective_rank"]


def _fixed(S: Tensor, cap: int, value: Optional[float], total_sq: float) -> int:
    return cap if value is None else min(int(value), cap)


def _first_reaching(cumulative: Tensor, target: float, cap: int) -> int:
    """The smallest k (1-based) with ``cumulative[k-1] >= target``, capped; ``cap`` when none reaches it."""
    k = int(torch.searchsorted(cumulative, torch.tensor([target], dtype=cumulative.dtype)).item()) + 1
    return min(k, cap)


def _energy(S: Tensor, cap: int, value: Optional[float], total_sq: float) -> int:
    return _first_reaching(torch.cumsum(S.pow(2), 0) / total_sq, float(value), cap)


def _sv_fro(S: Tensor, cap: int, value: Optional[float], total_sq: float) -> int:
    return _first_reaching(torch.cumsum(S.pow(2), 0) / total_sq, float(value) ** 2, cap)


def _sv_cumulative(S: Tensor, cap: int, value: Optional[float], total_sq: float) -> int:
    return _first_reaching(torch.cumsum(S, 0) / S.sum(), float(value), cap)


def _sv_ratio(S: Tensor, cap: int, value: Optional[float], total_sq: float) -> int:
    return min(max(int((S > S[0] / float(value)).sum()), 1), cap)


def _sv_epsilon(S: Tensor, cap: int, value: Optional[float], total_sq: float) -> int:
    if not value:
        return cap
    return min(int((S > float(value)).sum()), cap)


@dataclass(frozen=True)
class _PolicySpec:
    choose: Callable[[Tensor, int, Optional[float], float], int]
    check: Callable[[float], bool]  # is the parameter valid?
    requirement: str  # the valid range, for error messages
    needs_full_spectrum: bool = False
    integer: bool = False
    optional: bool = False  # may be written without ":value"


def _fraction(x: float) -> bool:
    return 0 < x <= 1


RANK_POLICIES: dict[str, _PolicySpec] = {
    "fixed": _PolicySpec(_fixed, lambda x: x >= 1, "an integer N >= 1", integer=True, optional=True),
    "energy": _PolicySpec(_energy, _fraction, "a fraction F with 0 < F <= 1"),
    "sv_fro": _PolicySpec(_sv_fro, _fraction, "a fraction F with 0 < F <= 1"),
    "sv_cumulative": _PolicySpec(_sv_cumulative, _fraction, "a fraction F with 0 < F <= 1", needs_full_spectrum=True),
    "sv_ratio": _PolicySpec(_sv_ratio, lambda x: x >= 1, "a ratio X >= 1"),
    "sv_epsilon": _PolicySpec(_sv_epsilon, lambda x: x >= 0, "a threshold E >= 0"),
}
"""Every rank policy by name: its chooser, parameter check and what it needs (see the module docstring)."""

_FORMS = "'fixed', 'fixed:N' or 'N', 'energy:F', 'sv_fro:F', 'sv_cumulative:F', 'sv_ratio:X', 'sv_epsilon:E'"


@dataclass(frozen=True)
class RankPolicy:
    """A parsed rank policy; build it with :func:`parse_rank_policy`.

    Attributes:
        name: a key of :data:`RANK_POLICIES`.
        value: its parameter (None for plain ``fixed``).
    """

    name: str
    value: Optional[float] = None

    @property
    def needs_full_spectrum(self) -> bool:
        """True when :meth:`choose` needs every singular value of the matrix, not only the leading ones."""
        return RANK_POLICIES[self.name].needs_full_spectrum

    def __post_init__(self) -> None:
        if self.name not in RANK_POLICIES:
            raise ConfigError(f"unknown rank policy {self.name!r}; use one of {_FORMS}")

    def __str__(self) -> str:
        """The policy as :func:`parse_rank_policy` reads it back."""
        if self.value is None:
            return self.name
        if RANK_POLICIES[self.name].integer:
            return f"{self.name}:{int(self.value)}"
        return f"{self.name}:{self.value:g}"

    def choose(self, S: Tensor, max_rank: int, *, total_sq: Optional[float] = None) -> int:
        """The rank this policy keeps.

        Args:
            S: singular values in descending order: at least the leading ``min(max_rank, min(m, n))``, or all of
                them when :attr:`needs_full_spectrum`.
            max_rank: the cap, >= 1.
            total_sq: ``||M||_F^2``; default ``sum(S^2)`` (right only when S is the whole spectrum).

        Returns:
            An int in ``[0, min(max_rank, len(S))]``; 0 for a zero matrix.

        Raises:
            ValueError: ``max_rank < 1`` or S not 1-D.
        """
        if max_rank < 1:
            raise ValueError(f"rank policy {self}: max_rank must be >= 1, got {max_rank}")
        if S.dim() != 1:
            raise ValueError(f"rank policy {self}: singular values must be 1-D, got shape {tuple(S.shape)}")
        values = S.detach().to("cpu", torch.float64)
        if values.numel() == 0 or not values[0] > 0:
            return 0
        total = float(values.pow(2).sum()) if total_sq is None else float(total_sq)
        total = max(total, float(values.pow(2).sum()))  # an underestimated total must not make F unreachable
        cap = min(max_rank, values.numel())
        return RANK_POLICIES[self.name].choose(values, cap, self.value, total)


def parse_rank_policy(text: str) -> RankPolicy:
    """Parse ``--rank-policy`` text: ``fixed``, ``fixed:N``, ``N``, ``energy:F``, ``sv_fro:F``,
    ``sv_cumulative:F``, ``sv_ratio:X`` or ``sv_epsilon:E`` (names are case-insensitive).

    Raises:
        ConfigError: an unknown name, a missing or malformed value, or a value out of range; the message lists
            the valid forms.
    """
    raw = str(text).strip()
    name, sep, arg = raw.partition(":")
    name = name.strip().lower()
    if not sep and name.isdigit():
        name, sep, arg = "fixed", ":", name
    spec = RANK_POLICIES.get(name)
    if spec is None:
        raise ConfigError(f"unknown rank policy {raw!r}; use one of {_FORMS}")
    if not sep:
        if spec.optional:
            return RankPolicy(name)
        raise ConfigError(f"rank policy {raw!r} needs a value: {name}:V with V {spec.requirement}")
    try:
        value = int(arg) if spec.integer else float(arg)
    except ValueError as err:
        raise ConfigError(f"rank policy {raw!r}: {arg.strip()!r} is not {spec.requirement}") from err
    if not spec.check(value):
        raise ConfigError(f"rank policy {raw!r}: the value must be {spec.requirement}, got {value}")
    return RankPolicy(name, float(value))


def effective_rank(S: Tensor) -> float:
    """The entropy effective rank of a spectrum (Roy & Vetterli 2007): ``exp(H(p))`` with ``p_i = S_i / sum_j S_j``
    and ``H(p) = -sum_i p_i log p_i``.

    Between 1 (one nonzero singular value) and the number of nonzero values (all equal); 0.0 for a zero or empty
    spectrum. Computed in float64.
    """
    values = S.detach().to("cpu", torch.float64).reshape(-1)
    total = float(values.sum()) if values.numel() else 0.0
    if total <= 0:
        return 0.0
    p = values[values > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))
