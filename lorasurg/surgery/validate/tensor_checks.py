"""Checks of the stored tensors: against the config (ranks, lora_bias, DoRA, modules_to_save, dtypes) and
against the base model (modules, layer kinds, shapes).

The tensors-against-config rules are :meth:`lorasurg.io.adapter.Adapter.findings` (the same list
``Adapter.problems()`` and ``lorasurg inspect`` show); with a base model, "targeted" means what the config
selects in that model.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Optional

from ...errors import LorasurgError
from ...findings import Finding
from ...io.adapter import TOKENS_PART, AdapterModule, wrapped_module
from ...modules import ModuleInfo
from ...targeting import nearest_names, select_modules_to_save
from .structure_checks import lora_modules
from .subject import BaseModel, Subject

__all__ = ["check_tensors", "check_dtypes", "check_shapes"]

_TOKEN_DELTA = TOKENS_PART


def check_tensors(subject: Subject) -> list[Finding]:
    """The adapter's tensors against its config: :meth:`~lorasurg.io.adapter.Adapter.findings`, and
    ``save-tensor-missing``."""
    try:
        selected = subject.selection()
    except LorasurgError:  # targeting cannot be evaluated: check-skipped comes from the targets check
        selected = None
    view = subject.peft_view()
    if selected is not None and view is not None:  # a module keyed by another name of a selected module counts
        chosen = set(selected)
        names = subject.base.checkpoint_names
        selected = [*selected, *(m for m in subject.adapter.modules
                                 if view.name(m) in chosen or names.get(m) in chosen)]
    paths = None if view is None else list(view.paths)
    return subject.adapter.findings(selected, paths) + _saved_copies_missing(subject)


def _saved_copies_missing(subject: Subject) -> list[Finding]:
    cfg, adapter, base = subject.config, subject.adapter, subject.base
    fix = ("PEFT would start the copy from the base model's weights, losing what was trained: save the adapter "
           "again with the module's weights")
    if base is None:
        owners = [key.rsplit(".", 1)[0] for key in adapter.extra]
        return [
            Finding("save-tensor-missing", f"modules_to_save[{entry!r}]",
                    f"no saved tensor belongs to a module whose name ends in {entry!r}", fix)
            for entry in cfg.modules_to_save or []
            if not any(owner.endswith(entry) for owner in owners)
        ]
    found = []
    for module in select_modules_to_save(cfg, base.modules):
        expected = [key for key in base.shapes if key.startswith(module + ".")]
        missing = [key for key in expected if key not in adapter.extra]
        if missing:
            found.append(Finding(
                "save-tensor-missing", module,
                f"modules_to_save selects it but the adapter lacks {missing[:4]}"
                + (f" and {len(missing) - 4} more" if len(missing) > 4 else ""), fix,
            ))
    return found


def check_dtypes(subject: Subject) -> list[Finding]:
    """``dtype-mixed``: the tensors of one role (lora_A, lora_B, lora_B.bias, lora_magnitude_vector) are stored
    in more than one dtype."""
    roles: dict[str, dict[str, list[str]]] = {}
    for name, mod in subject.adapter.modules.items():
        for role, tensor in (("lora_A", mod.A), ("lora_B", mod.B), ("lora_B.bias", mod.bias),
                             ("lora_magnitude_vector", mod.magnitude)):
            if tensor is not None:
                roles.setdefault(role, {}).setdefault(str(tensor.dtype).removeprefix("torch."), []).append(name)
    found = []
    for role, by_dtype in roles.items():
        if len(by_dtype) < 2:
            continue
        counts = Counter({dtype: len(names) for dtype, names in by_dtype.items()})
        (common, _), *rest = counts.most_common()
        listing = ", ".join(f"{n} {d}" for d, n in counts.most_common())
        odd = [f"{d} in {by_dtype[d][:2]}" for d, _ in rest]
        found.append(Finding(
            "dtype-mixed", role, f"stored in {len(by_dtype)} dtypes: {listing} ({'; '.join(odd)})",
            f"tensors from different saves? cast them to one dtype ({common}, the most common)",
        ))
    return found


def check_shapes(subject: Subject) -> list[Finding]:
    """``module-missing``, ``kind-mismatch``, ``shape-mismatch``, ``extra-unmatched``, ``key-checkpoint-name``: the
    adapter's tensors against the base model's layers, under the names PEFT loads them at. ``target_parameters``
    LoRAs are checked against their parameters by :mod:`.expert_checks`."""
    base, adapter = subject.base, subject.adapter
    fan_in_fan_out = bool(getattr(subject.config, "fan_in_fan_out", False))
    modules = lora_modules(base)  # an attention's in_proj and out_proj under the adapter's names
    view = subject.peft_view()
    holders = {p.module for p in base.parameters.values()}
    renamed: dict[str, str] = {}
    found = []
    for stored, mod in adapter.modules.items():
        if view is not None and (stored in view.paths or _parameter_like(stored, base, holders)):
            continue  # a target_parameters LoRA: expert_checks (or tensor-untargeted) judges it
        name = view.name(stored) if view is not None else stored
        info = modules.get(name)
        if info is None and base.checkpoint_names.get(name) in modules:
            renamed[stored] = name = base.checkpoint_names[name]  # keyed by the checkpoint's name: PEFT misses it
            info = modules[name]
        if info is None:
            close = nearest_names(name, base.modules, n=2)
            found.append(Finding(
                "module-missing", name,
                f"{base.source} has no module of that name ({len(base.modules)} modules"
                + (f"; nearest: {close}" if close else "") + ")",
                "validate against the base model the adapter was trained on"
                + _made_for(subject),
            ))
        elif info.kind != mod.kind:
            found.append(Finding(
                "kind-mismatch", name,
                f"the adapter's factors are shaped for a layer of kind {mod.kind!r} (A {tuple(mod.A.shape)}) but "
                f"the base layer is a {info.type_name} of kind {info.kind!r} (weight {info.weight_shape})",
                "validate against the base model the adapter was trained on" + _made_for(subject),
            ))
        elif mod.A.shape[0] == mod.B.shape[1] * mod.groups:
            found += _shape_findings(name, mod, _layout(info, fan_in_fan_out, base))
    for key, tensor in adapter.extra.items():
        if key.endswith(_TOKEN_DELTA):
            continue
        base_key = key.replace(".base_layer.", ".")
        want = base.shapes.get(base_key)
        module, _, leaf = base_key.rpartition(".")
        if want is None and f"{base.checkpoint_names.get(module)}.{leaf}" in base.shapes:
            renamed[key] = f"{base.checkpoint_names[module]}.{leaf}"  # PEFT does not rename saved copies
            want = base.shapes[renamed[key]]
        if want is None:
            found.append(Finding(
                "extra-unmatched", key,
                f"a saved tensor of shape {tuple(tensor.shape)} for which {base.source} has no {base_key!r}",
                "PEFT reports it as an unexpected key and ignores it: drop it, or check the base model",
            ))
        elif tuple(tensor.shape) != tuple(want):
            found.append(Finding(
                "shape-mismatch", key, f"shape {tuple(tensor.shape)}, but {base_key!r} of the base is {tuple(want)}",
                "PEFT refuses to load it: validate against the base model the adapter was trained on",
            ))
    if renamed:
        found.append(_checkpoint_names(renamed, base))
    return found


def _parameter_like(path: str, base: BaseModel, holders: set[str]) -> bool:
    """A saved path that names a parameter wrapper (``...experts.base_layer``, or a module LoRA cannot wrap that
    holds parameters a ``target_parameters`` LoRA can wrap), not a layer."""
    info = base.modules.get(path)
    return wrapped_module(path) != path or (info is not None and info.kind is None and path in holders)


def _checkpoint_names(renamed: dict[str, str], base: BaseModel) -> Finding:
    """``key-checkpoint-name``: modules (or saved tensors) keyed by the checkpoint's names, which PEFT does not
    load under the model's names."""
    names = list(renamed)
    first = names[0]
    more = f" and {len(names) - 1} more" if len(names) > 1 else ""
    return Finding(
        "key-checkpoint-name", first + more,
        f"{len(names)} module(s) or tensor(s) are keyed by the checkpoint's names, but the model transformers builds "
        f"from {base.source} names them otherwise ({first!r} is {renamed[first]!r}), and PEFT loads these keys "
        "under the model's names without renaming them: it reports every one missing and adapts nothing there",
        "rename the keys to the model's names (lorasurg validate --fix does); lorasurg extract writes them so",
        tuple(names) if len(names) > 1 else (),
    )


def _layout(info: ModuleInfo, fan_in_fan_out: bool, base: BaseModel) -> ModuleInfo:
    """The layer as PEFT would see it: a linear layer known from names and shapes alone may be a GPT-2
    ``Conv1D``, which the config's ``fan_in_fan_out`` then says."""
    if info.kind == "linear" and not base.from_architecture and fan_in_fan_out:
        return dataclasses.replace(info, fan_in_fan_out=True)
    return info


def _shape_findings(name: str, mod: AdapterModule, info: ModuleInfo) -> list[Finding]:
    if info.weight_shape is None:
        return []
    want_A, want_B, out = info.lora_shapes(mod.rank)
    wrong = [f"{label} is {tuple(got.shape)}, the layer needs {want}"
             for label, got, want in (("lora_A", mod.A, want_A), ("lora_B", mod.B, want_B))
             if tuple(got.shape) != want]
    wrong += [f"{label} has {t.numel()} entries, the layer has {out} outputs"
              for label, t in (("lora_B.bias", mod.bias), ("lora_magnitude_vector", mod.magnitude))
              if t is not None and t.numel() != out]
    if not wrong:
        return []
    layout = " stored (in, out) (fan_in_fan_out)" if info.fan_in_fan_out else ""
    return [Finding(
        "shape-mismatch", name, f"{'; '.join(wrong)} ({info.type_name}, weight {info.weight_shape}{layout})",
        "PEFT refuses to load it: validate against the base model the adapter was trained on",
    )]


def _made_for(subject: Subject) -> str:
    cfg: Optional[object] = subject.config
    named = getattr(cfg, "base_model_name_or_path", None)
    return f" (its config names {named!r})" if named else ""
