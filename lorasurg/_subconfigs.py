"""The nested sub-configs of a LoRA config (``eva_config``, ``corda_config``, ...) as plain dicts.

PEFT keeps each sub-config as a small dataclass and writes it into ``adapter_config.json`` as a dict of
*all* its fields. lorasurg keeps the dict form: :func:`normalise` turns ``None``, a dict, or an instance of
PEFT's class (any dataclass whose class name matches, e.g. ``peft.EvaConfig``) into either ``None`` or a
dict with every field present (PEFT's defaults filled in), and reports what PEFT's constructors would
refuse. The table :data:`SUBCONFIGS` holds, per config field, PEFT's class name, its fields and defaults,
and the value checks PEFT's ``__post_init__`` makes.

Keys a sub-config does not know (a newer PEFT) are kept and reported, so the caller can warn; PEFT 0.21.2
drops them silently, except in ``monteclora_config`` where it refuses them (its constructor takes no
unknown keyword), and so does lorasurg.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from numbers import Real
from typing import Any, Callable, Optional

__all__ = ["SubconfigSpec", "SUBCONFIGS", "Problem", "normalise", "as_plain_dict"]

#: A refusal: (message, is_type_error). ``is_type_error`` marks what PEFT refuses with a TypeError.
Problem = tuple[str, bool]

#: A value rule: (key, test on a real number, what the value must be).
_NumberRule = tuple[str, Callable[[float], bool], str]


@dataclass(frozen=True)
class SubconfigSpec:
    """What lorasurg knows about one PEFT sub-config class.

    Attributes:
        class_name: PEFT's class name, e.g. ``"EvaConfig"``; named in messages, and an instance of a
            dataclass with this name is accepted in place of a dict.
        defaults: every constructor field and its default, in PEFT's order.
        derived: fields PEFT writes but sets itself (``init=False``); a dict's values for them are reset to
            ``None``, as PEFT does when it loads a file.
        number_rules: checks on numeric fields, as PEFT's ``__post_init__`` makes them.
        choices: fields restricted to a set of strings by PEFT's ``__post_init__``.
        strict: unknown keys are refused (PEFT passes the dict straight to the constructor) rather than kept.
    """

    class_name: str
    defaults: dict[str, Any]
    derived: tuple[str, ...] = ()
    number_rules: tuple[_NumberRule, ...] = ()
    choices: tuple[tuple[str, frozenset[str]], ...] = ()
    strict: bool = False


def _positive(v: float) -> bool:
    return v > 0


def _non_negative(v: float) -> bool:
    return v >= 0


SUBCONFIGS: dict[str, SubconfigSpec] = {
    "eva_config": SubconfigSpec(
        "EvaConfig",
        dict(rho=2.0, tau=0.99, use_label_mask=True, label_mask_value=-100, whiten=False, adjust_scaling_factors=True),
        number_rules=(("rho", lambda v: v >= 1.0, ">= 1.0"), ("tau", lambda v: 0.0 <= v <= 1.0, "between 0.0 and 1.0")),
    ),
    "corda_config": SubconfigSpec(
        "CordaConfig",
        dict(
            cache_file=None,
            covariance_file=None,
            corda_method="ipm",
            verbose=False,
            use_float16_for_covariance=False,
            prune_temporary_fields=True,
        ),
    ),
    "lora_ga_config": SubconfigSpec("LoraGAConfig", dict(direction="ArB2r", scale="stable", stable_gamma=16)),
    "velora_config": SubconfigSpec(
        "VeloraConfig",
        dict(num_groups=64, scale=1.0, init_type="batch_average"),
        number_rules=(("num_groups", _positive, "> 0"), ("scale", _positive, "> 0")),
        choices=(("init_type", frozenset({"batch_average_once", "batch_average", "random"})),),
    ),
    "monteclora_config": SubconfigSpec(
        "MontecloraConfig",
        dict(
            num_samples=8,
            use_entropy=False,
            dirichlet_prior=0.1,
            sample_scaler=1e-4,
            kl_loss_weight=1e-5,
            buffer_size=150,
        ),
        number_rules=(
            ("num_samples", _positive, "> 0"),
            ("dirichlet_prior", _positive, "> 0"),
            ("buffer_size", _positive, "> 0"),
        ),
        strict=True,
    ),
    "use_bdlora": SubconfigSpec(
        "BdLoraConfig", dict(target_modules_bd_a=None, target_modules_bd_b=None, nblocks=1, match_strict=True)
    ),
    "arrow_config": SubconfigSpec(
        "ArrowConfig",
        dict(
            top_k=3,
            router_temperature=1.0,
            use_gks=False,
            task_adapter_names=None,
            gks_adapter_names=None,
            rng_seed=None,
        ),
        derived=("task_adapter_names", "gks_adapter_names"),
        number_rules=(("top_k", _positive, "> 0"), ("router_temperature", _positive, "> 0")),
    ),
    "kasa_config": SubconfigSpec(
        "KasaConfig",
        dict(beta=1e-4, gamma=1e-3),
        number_rules=(("beta", _non_negative, ">= 0"), ("gamma", _non_negative, ">= 0")),
    ),
}


def as_plain_dict(value: Any) -> Optional[dict]:
    """A shallow-copied dict of ``value`` if it is a dict or a dataclass instance, else ``None``."""
    if isinstance(value, dict):
        return dict(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return None


def normalise(field: str, value: Any) -> tuple[Optional[dict], list[Problem], list[str]]:
    """Bring one sub-config to its full dict form and check it the way PEFT's constructor does.

    Args:
        field: the LoraConfig field, a key of :data:`SUBCONFIGS` (``"eva_config"``, ...).
        value: ``None``, a dict (as read from a file), or an instance of PEFT's class.

    Returns:
        ``(normalised, problems, unknown_keys)``: ``normalised`` is ``None`` or a new dict with every
        field of the spec (defaults filled in, PEFT's order) followed by any unknown keys; ``problems``
        lists what PEFT would refuse; ``unknown_keys`` are keys the spec does not know (kept; the caller
        warns). For a strict spec, unknown keys are problems instead.
    """
    spec = SUBCONFIGS[field]
    if value is None:
        return None, [], []
    from_instance = not isinstance(value, dict) and type(value).__name__ == spec.class_name
    given = as_plain_dict(value) if isinstance(value, dict) or from_instance else None
    if given is None:
        msg = f"{field} must be None, a dict, or a {spec.class_name} instance; got {type(value).__name__}"
        return None, [(msg, True)], []
    unknown = [k for k in given if k not in spec.defaults]
    out = {**spec.defaults, **given}
    if not from_instance:
        out.update({k: None for k in spec.derived})
    problems: list[Problem] = []
    if unknown and spec.strict:
        msg = (
            f"{field} has unknown key(s) {sorted(unknown)}; PEFT's {spec.class_name} takes only "
            f"{list(spec.defaults)}; remove the others"
        )
        problems.append((msg, True))
    problems.extend(_check_values(field, spec, out))
    return out, problems, [] if spec.strict else unknown


def _check_values(field: str, spec: SubconfigSpec, values: dict) -> list[Problem]:
    """What ``spec``'s value checks refuse in ``values`` (a full dict)."""
    problems: list[Problem] = []
    for key, test, requirement in spec.number_rules:
        v = values[key]
        if not isinstance(v, Real) or isinstance(v, bool):
            problems.append((f"{field}.{key} must be a number {requirement}, got {v!r}", True))
        elif not test(v):
            problems.append((f"{field}.{key} must be {requirement}, got {v!r}", False))
    for key, allowed in spec.choices:
        if values[key] not in allowed:
            problems.append((f"{field}.{key} must be one of {sorted(allowed)}, got {values[key]!r}", False))
    if field == "use_bdlora":
        problems.extend(_check_bdlora(values))
    return problems


def _check_bdlora(values: dict) -> list[Problem]:
    """BD-LoRA: a module cannot have both a block-diagonal A and a block-diagonal B."""
    lists = {}
    for key in ("target_modules_bd_a", "target_modules_bd_b"):
        v = values[key]
        if v is not None and not (isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v)):
            return [(f"use_bdlora.{key} must be a list of module names or None, got {v!r}", True)]
        lists[key] = set(v or ())
    overlap = lists["target_modules_bd_a"] & lists["target_modules_bd_b"]
    if overlap:
        msg = (
            f"use_bdlora: {sorted(overlap)} are in both target_modules_bd_a and target_modules_bd_b; "
            "a module's LoRA can be block-diagonal in A or in B, not both: remove them from one list"
        )
        return [(msg, False)]
    return []
