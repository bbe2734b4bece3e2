"""What ``merge`` refuses, checked before any arithmetic: options that do not fit the method, and adapters that do
not fit together. Every message names the adapter, module, shapes or values, and says what would work."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ...engine.combine import METHODS, Method
from ...engine.sparsify import SIGN_METHODS
from ...errors import ConfigError, InputError, UnsupportedError
from ...io.adapter import TOKENS_PART, Adapter, AdapterModule
from ..expert_groups import expert_groups
from ..expert_ranks import SplitAdapter

__all__ = ["Options", "check_options", "plan_modules", "check_adapters", "check_expert_layouts", "default_rank"]

_RANK_METHODS = ", ".join(n for n, m in METHODS.items() if m.takes_rank)
_DENSITY_METHODS = ", ".join(n for n, m in METHODS.items() if m.uses_density)
_SIGN_METHOD_NAMES = ", ".join(n for n, m in METHODS.items() if m.uses_sign)


@dataclass(frozen=True)
class Options:
    """Merge options after checking: one weight per adapter, the method's spec, its parameters."""

    method: Method
    weights: tuple[float, ...]
    r: Optional[int]
    density: Optional[float]
    majority_sign: str
    seed: int


def check_options(method: str, n_adapters: int, weights: Optional[Sequence[float]], r: Optional[int],
                  density: Optional[float], majority_sign: Optional[str], seed: int) -> Options:
    """Check the options against the method and the number of adapters; default weights are ``1/n`` each.

    Raises:
        ConfigError: an unknown method, a wrong number of weights or a non-finite weight, ``r < 1``, a density
            outside (0, 1], an unknown sign method, an option the method does not use, a missing density, or
            one adapter for a method that elects a sign across adapters.
    """
    spec = METHODS.get(str(method))
    if spec is None:
        raise ConfigError(f"unknown merge method {method!r}; use one of: {', '.join(METHODS)}")
    if n_adapters < 1:
        raise ConfigError("merge needs at least one adapter (and two for a merge that means anything)")
    if n_adapters < spec.min_adapters:
        raise ConfigError(
            f"method {spec.name} elects a sign per entry across adapters and needs at least two adapters, got one. "
            "For one adapter use magnitude_prune (the same trimming, no election), or lorasurg rerank to change its "
            "rank."
        )
    if weights is None:
        weights = [1.0 / n_adapters] * n_adapters
    weights = tuple(float(w) for w in weights)
    if len(weights) != n_adapters:
        raise ConfigError(
            f"{len(weights)} weight(s) {list(weights)} for {n_adapters} adapters: give exactly one weight per "
            f"adapter, in the order of the adapters (e.g. --weights {','.join(['0.5'] * n_adapters)})"
        )
    bad = [w for w in weights if not math.isfinite(w)]
    if bad:
        raise ConfigError(f"weights must be finite numbers, got {list(weights)}")
    if r is not None:
        if isinstance(r, bool) or int(r) != r or r < 1:
            raise ConfigError(f"--r must be an integer >= 1, got {r!r}")
        if not spec.takes_rank:
            kept = "gives the sum of the input ranks" if spec.name == "cat" else "keeps the inputs' (equal) rank"
            raise ConfigError(
                f"--r sets the new rank of the svd methods ({_RANK_METHODS}); {spec.name} {kept}. Drop --r, or use "
                f"--method svd (the exact weighted sum truncated to rank r), or lorasurg rerank afterwards."
            )
    if density is not None:
        density = float(density)
        if not 0 < density <= 1:
            raise ConfigError(
                f"--density must be in (0, 1] (the fraction of entries each adapter keeps), got {density}"
            )
        if not spec.uses_density:
            raise ConfigError(
                f"--density applies to the methods that trim or drop entries ({_DENSITY_METHODS}); {spec.name} uses "
                "every entry. Drop --density or pick one of those methods."
            )
    elif spec.uses_density:
        raise ConfigError(
            f"method {spec.name} needs --density D, the fraction of entries kept per adapter, in (0, 1] (PEFT has no "
            "default either; 0.2 to 0.7 are common)"
        )
    if majority_sign is not None:
        if majority_sign not in SIGN_METHODS:
            raise ConfigError(f"--majority-sign must be one of {', '.join(SIGN_METHODS)}, got {majority_sign!r}")
        if not spec.uses_sign:
            raise ConfigError(
                f"--majority-sign applies to the methods that elect a sign ({_SIGN_METHOD_NAMES}), not {spec.name}"
            )
    return Options(spec, weights, None if r is None else int(r), density, majority_sign or "total", int(seed))


def plan_modules(adapters: Sequence[Adapter]) -> dict[str, list[tuple[int, AdapterModule]]]:
    """``{module: [(adapter index, its module), ...]}`` for the union of the adapters' modules, in first-seen order."""
    plan: dict[str, list[tuple[int, AdapterModule]]] = {}
    for index, adapter in enumerate(adapters):
        for name, mod in adapter.modules.items():
            plan.setdefault(name, []).append((index, mod))
    return plan


def _layout(mod: AdapterModule) -> tuple[str, int, tuple[int, ...]]:
    """Kind, output features and the stored shape of A beyond the rank: what must agree between adapters."""
    return mod.kind, int(mod.B.shape[0]), tuple(mod.A.shape[1:])


def _shape_text(mod: AdapterModule) -> str:
    out_f, in_shape = int(mod.B.shape[0]), tuple(mod.A.shape[1:])
    return f"{mod.kind} {out_f}x{'x'.join(map(str, in_shape))} (lora_A {tuple(mod.A.shape)}, lora_B {tuple(mod.B.shape)})"


def check_adapters(adapters: Sequence[Adapter], names: Sequence[str], options: Options,
                   plan: dict[str, list[tuple[int, AdapterModule]]]) -> None:
    """Refuse adapters that cannot be merged with ``options.method``; every problem of a kind is listed.

    Raises:
        UnsupportedError: a DoRA adapter (see the message for why).
        InputError: a module whose shapes or layer kind differ between adapters (different bases), adapters that
            disagree on ``fan_in_fan_out``, lora_bias together with embedding LoRA (PEFT refuses that), or the
            same modules_to_save tensor with different values in two adapters.
        ConfigError: unequal ranks on a module for a factor-wise method.
    """
    dora = [n for a, n in zip(adapters, names) if a.config.use_dora]
    if dora:
        raise UnsupportedError(
            f"cannot merge DoRA adapters ({', '.join(dora)}). A DoRA adapter changes a layer to "
            "m * (W + B A) / ||W + B A||_row - W, which depends on the base weight W, and the adapter files do not "
            "hold it; no combination of the files alone is a merge of the adapted models (PEFT's add_weighted_adapter "
            "merges only the LoRA factors and ignores the magnitudes, which gives wrong results). Merge plain LoRA "
            "adapters, or fuse each DoRA adapter into the base model and merge the models."
        )
    mismatched = []
    for module, entries in plan.items():
        first_index, first = entries[0]
        for index, mod in entries[1:]:
            if _layout(mod) != _layout(first):
                mismatched.append(
                    f"{module}: {names[first_index]} has {_shape_text(first)} but {names[index]} has {_shape_text(mod)}"
                )
    if mismatched:
        raise InputError(
            f"the adapters are for different base models: {len(mismatched)} module(s) differ in shape or layer kind:\n"
            "  - " + "\n  - ".join(mismatched[:10]) + ("\n  - ..." if len(mismatched) > 10 else "")
            + "\nMerge only adapters trained on the same base model."
        )
    with_bias = [n for a, n in zip(adapters, names) if a.config.lora_bias]
    embeddings = [m for m, entries in plan.items() if entries[0][1].embedding]
    if with_bias and embeddings:
        raise InputError(
            f"{', '.join(with_bias)} carr{'ies' if len(with_bias) == 1 else 'y'} lora_B.bias (lora_bias: true) and the "
            f"merge would have LoRA on embedding module(s) {', '.join(embeddings[:4])}; PEFT refuses lora_bias on "
            "Embedding layers, so no PEFT adapter can hold both. Merge adapters without embedding LoRA, or without "
            "lora_bias."
        )
    fan = {bool(a.config.fan_in_fan_out) for a in adapters if a.modules}
    if len(fan) > 1:
        listing = ", ".join(f"{n}: {a.config.fan_in_fan_out}" for a, n in zip(adapters, names))
        raise InputError(
            f"the adapters disagree on fan_in_fan_out ({listing}): they were made for base layers stored in different "
            "orientations (GPT-2's Conv1D vs nn.Linear), i.e. for different base models"
        )
    if options.method.equal_ranks:
        unequal = [
            f"{module} ({', '.join(f'{names[i]}: r={m.rank}' for i, m in entries)})"
            for module, entries in plan.items()
            if len({m.rank for _, m in entries}) > 1
        ]
        if unequal:
            raise ConfigError(
                f"method {options.method.name} merges lora_A and lora_B entry by entry and needs every adapter to have "
                f"the same rank on a module; these differ: {'; '.join(unequal[:8])}{'; ...' if len(unequal) > 8 else ''}. "
                "Use --method svd (exact weighted sum, truncated to --r) or cat (exact, rank = sum of ranks), or "
                "lorasurg rerank the adapters to one rank first."
            )
    _check_extras(adapters, names)
    _check_layout(adapters, names)


def _check_layout(adapters: Sequence[Adapter], names: Sequence[str]) -> None:
    """One layer_replication for all inputs (module names refer to its stack)."""
    maps = {json.dumps(a.config.layer_replication) for a in adapters}
    if len(maps) > 1:
        listing = ", ".join(f"{n}: {a.config.layer_replication}" for a, n in zip(adapters, names))
        raise InputError(
            f"the adapters replicate the base's layers differently ({listing}): their module names refer to different "
            "stacks of layers, so their deltas cannot be added. Merge adapters with the same layer_replication")


def _check_extras(adapters: Sequence[Adapter], names: Sequence[str]) -> None:
    owners: dict[str, int] = {}
    clashes, tokens = [], []
    for index, adapter in enumerate(adapters):
        rows = {f"{m}.{TOKENS_PART}": m for m in adapter.token_rows()}
        for key, tensor in adapter.extra.items():
            if key not in owners:
                owners[key] = index
                continue
            other = adapters[owners[key]].extra[key]
            same_indices = key not in rows or (adapter.token_indices()[rows[key]]
                                               == adapters[owners[key]].token_indices()[rows[key]])
            if (other.shape != tensor.shape or other.dtype != tensor.dtype or not torch.equal(other, tensor)
                    or not same_indices):
                (tokens if key in rows else clashes).append(f"{key} ({names[owners[key]]} and {names[index]})")
    for index, adapter in enumerate(adapters):
        for module in adapter.token_rows():
            for other, owner in ((a, n) for a, n in zip(adapters, names) if a is not adapter):
                if any(k.startswith(f"{module}.") and not k.endswith(TOKENS_PART) for k in other.extra):
                    tokens.append(f"{module} (trainable tokens in {names[index]}, saved whole in {owner})")
    if tokens:
        raise InputError(
            f"the adapters' trainable tokens clash (different rows on one module, or tokens in one and the whole "
            f"module in another): {', '.join(tokens[:8])}. Token rows are values that replace the layer's rows, not "
            "deltas: they cannot be weighted. Keep them in one adapter only (drop them from the others' "
            "trainable_token_indices and files, or extract the others with --embeddings lora), or fuse in turn")
    if clashes:
        raise InputError(
            "several adapters carry a different full copy of the same module (modules_to_save), and full copies cannot "
            f"be merged without the base model's weights: {', '.join(clashes[:8])}. Remove the module from "
            "modules_to_save in all but one adapter (PEFT's add_weighted_adapter refuses this too)."
        )


def check_expert_layouts(splits: Sequence[SplitAdapter], adapters: Sequence[Adapter], names: Sequence[str]) -> None:
    """Refuse inputs whose experts cannot be merged expert by expert: one layer's experts per expert in one adapter
    and as a target_parameters LoRA in another (two layouts PEFT cannot load as one adapter), or one
    target_parameters LoRA over different numbers of experts (different base models).

    Raises:
        InputError: naming the layer or parameter and the adapters.
    """
    per_expert: dict[str, int] = {}
    fused: dict[str, tuple[int, int]] = {}  # module holding the parameters -> (adapter index, experts)
    problems = []
    for index, (split, adapter) in enumerate(zip(splits, adapters)):
        for group in expert_groups(adapter.modules):
            per_expert.setdefault(group.split(".*.")[0], index)
        for lora in split.loras.values():
            if lora.experts == 1:
                continue
            owner = lora.parameter.rpartition(".")[0]
            seen = fused.setdefault(lora.parameter, (index, lora.experts))
            if seen[1] != lora.experts:
                problems.append(f"{lora.parameter}: {names[seen[0]]} has {seen[1]} experts, {names[index]} "
                                f"{lora.experts} (different base models)")
            fused.setdefault(owner, (index, lora.experts))
    for owner, index in per_expert.items():
        if owner in fused:
            problems.append(f"{owner}: {names[index]} has its experts per expert ({owner}.<e>.<projection>), "
                            f"{names[fused[owner][0]]} as target_parameters; write both in one layout (lorasurg "
                            "extract writes the one PEFT loads for the base)")
    if problems:
        raise InputError("cannot merge these adapters' experts expert by expert:\n  - " + "\n  - ".join(problems))


def default_rank(adapters: Sequence[Adapter]) -> int:
    """PEFT's default new rank for the svd methods: the largest ``r`` or ``rank_pattern`` value of any input config."""
    return max(max([a.config.r, *(a.config.rank_pattern or {}).values()]) for a in adapters)
