"""``trainable_token_indices``: some rows of an embedding (and of the output head tied to it) trained, PEFT's layout.

PEFT 0.21.2 (``TrainableTokensWrapper`` / ``TrainableTokensLayer``) wraps the embedding as
``<emb>.token_adapter.base_layer`` and keeps, per adapter, the trained rows ``token_adapter.trainable_tokens_delta.
<adapter>`` (a ``(k, dim)`` parameter initialised to the selected rows of the weight, not a difference despite its
name) and the original rows (a buffer that is not saved). Forward replaces the rows, it does not add to them:

    W' = W with W'[indices[i]] = delta[i]        y = embedding(x, W')   (a head: y = x @ W'.T + b)

so a resized vocabulary whose new rows were initialised at random still gives the trained values. Merging writes
the rows into the weight (``index_copy``); unmerging writes the originals back.

Which modules, by PEFT's rules (``set_additional_trainable_modules``): a list of ids targets the input embedding
(``get_input_embeddings()``, else a module named ``embed_tokens``); a dict names modules by string suffix (every
module whose name ends with the key). When the model's config ties the embeddings (``tie_word_embeddings``), the
output head that shares the input embedding's weight gets a *tied* wrapper that holds no tensors of its own: it
reads the embedding's rows, so the head follows the trained rows; a dict that gives the head other indices than
the embedding wraps both separately instead. The file holds ``<emb>.token_adapter.trainable_tokens_delta`` for each
wrapper that is not tied.

Refused as PEFT refuses them: a key that matches no module, a module that is also a LoRA target or in
``modules_to_save``; and (PEFT fails later) an index past the embedding's rows: resize the embeddings first.
Beyond PEFT: merging a head whose weight is shared with an embedding that gets other rows first gives the head a
weight of its own, so each keeps its own rows (PEFT writes both into the shared weight); a head's bias is kept
(PEFT's head forward drops it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..io.adapter import TOKENS_PART
from .base import LoraLayer
from .modules_to_save import ModulesToSave

__all__ = ["TokenTarget", "TokenAdapter", "TrainableTokens", "plan_tokens", "token_wrappers", "token_tensors",
           "unshare_conflicting"]


@dataclass(frozen=True)
class TokenTarget:
    """One module that gets trainable tokens: its indices, and the module whose rows it reads when it is tied."""

    indices: tuple[int, ...]
    tied_to: Optional[str] = None


class _Originals(nn.Module):
    """PEFT's ``trainable_tokens_original``: one non-persistent buffer per adapter (moved with the model, not saved)."""

    def add(self, name: str, rows: Tensor) -> None:
        self.register_buffer(name, rows, persistent=False)

    def get(self, name: str) -> Tensor:
        return self._buffers[name]

    def remove(self, name: str) -> None:
        self._buffers.pop(name, None)


class TokenAdapter(nn.Module):
    """PEFT's ``TrainableTokensLayer``: ``base_layer``, ``trainable_tokens_delta``, ``trainable_tokens_original``.

    A tied adapter (``tied_to``) registers the containers of the adapter it follows, so the state_dict lists them
    under its own name too (as PEFT's does), and has no tensors of its own.
    """

    def __init__(self, base_layer: nn.Module, tied_to: Optional["TokenAdapter"] = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._tied = [tied_to] if tied_to is not None else []  # a list: not a submodule
        if tied_to is None:
            self.trainable_tokens_delta = nn.ParameterDict()
            self.trainable_tokens_original = _Originals()
            self.token_indices: dict[str, list[int]] = {}
        else:
            self.trainable_tokens_delta = tied_to.trainable_tokens_delta
            self.trainable_tokens_original = tied_to.trainable_tokens_original
            self.token_indices = tied_to.token_indices
        self.merged_adapters: list[str] = []

    @property
    def tied(self) -> bool:
        return bool(self._tied)

    @torch.no_grad()
    def add_adapter(self, name: str, indices: tuple[int, ...]) -> None:
        """Rows ``indices`` of the base weight become adapter ``name``'s trainable rows (a tied adapter adds none)."""
        if self.tied:
            return
        weight = self.base_layer.weight
        rows = weight[list(indices)]  # (k, dim): advanced indexing copies
        self.token_indices[name] = list(indices)
        self.trainable_tokens_delta[name] = nn.Parameter(rows.clone())
        self.trainable_tokens_original.add(name, rows.detach().clone())

    def delete_adapter(self, name: str) -> None:
        if self.tied:
            return
        if name in self.trainable_tokens_delta:
            del self.trainable_tokens_delta[name]
        self.trainable_tokens_original.remove(name)
        self.token_indices.pop(name, None)

    def weight_with(self, name: str) -> Tensor:
        """The base weight with adapter ``name``'s rows written in (differentiable in the rows)."""
        weight = self.base_layer.weight
        index = torch.tensor(self.token_indices[name], device=weight.device)
        return weight.index_copy(0, index, self.trainable_tokens_delta[name].to(weight))  # (num, dim)

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if name in self.merged_adapters or name not in self.token_indices:
            return
        self.base_layer.weight.data = self.weight_with(name).detach()
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            index = torch.tensor(self.token_indices[name], device=weight.device)
            weight.data.index_copy_(0, index, self.trainable_tokens_original.get(name).to(weight))

    def forward(self, x: Tensor, name: Optional[str]) -> Tensor:
        base = self.base_layer
        if name is None or name not in self.token_indices:
            if self.merged_adapters:
                self.unmerge()
            return base(x)
        if self.merged_adapters:
            return base(x)
        weight = self.weight_with(name)
        if isinstance(base, nn.Embedding):
            out = F.embedding(x, weight, padding_idx=base.padding_idx, max_norm=base.max_norm,
                              norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)
            scale = getattr(base, "embed_scale", None)
            if isinstance(scale, (int, float)) or (isinstance(scale, Tensor) and scale.numel() == 1):
                out = out * (scale.to(out.dtype) if isinstance(scale, Tensor) else scale)
            return out
        return F.linear(x, weight, getattr(base, "bias", None))  # (..., dim) @ (dim, num) -> (..., num)


class TrainableTokens(nn.Module):
    """The wrapper at the embedding's (or head's) place: ``token_adapter`` (a :class:`TokenAdapter`) and which
    adapter is active. ``weight`` is the weight with the active adapter's rows in, as PEFT's wrapper gives it.

    Attributes:
        active_adapter: the adapter whose rows forward uses, or None.
        disabled: when True, forward is the base layer's.
    """

    def __init__(self, base_layer: nn.Module, tied_to: Optional["TrainableTokens"] = None) -> None:
        super().__init__()
        self.token_adapter = TokenAdapter(base_layer, tied_to.token_adapter if tied_to is not None else None)
        self.active_adapter: Optional[str] = None
        self.disabled = False

    @property
    def base_layer(self) -> nn.Module:
        return self.token_adapter.base_layer

    @property
    def adapter_names(self) -> list[str]:
        return list(self.token_adapter.token_indices)

    @property
    def weight(self) -> Tensor:
        name = self._current()
        return self.token_adapter.weight_with(name) if name is not None else self.base_layer.weight

    def _current(self) -> Optional[str]:
        if self.disabled or self.active_adapter not in self.token_adapter.token_indices:
            return None
        return self.active_adapter

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self.token_adapter(x, self._current())

    def merge(self) -> None:
        name = self._current()
        if name is not None:
            self.token_adapter.merge(name)

    def unmerge(self) -> None:
        self.token_adapter.unmerge()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "token_adapter" not in modules:
                raise
            return getattr(modules["token_adapter"].base_layer, name)


def token_wrappers(model: nn.Module) -> list[tuple[str, TrainableTokens]]:
    """Every trainable-tokens wrapper in ``model`` with its module name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, TrainableTokens)]


def token_tensors(model: nn.Module, adapter_name: str) -> dict[str, Tensor]:
    """``{"<module>.token_adapter.trainable_tokens_delta": rows}`` of adapter ``adapter_name``, as PEFT saves them
    (tied wrappers hold nothing of their own and save nothing)."""
    return {f"{name}.{TOKENS_PART}": w.token_adapter.trainable_tokens_delta[adapter_name]
            for name, w in token_wrappers(model)
            if not w.token_adapter.tied and adapter_name in w.token_adapter.trainable_tokens_delta}


def unshare_conflicting(model: nn.Module) -> None:
    """Before a merge: a wrapper whose base weight is another wrapper's (tied weights) without being tied to it gets a
    weight of its own, so each writes its own rows."""
    owners: dict[int, TrainableTokens] = {}
    for _, wrapper in token_wrappers(model):
        base = wrapper.base_layer
        param = base.weight
        first = owners.setdefault(id(param), wrapper)
        if first is not wrapper and not wrapper.token_adapter.tied:
            base.weight = nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)


# ------------------------------------------------------------------------------------------------------ planning
def _input_embedding_name(model: nn.Module) -> str:
    """PEFT's name for the list form: the module ``get_input_embeddings()`` returns, else ``embed_tokens``."""
    get = getattr(model, "get_input_embeddings", None)
    module = get() if callable(get) else None
    return next((n for n, m in model.named_modules() if m is module or (isinstance(m, TrainableTokens)
                                                                         and m.base_layer is module)), "embed_tokens")


def _unwrap(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, TrainableTokens) else module


def _tied_heads(model: nn.Module, embedding: str, names: Mapping[str, Any]) -> list[str]:
    """The modules whose weight is the input embedding's, when the model's config ties the embeddings."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False) or embedding not in names:
        return []
    weight = getattr(_unwrap(model.get_submodule(embedding)), "weight", None)
    return [n for n in names if n != embedding and weight is not None
            and getattr(_unwrap(model.get_submodule(n)), "weight", None) is weight]


def plan_tokens(model: nn.Module, config: Any, names: Mapping[str, Any], lora_targets: Mapping[str, Any],
                to_save: list[str]) -> dict[str, TokenTarget]:
    """The modules that get trainable tokens for ``config`` (PEFT's rules, module docstring), checked.

    Args:
        names: ``{module name: ModuleInfo}`` of the model as targeting sees it (wrappers described by their layer).
        lora_targets, to_save: what the same adapter targets with LoRA and saves whole.

    Raises:
        ConfigError: a key matches no module; a module is also a LoRA target or in modules_to_save; a module is
            not an embedding or a linear head; an index is past the module's rows; with ``ensure_weight_tying``,
            tied modules given different indices (all listed).
    """
    spec = getattr(config, "trainable_token_indices", None)
    if spec is None:
        return {}
    embedding = _input_embedding_name(model)
    keys = {k: [int(i) for i in v] for k, v in spec.items()} if isinstance(spec, dict) else {embedding: list(spec)}
    heads = _tied_heads(model, embedding, names)
    skip: set[str] = set()
    mismatch = False
    if len(keys) > 1 and heads:  # PEFT: tied layers named with the same indices are tied, not wrapped twice
        tied_keys = [k for k in keys if embedding.endswith(k) or any(h.endswith(k) or k in h.split(".") for h in heads)]
        if len(tied_keys) >= 2:
            mismatch = any(keys[k] != keys[tied_keys[0]] for k in tied_keys[1:])
            if mismatch and getattr(config, "ensure_weight_tying", False):
                raise ConfigError(
                    "trainable_token_indices gives the tied layers different indices ("
                    + ", ".join(f"{k}: {keys[k]}" for k in tied_keys) + ") but ensure_weight_tying is set: give "
                    "them the same indices or set ensure_weight_tying=False")
            skip = set() if mismatch else set(tied_keys) & set(heads)
    out: dict[str, TokenTarget] = {}
    problems = []
    for key, indices in keys.items():
        if key in skip:
            continue
        found = [n for n in names if n.endswith(key)]
        if not found:
            problems.append(f"{key!r} matches no module of the model (a key must end a module's name)")
        out.update((n, TokenTarget(tuple(indices))) for n in found)
    if embedding in out and not mismatch:
        out.update((h, TokenTarget(out[embedding].indices, tied_to=embedding)) for h in heads if h not in out)
    for name, target in out.items():
        problems += _target_problems(model, name, target, names, lora_targets, to_save)
    if problems:
        raise ConfigError("trainable_token_indices cannot be applied:\n  " + "\n  ".join(problems))
    return out


def _target_problems(model: nn.Module, name: str, target: TokenTarget, names: Mapping[str, Any],
                     lora_targets: Mapping[str, Any], to_save: list[str]) -> list[str]:
    if name in lora_targets or isinstance(model.get_submodule(name), LoraLayer):
        return [f"{name} is also a LoRA target (PEFT refuses trainable tokens on a LoRA layer): leave it out of "
                "target_modules, or drop it from trainable_token_indices"]
    if name in to_save or isinstance(model.get_submodule(name), ModulesToSave):
        return [f"{name} is also in modules_to_save (PEFT refuses both): train it whole or train some of its rows"]
    current = model.get_submodule(name)
    if isinstance(current, TrainableTokens) and current.token_adapter.tied != (target.tied_to is not None):
        return [f"{name} already has trainable tokens {'tied to' if current.token_adapter.tied else 'of its own, not'} "
                "the input embedding from another adapter; give this adapter the same layout"]
    info = names[name]
    module = _unwrap(current)
    if info.fan_in_fan_out or not isinstance(module, (nn.Embedding, nn.Linear)):
        return [f"{name} is a {info.type_name}; trainable tokens apply to nn.Embedding (or a linear output head)"]
    rows = int(module.weight.shape[0])
    past = sorted(i for i in target.indices if not 0 <= i < rows)
    if past:
        return [f"{name} has {rows} rows but trainable_token_indices names {past[:8]}: resize the token "
                f"embeddings first (model.resize_token_embeddings(...)) so that every index is a row"]
    return []
