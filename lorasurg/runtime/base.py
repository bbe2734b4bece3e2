"""What every LoRA wrapper shares: PEFT's module layout, per-adapter hyperparameters, merge and unmerge.

A wrapper replaces one layer of a model. It keeps the layer as ``base_layer`` and, per adapter name, the LoRA
tensors in the containers PEFT uses, so that ``model.state_dict()`` has PEFT's keys:

=========================================  ====================================================================
``base_layer``                             the original layer (its parameters keep their names under it)
``lora_dropout.<adapter>``                 ``nn.Dropout`` or ``nn.Identity`` (no parameters)
``lora_A.<adapter>`` / ``lora_B.<adapter>``  ``nn.Linear`` or ``nn.ConvNd`` modules (linear and conv layers)
``lora_embedding_A/B.<adapter>``           parameters of an ``nn.ParameterDict`` (embedding layers)
``lora_magnitude_vector.<adapter>``        :class:`~lorasurg.runtime.dora.DoraMagnitude` (DoRA only)
=========================================  ====================================================================

The math of merging is the engine's (:mod:`lorasurg.engine.factors`): :meth:`LoraLayer.factors` views an adapter's
parameters as :class:`~lorasurg.engine.factors.LoraFactors`, and merge/unmerge call ``merged_weight``,
``unmerged_weight``, ``delta_bias`` and ``dora_weight_norm``. Forward passes live in the subclasses
(:mod:`lorasurg.runtime.layers`).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from ..engine.factors import LoraFactors, delta_bias, dora_weight_norm, merged_weight, unmerged_weight
from ..modules import ModuleInfo

__all__ = ["LoraLayer"]


class LoraLayer(nn.Module):
    """Base of the LoRA wrappers: holds ``base_layer``, the adapters, which are active, and merge state.

    Attributes:
        base_layer: the wrapped layer.
        info: the layer's :class:`~lorasurg.modules.ModuleInfo` (kind, fan_in_fan_out, weight shape).
        r, lora_alpha, scaling: per adapter name; ``scaling`` is ``alpha / r`` or ``alpha / sqrt(r)`` (rsLoRA).
        active_adapters: names whose LoRA is added in forward (and merged by :meth:`merge`).
        disabled: when True, forward is the base layer's alone.
        merged_adapters: names currently merged into ``base_layer``'s weight, in merge order.
    """

    def __init__(self, base_layer: nn.Module, info: ModuleInfo) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.info = info
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.disabled = False
        self.merged_adapters: list[str] = []
        self._merge_norms: dict[str, Tensor] = {}  # DoRA row norms taken at merge time, needed to unmerge
        self._created_bias = False  # merge gave a bias-less layer a bias (lora_bias); unmerge removes it

    # ----------------------------------------------------------------------------------------------- adapters
    @property
    def adapter_names(self) -> list[str]:
        """Names of the adapters this layer holds, in the order they were added."""
        return list(self.r)

    @property
    def merged(self) -> bool:
        """True when at least one adapter is merged into the base weight."""
        return bool(self.merged_adapters)

    def _allocate(self, name: str, r: int, lora_bias: bool) -> None:
        """Create the (uninitialised) LoRA tensors of adapter ``name``; subclasses know the layer's shapes."""
        raise NotImplementedError

    def add_adapter(
        self,
        name: str,
        r: int,
        lora_alpha: float,
        scale: float,
        *,
        dropout: float = 0.0,
        lora_bias: bool = False,
        use_dora: bool = False,
    ) -> None:
        """Add adapter ``name`` with uninitialised tensors on the base weight's device and dtype.

        Fill them with :meth:`set_tensors` (injection does this from an init method, loading from a file).

        Args:
            name: adapter name (the ``<adapter>`` segment of the state_dict keys).
            r, lora_alpha: rank and alpha, kept for reference; ``scale`` is what forward and merge use.
            scale: ``alpha / r`` or ``alpha / sqrt(r)``, see :func:`lorasurg.engine.factors.lora_scale`.
            dropout: probability of LoRA's input dropout (``nn.Identity`` when 0).
            lora_bias: give ``lora_B`` a bias.
            use_dora: add DoRA's magnitude vector.
        """
        self.r[name] = r
        self.lora_alpha[name] = lora_alpha
        self.scaling[name] = scale
        self.lora_dropout[name] = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        self._allocate(name, r, lora_bias)
        if use_dora:
            from .dora import DoraMagnitude, magnitude_shape

            weight = self.base_layer.weight
            shape = magnitude_shape(self.info.kind, self.out_features)
            self.lora_magnitude_vector[name] = DoraMagnitude(torch.empty(shape, device=weight.device, dtype=weight.dtype))

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (unmerging everything first if it is merged)."""
        if name in self.merged_adapters:
            self.unmerge()
        for container in (self.lora_dropout, self.lora_A, self.lora_B, self.lora_embedding_A, self.lora_embedding_B,
                          self.lora_magnitude_vector):
            if name in container:
                del container[name]
        for table in (self.r, self.lora_alpha, self.scaling):
            table.pop(name, None)
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def _ab(self, name: str) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """(A, B, lora_B bias) parameters of adapter ``name`` in PEFT's stored layout."""
        if name in self.lora_embedding_A:
            return self.lora_embedding_A[name], self.lora_embedding_B[name], None
        return self.lora_A[name].weight, self.lora_B[name].weight, self.lora_B[name].bias

    def factors(self, name: str) -> LoraFactors:
        """Adapter ``name`` as engine factors, sharing this layer's live parameters (not detached)."""
        A, B, bias = self._ab(name)
        magnitude = self.lora_magnitude_vector[name].weight if name in self.lora_magnitude_vector else None
        return LoraFactors(self.info.kind, A, B, self.scaling[name], bias=bias, magnitude=magnitude,
                           fan_in_fan_out=self.info.fan_in_fan_out)

    @torch.no_grad()
    def set_tensors(self, name: str, A: Tensor, B: Tensor, bias: Optional[Tensor] = None,
                    magnitude: Optional[Tensor] = None) -> None:
        """Copy tensors into adapter ``name`` (cast to the parameters' dtype; shapes must already match).

        A missing ``bias`` zeroes ``lora_B``'s bias; a ``magnitude`` is reshaped to PEFT's stored shape, a missing
        one leaves the magnitude as it is.
        """
        A_param, B_param, bias_param = self._ab(name)
        A_param.copy_(A)
        B_param.copy_(B)
        if bias_param is not None and bias is not None:
            bias_param.copy_(bias)
        elif bias_param is not None:
            bias_param.zero_()
        if magnitude is not None and name in self.lora_magnitude_vector:
            target = self.lora_magnitude_vector[name].weight
            target.copy_(magnitude.reshape(target.shape))  # (out,) or (1, out, 1, ...) -> stored shape

    @torch.no_grad()
    def reset_magnitude(self, name: str) -> None:
        """Set DoRA's magnitude to ``||W + delta||_row`` (so the adapted layer starts at ``W + delta``)."""
        target = self.lora_magnitude_vector[name].weight
        norm = dora_weight_norm(self._detached_factors(name), self.base_layer.weight)  # (out,)
        target.copy_(norm.reshape(target.shape))  # (out,) -> (out,) or (1, out, 1, ...)

    def _detached_factors(self, name: str) -> LoraFactors:
        f = self.factors(name)
        return LoraFactors(f.kind, f.A.detach(), f.B.detach(), f.scale,
                           bias=None if f.bias is None else f.bias.detach(),
                           magnitude=None if f.magnitude is None else f.magnitude.detach(),
                           fan_in_fan_out=f.fan_in_fan_out)

    # ---------------------------------------------------------------------------------------------- merging
    @torch.no_grad()
    def _bare_base_weight(self) -> Tensor:
        """The base weight with every merged adapter taken out (a new tensor)."""
        weight = self.base_layer.weight.detach().clone()
        for name in reversed(self.merged_adapters):
            weight = unmerged_weight(self._detached_factors(name), weight, self._merge_norms.get(name))
        return weight

    @torch.no_grad()
    def merge(self, names: Optional[Iterable[str]] = None) -> None:
        """Merge adapters (default: the active ones) into the base layer's weight and bias.

        ``W <- merged_weight(W)``; a DoRA adapter's row norms are those of the bare base weight plus its delta
        (as its forward computes them), kept to unmerge. A ``lora_B`` bias adds ``scale * b`` to the base bias;
        a base layer without a bias gets one (PEFT 0.21.2 raises there instead).
        """
        names = list(self.active_adapters if names is None else names)
        base = self.base_layer
        for name in names:
            if name in self.merged_adapters or name not in self.r:
                continue
            f = self._detached_factors(name)
            norm = None
            if f.magnitude is not None:
                bare = self._bare_base_weight() if self.merged_adapters else base.weight
                norm = dora_weight_norm(f, bare)  # (out,)
                self._merge_norms[name] = norm
            base.weight.data = merged_weight(f, base.weight.data, norm)
            db = delta_bias(f, base.weight.dtype)
            if db is not None:
                if base.bias is None:
                    base.bias = nn.Parameter(torch.zeros_like(db), requires_grad=False)
                    self._created_bias = True
                base.bias.data = base.bias.data + db
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take every merged adapter out of the base weight and bias, in reverse merge order."""
        base = self.base_layer
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            f = self._detached_factors(name)
            base.weight.data = unmerged_weight(f, base.weight.data, self._merge_norms.pop(name, None))
            db = delta_bias(f, base.weight.dtype)
            if db is not None:
                base.bias.data = base.bias.data - db
        if self._created_bias:
            base.bias = None
            self._created_bias = False

    # ------------------------------------------------------------------------------------- attribute access
    @property
    def weight(self) -> Tensor:
        """The base layer's weight (model code that reads ``layer.weight`` keeps working)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[Tensor]:
        """The base layer's bias (None for a layer without one, e.g. an embedding)."""
        return getattr(self.base_layer, "bias", None)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "base_layer" not in modules:
                raise
            return getattr(modules["base_layer"], name)

    def _skip_lora(self) -> bool:
        """True when forward is the base layer's alone (unmerging first if adapters are disabled)."""
        if self.disabled:
            if self.merged:
                self.unmerge()
            return True
        return self.merged or not self.active_adapters

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self.active_adapters}, merged={self.merged_adapters}"
