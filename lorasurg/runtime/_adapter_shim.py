"""TEMPORARY shim for lorasurg.io.adapter (the lead writes it). DELETE when lorasurg/io/adapter.py lands.

Same interface: ``Adapter(config, modules, extra)``, ``Adapter.load(path)``, ``Adapter.save(dir, force=False)``,
``AdapterModule(name, A, B, bias=None, magnitude=None, embedding=False)``. Local directories only; the config is
read with PEFT's LoraConfig (PEFT is installed in the dev environment) until lorasurg.config lands.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from safetensors.torch import load_file, save_file
from torch import Tensor

from ..errors import InputError, OutputExistsError

_PREFIX = "base_model.model."
_SUFFIXES = {
    ".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "bias", ".lora_embedding_A": "eA",
    ".lora_embedding_B": "eB", ".lora_magnitude_vector": "magnitude",
}


@dataclass
class AdapterModule:
    name: str
    A: Tensor
    B: Tensor
    bias: Optional[Tensor] = None
    magnitude: Optional[Tensor] = None
    embedding: bool = False


@dataclass
class Adapter:
    config: Any
    modules: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: str) -> "Adapter":
        if not os.path.isdir(path):
            raise InputError(f"adapter directory {path} not found")
        import peft

        config = peft.LoraConfig.from_pretrained(path)
        tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
        parts: dict[str, dict[str, Tensor]] = {}
        extra: dict[str, Tensor] = {}
        for key, value in tensors.items():
            key = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
            for suffix, role in _SUFFIXES.items():
                if key.endswith(suffix):
                    parts.setdefault(key[: -len(suffix)], {})[role] = value
                    break
            else:
                extra[key] = value
        modules = {}
        for name, p in parts.items():
            emb = "eA" in p
            modules[name] = AdapterModule(name, p["eA"] if emb else p["A"], p["eB"] if emb else p["B"], p.get("bias"),
                                          p.get("magnitude"), emb)
        return cls(config, modules, extra)

    def save(self, directory: str, force: bool = False) -> None:
        if os.path.isdir(directory) and os.listdir(directory) and not force:
            raise OutputExistsError(f"{directory} exists and is not empty")
        os.makedirs(directory, exist_ok=True)
        tensors = {}
        for name, m in self.modules.items():
            if m.embedding:
                tensors[f"{_PREFIX}{name}.lora_embedding_A"] = m.A
                tensors[f"{_PREFIX}{name}.lora_embedding_B"] = m.B
            else:
                tensors[f"{_PREFIX}{name}.lora_A.weight"] = m.A
                tensors[f"{_PREFIX}{name}.lora_B.weight"] = m.B
            if m.bias is not None:
                tensors[f"{_PREFIX}{name}.lora_B.bias"] = m.bias
            if m.magnitude is not None:
                tensors[f"{_PREFIX}{name}.lora_magnitude_vector"] = m.magnitude
        for key, value in self.extra.items():
            tensors[f"{_PREFIX}{key}"] = value
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, os.path.join(directory, "adapter_model.safetensors"))
        data = self.config.to_dict()
        for key, value in list(data.items()):
            if isinstance(value, set):
                data[key] = sorted(value)
            elif hasattr(value, "value"):
                data[key] = value.value
        data.pop("runtime_config", None)
        with open(os.path.join(directory, "adapter_config.json"), "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
