"""What changes the model's layout before the LoRA applies: ``layer_replication`` and ``trainable_token_indices``,
and the layers whose LoRA sits under another path (an ``nn.MultiheadAttention``'s in_proj and out_proj).

* :func:`replicate_base`: with ``layer_replication``, every later check judges the base model as PEFT builds it, the
  stack replicated by name (:mod:`lorasurg.layer_replication`); a map that does not fit the base is
  ``replication-invalid``.
* :func:`lora_modules`: the base's modules as an adapter's module names refer to them (an attention as its
  in-projection, ``(3E, E)``, and its out_proj under ``<attention>.base_layer.out_proj``).
* :func:`check_tokens`: the trainable-token rows in the file against the config and the base (``tokens-*``).
"""

from __future__ import annotations

import copy
import dataclasses

from ...errors import ConfigError
from ...findings import Finding
from ...io.adapter import NESTED_OUT_PROJ, TOKENS_PART
from ...layer_replication import expand_layer_map, find_layer_stack, layer_count, replicated_view, source_name
from ...modules import ModuleInfo
from ...targeting import modules_to_save as save_entries
from .subject import BaseModel, Subject

__all__ = ["replicate_base", "selecting_config", "lora_modules", "check_tokens", "check_replication"]


def replicate_base(base: BaseModel, config) -> tuple[BaseModel, list[Finding]]:
    """``base`` as PEFT's replicated model (``layer_replication``): module and tensor names of the stack repeated
    per copy; unchanged without a map. A map that does not fit is a ``replication-invalid`` finding."""
    layer_map = getattr(config, "layer_replication", None)
    if not layer_map:
        return base, []
    prefix = find_layer_stack({n: i.type_name for n, i in base.modules.items()})
    fix = "give layer_replication [start, end) pairs of the base model's layers, or drop it"
    if prefix is None:
        return base, [Finding("replication-invalid", "layer_replication",
                              f"{base.source} has no stack of layers PEFT replicates (model(.model)*.layers, "
                              ".encoder.layer or .h)", fix)]
    count = layer_count(list(base.modules), prefix)
    try:
        sources = expand_layer_map(layer_map, count)
    except ConfigError as err:
        return base, [Finding("replication-invalid", "layer_replication", str(err), fix)]
    shapes = {name: base.shapes[source_name(name, prefix, sources)]
              for name in replicated_view({n: None for n in base.shapes}, prefix, sources)}
    return dataclasses.replace(base, modules=replicated_view(base.modules, prefix, sources), shapes=shapes), []


def selecting_config(config):
    """The config targeting reads once the base is replicated (the names already are the replicated ones)."""
    if not getattr(config, "layer_replication", None):
        return config
    probe = copy.copy(config)
    probe.layer_replication = None
    return probe


def lora_modules(base: BaseModel) -> dict[str, ModuleInfo]:
    """The base's modules by the names an adapter's LoRA modules have (module docstring)."""
    modules = dict(base.modules)
    for name, info in base.modules.items():
        in_proj = base.shapes.get(f"{name}.in_proj_weight")
        if info.type_name == "MultiheadAttention" and in_proj is not None:
            modules[name] = ModuleInfo(info.type_name, "linear", False, tuple(in_proj),
                                       f"{name}.in_proj_bias" in base.shapes)
            if f"{name}.out_proj" in base.modules:
                modules[f"{name}.{NESTED_OUT_PROJ}"] = base.modules[f"{name}.out_proj"]
    return modules


def _token_targets(subject: Subject) -> dict[str, list[int]]:
    """``{config key: indices}`` of ``trainable_token_indices`` (a list: the input embedding's, key ``""``)."""
    spec = subject.config.trainable_token_indices
    if spec is None:
        return {}
    return {k: list(v) for k, v in spec.items()} if isinstance(spec, dict) else {"": list(spec)}


def check_tokens(subject: Subject) -> list[Finding]:
    """``tokens-missing``, ``tokens-unflagged``, ``tokens-shape``, ``tokens-conflict``, ``tokens-need-resize``."""
    adapter, base = subject.adapter, subject.base
    rows = adapter.token_rows()
    targets = _token_targets(subject)
    found = []
    for module, tensor in rows.items():
        key = next((k for k in targets if k == "" or module.endswith(k)), None)
        if key is None:
            found.append(Finding(
                "tokens-unflagged", f"{module}.{TOKENS_PART}",
                f"trainable-token rows {tuple(tensor.shape)} but trainable_token_indices does not name {module} "
                "(PEFT ignores them)", f"set trainable_token_indices {{{module!r}: [the row indices]}}"))
            continue
        indices = targets[key]
        if tensor.dim() != 2 or tensor.shape[0] != len(indices):
            found.append(Finding("tokens-shape", f"{module}.{TOKENS_PART}",
                                 f"{len(indices)} indices but rows of shape {tuple(tensor.shape)}",
                                 "save the adapter again: the rows belong to other indices"))
        found += _against_base(module, tensor, indices, base, subject) if base is not None else []
    named = [k for k in targets if k and not any(m.endswith(k) for m in rows)]
    if targets.get("") is not None and not rows:
        named.append("the input embedding")
    found += [Finding("tokens-missing", f"trainable_token_indices[{k!r}]",
                      f"trainable_token_indices names {k} but the file holds no rows for it: PEFT starts them at the "
                      "base's rows, so the adapter does not change them", "save the trained rows with the adapter")
              for k in named]
    return found


def _against_base(module: str, tensor, indices: list[int], base: BaseModel, subject: Subject) -> list[Finding]:
    weight = base.shapes.get(f"{module}.weight")
    where = f"{module}.{TOKENS_PART}"
    if weight is None:
        return [Finding("tokens-shape", where, f"{base.source} has no {module}.weight for these rows",
                        "validate against the base model the adapter was trained on")]
    found = []
    if tensor.dim() == 2 and tensor.shape[1] != weight[1]:
        found.append(Finding("tokens-shape", where, f"rows of width {tensor.shape[1]}, the layer's are {weight[1]}",
                             "validate against the base model the adapter was trained on"))
    past = [i for i in indices if i >= weight[0]]
    if past:
        found.append(Finding(
            "tokens-need-resize", where,
            f"{len(past)} index(es) past the base's {weight[0]} rows (up to {max(past)}): PEFT fails on this base",
            f"resize the base's token embeddings first: model.resize_token_embeddings({max(past) + 1})"))
    selected = subject.selection() or []
    saved = [e for e in save_entries(subject.config) if module.endswith(e)]
    if module in selected or saved:
        found.append(Finding(
            "tokens-conflict", module,
            f"has trainable tokens and is also {'a LoRA target' if module in selected else 'in modules_to_save'}: "
            "PEFT refuses the adapter",
            "drop it from target_modules / modules_to_save, or from trainable_token_indices"))
    return found


def check_replication(subject: Subject) -> list[Finding]:
    """The findings of :func:`replicate_base` (kept on the subject when it was loaded)."""
    return list(subject.replication_findings)

