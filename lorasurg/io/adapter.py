"""PEFT LoRA adapters on disk: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``).

All of PEFT's tensor key naming lives in this module. A key in the file is
``base_model.model.<module>.<part>`` with ``<part>`` one of

=============================  ==========================  ================================
part                           meaning                     shape
=============================  ==========================  ================================
``lora_A.weight``              A (Linear / Conv)           (r, in[, *k])
``lora_B.weight``              B (Linear / Conv)           (out, r[, 1, ...])
``lora_B.bias``                lora_bias                   (out,)
``lora_embedding_A``           A (Embedding)               (r, num_embeddings)
``lora_embedding_B``           B (Embedding)               (embedding_dim, r)
``lora_magnitude_vector``      DoRA magnitude              (out,) or (1, out, 1, ...) for conv
=============================  ==========================  ================================

Anything else (``modules_to_save`` copies saved as ``<module>.weight``, trainable-token deltas
``<module>.token_adapter.trainable_tokens_delta``, an embedding's ``<module>.base_layer.weight``) is kept
verbatim in :attr:`Adapter.extra`. Loading then saving is lossless: same keys, dtypes and tensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Union

from safetensors.torch import save_file
from torch import Tensor

from ..config import CONFIG_NAME, LoraConfig
from ..errors import InputError, LorasurgError
from ..modules import ModuleInfo
from ..targeting import ALL_LINEAR, rank_alpha, select_modules
from ._shards import open_shard
from .hub import resolve_source
from .writer import atomic_output_dir

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "BIN_WEIGHTS_NAME",
    "KEY_PREFIX",
    "AdapterModule",
    "Adapter",
    "peft_key",
    "parse_peft_key",
]

WEIGHTS_NAME = "adapter_model.safetensors"
BIN_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."

# part of a PEFT key -> (AdapterModule field, is an embedding LoRA)
_LORA_PARTS: dict[str, tuple[str, bool]] = {
    "lora_A.weight": ("A", False),
    "lora_B.weight": ("B", False),
    "lora_B.bias": ("bias", False),
    "lora_embedding_A": ("A", True),
    "lora_embedding_B": ("B", True),
    "lora_magnitude_vector": ("magnitude", False),
}
# Older PEFT releases saved the DoRA magnitude with a ".weight" suffix; read it, write the current name.
_LEGACY_PARTS: dict[str, str] = {"lora_magnitude_vector.weight": "lora_magnitude_vector"}

PathLike = Union[str, os.PathLike]


@dataclass
class AdapterModule:
    """The stored LoRA tensors of one module, in PEFT's file layout (see the module docstring).

    Attributes:
        name: the module's path in the model, without ``base_model.model.`` (``model.layers.0.self_attn.q_proj``).
        A, B: ``lora_A``/``lora_B`` weights (``lora_embedding_A``/``_B`` when ``embedding``).
        bias: ``lora_B.bias`` or None.
        magnitude: DoRA's ``lora_magnitude_vector`` or None.
        embedding: stored under the embedding key names.
    """

    name: str
    A: Tensor
    B: Tensor
    bias: Optional[Tensor] = None
    magnitude: Optional[Tensor] = None
    embedding: bool = False

    @property
    def rank(self) -> int:
        """r, the number of rows of A."""
        return int(self.A.shape[0])

    @property
    def kind(self) -> str:
        """Layer kind the tensors are shaped for: embedding, linear, conv1d, conv2d or conv3d."""
        if self.embedding:
            return "embedding"
        return "linear" if self.A.dim() == 2 else f"conv{self.A.dim() - 2}d"

    def tensors(self) -> dict[str, Tensor]:
        """``{PEFT key part: tensor}`` for this module (keys without the module name)."""
        prefix = "lora_embedding_" if self.embedding else ""
        parts = {
            (f"{prefix}A" if self.embedding else "lora_A.weight"): self.A,
            (f"{prefix}B" if self.embedding else "lora_B.weight"): self.B,
        }
        if self.bias is not None:
            parts["lora_B.bias"] = self.bias
        if self.magnitude is not None:
            parts["lora_magnitude_vector"] = self.magnitude
        return parts


def peft_key(module: str, part: str) -> str:
    """The key PEFT saves ``part`` of ``module`` under: ``base_model.model.<module>.<part>``."""
    return f"{KEY_PREFIX}{module}.{part}"


def parse_peft_key(key: str) -> tuple[str, Optional[str]]:
    """Split a saved key into ``(module, lora part)``; the part is None for a non-LoRA tensor.

    For a non-LoRA tensor the first element is the full key without ``base_model.model.``.

    Raises:
        InputError: the key does not start with ``base_model.model.``.
    """
    if not key.startswith(KEY_PREFIX):
        raise InputError(
            f"tensor key {key!r} does not start with {KEY_PREFIX!r}; this is not a PEFT adapter file "
            "(PEFT saves every key under that prefix)"
        )
    rest = key[len(KEY_PREFIX) :]
    for table in (_LORA_PARTS, _LEGACY_PARTS):
        for part in table:
            if rest.endswith("." + part):
                return rest[: -len(part) - 1], _LEGACY_PARTS.get(part, part)
    return rest, None


@dataclass
class Adapter:
    """A LoRA adapter: its config, the LoRA tensors of each module, and any other saved tensors.

    Attributes:
        config: the adapter's :class:`~lorasurg.config.LoraConfig`.
        modules: ``{module name: AdapterModule}`` in file order.
        extra: non-LoRA tensors (modules_to_save copies, trainable-token deltas, ...) keyed by their name
            without ``base_model.model.``.
    """

    config: LoraConfig
    modules: dict[str, AdapterModule] = field(default_factory=dict)
    extra: dict[str, Tensor] = field(default_factory=dict)

    # ----------------------------------------------------------------------------------------- reading
    @classmethod
    def load(cls, path_or_repo: PathLike, revision: Optional[str] = None, *, strict: bool = True) -> "Adapter":
        """Read an adapter directory (or hub repo id) written by PEFT or lorasurg.

        Args:
            path_or_repo: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``
                (or ``adapter_model.bin``, read with ``torch.load(weights_only=True)``), or a hub repo id.
            revision: hub revision, for a repo id.
            strict: raise when the tensors do not match the config (see :meth:`problems`); with False the
                adapter is returned as stored and the caller inspects ``problems()``.

        Raises:
            InputError: missing files, unreadable weights, keys that are not PEFT's, or (strict) tensors that
                contradict the config — every problem listed.
        """
        directory = resolve_source(path_or_repo, revision, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, BIN_WEIGHTS_NAME])
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise InputError(f"{directory} has no {CONFIG_NAME}; is this a PEFT adapter directory?")
        config = LoraConfig.from_pretrained(config_path)
        state = _read_weights(directory)
        adapter = cls.from_state_dict(config, state, source=str(directory))
        if strict:
            found = adapter.problems()
            if found:
                listing = "\n  - ".join(found)
                raise InputError(
                    f"adapter at {directory} does not match its {CONFIG_NAME}:\n  - {listing}\n"
                    "Fix the config or the tensors (lorasurg validate shows the same list)."
                )
        return adapter

    @classmethod
    def from_state_dict(cls, config: LoraConfig, state: dict[str, Tensor], source: str = "state dict") -> "Adapter":
        """Build an adapter from PEFT-keyed tensors (``base_model.model.`` prefix, adapter name removed).

        Raises:
            InputError: a key is not under ``base_model.model.``, or a module has only one of A and B, or a
                bias/magnitude without factors (all offending modules listed).
        """
        parts: dict[str, dict[str, Tensor]] = {}
        embedding: dict[str, bool] = {}
        extra: dict[str, Tensor] = {}
        for key, tensor in state.items():
            try:
                module, part = parse_peft_key(key)
            except InputError as err:
                raise InputError(f"{source}: {err}") from err
            if part is None:
                extra[module] = tensor
                continue
            slot, is_embedding = _LORA_PARTS[part]
            parts.setdefault(module, {})[slot] = tensor
            embedding[module] = embedding.get(module, False) or is_embedding
        incomplete = [f"{m} (has {sorted(p)})" for m, p in parts.items() if "A" not in p or "B" not in p]
        if incomplete:
            raise InputError(
                f"{source}: these modules lack lora_A or lora_B: {', '.join(incomplete)}; "
                "the adapter file is incomplete"
            )
        modules = {
            m: AdapterModule(m, p["A"], p["B"], p.get("bias"), p.get("magnitude"), embedding[m]) for m, p in parts.items()
        }
        return cls(config, modules, extra)

    # ----------------------------------------------------------------------------------------- checking
    def rank_alpha(self, module: str) -> tuple[int, float]:
        """``(r, lora_alpha)`` the config gives ``module`` (rank_pattern / alpha_pattern applied)."""
        return rank_alpha(self.config, module)

    def problems(self) -> list[str]:
        """Every way the stored tensors contradict the config (empty when consistent).

        Checks, per module: A's rows equal B's columns; the rank equals the config's (rank_pattern applied);
        ``lora_B.bias`` present exactly when ``lora_bias`` is set; DoRA magnitude present exactly when
        ``use_dora`` is set, with one entry per output.
        """
        found: list[str] = self._untargeted_modules()
        cfg = self.config
        for name, mod in self.modules.items():
            if mod.A.shape[0] != mod.B.shape[1]:
                found.append(f"{name}: A has {mod.A.shape[0]} rows but B has {mod.B.shape[1]} columns")
                continue
            expected_r, _ = self.rank_alpha(name)
            if mod.rank != expected_r:
                found.append(f"{name}: stored rank {mod.rank}, config gives r={expected_r} (r / rank_pattern)")
            out = mod.B.shape[0]
            if cfg.lora_bias and mod.embedding:
                found.append(f"{name}: lora_bias is true but PEFT cannot give an embedding a lora_B bias")
            elif cfg.lora_bias and mod.bias is None:
                found.append(f"{name}: lora_bias is true but lora_B.bias is missing (PEFT warns of a missing key)")
            if not cfg.lora_bias and mod.bias is not None:
                found.append(f"{name}: has lora_B.bias but lora_bias is false (PEFT would drop it silently)")
            if mod.bias is not None and tuple(mod.bias.shape) != (out,):
                found.append(f"{name}: lora_B.bias has shape {tuple(mod.bias.shape)}, expected ({out},)")
            if cfg.use_dora and mod.magnitude is None:
                found.append(f"{name}: use_dora is true but lora_magnitude_vector is missing")
            if not cfg.use_dora and mod.magnitude is not None:
                found.append(f"{name}: has lora_magnitude_vector but use_dora is false")
            if mod.magnitude is not None and mod.magnitude.numel() != out:
                found.append(f"{name}: lora_magnitude_vector has {mod.magnitude.numel()} entries, expected {out}")
        return found

    def _untargeted_modules(self) -> list[str]:
        """Modules with tensors that the config's target_modules would not select (PEFT drops their tensors).

        Judged among the adapter's own module names, so ``"all-linear"`` (which needs the model) is not checked.
        """
        target = self.config.target_modules
        if not self.modules or (isinstance(target, str) and target.lower() == ALL_LINEAR):
            return []
        infos = {name: ModuleInfo(mod.kind, mod.kind) for name, mod in self.modules.items()}
        try:
            selected = set(select_modules(self.config, infos))
        except LorasurgError:
            selected = set()
        return [
            f"{name}: has LoRA tensors but target_modules={_shown(target)} does not select it (PEFT would ignore them)"
            for name in self.modules
            if name not in selected
        ]

    # ----------------------------------------------------------------------------------------- writing
    def to_state_dict(self) -> dict[str, Tensor]:
        """The PEFT-keyed tensors of this adapter (what :meth:`save` writes)."""
        state: dict[str, Tensor] = {}
        for name, mod in self.modules.items():
            for part, tensor in mod.tensors().items():
                state[peft_key(name, part)] = tensor
        for name, tensor in self.extra.items():
            state[KEY_PREFIX + name] = tensor
        return state

    def save(self, directory: PathLike, force: bool = False, metadata: Optional[Mapping[str, str]] = None) -> Path:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory``, atomically.

        Args:
            metadata: extra string entries for the safetensors header (``{"format": "pt"}`` is always there),
                e.g. where the adapter came from.

        Raises:
            OutputExistsError: ``directory`` exists, is not empty, and ``force`` is false.
        """
        state = {k: v.detach().contiguous() for k, v in self.to_state_dict().items()}
        with atomic_output_dir(directory, force) as tmp:
            self.config.save_pretrained(tmp)
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={**(metadata or {}), "format": "pt"})
        return Path(directory)

    @staticmethod
    def read_metadata(path_or_repo: PathLike) -> dict[str, str]:
        """The safetensors header metadata of a saved adapter (``{}`` for a ``.bin`` adapter or none stored)."""
        path = Path(path_or_repo) / WEIGHTS_NAME
        if not path.is_file():
            return {}
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})

    # ----------------------------------------------------------------------------------------- summary
    def num_parameters(self) -> int:
        """Total number of elements in every stored tensor."""
        return sum(t.numel() for t in self.to_state_dict().values())

    def num_bytes(self) -> int:
        """Total bytes of tensor data in every stored tensor."""
        return sum(t.numel() * t.element_size() for t in self.to_state_dict().values())


def _read_weights(directory: Path) -> dict[str, Tensor]:
    """Tensors of ``adapter_model.safetensors`` (preferred) or ``adapter_model.bin`` in ``directory``.

    Read through the checkpoint reader's shard readers: owned copies, ``.bin`` only with
    ``torch.load(weights_only=True)``, corrupt files named with what is wrong.
    """
    for filename in (WEIGHTS_NAME, BIN_WEIGHTS_NAME):
        path = directory / filename
        if path.is_file():
            shard = open_shard(path)
            try:
                return {entry.name: shard.read(entry.name) for entry in shard.entries()}
            finally:
                shard.close()
    present = sorted(p.name for p in directory.iterdir())
    raise InputError(f"{directory} has neither {WEIGHTS_NAME} nor {BIN_WEIGHTS_NAME} (found: {present})")

def _shown(target: object) -> str:
    """target_modules as a user wrote it: a regex string, or a sorted list."""
    return repr(target) if isinstance(target, str) or target is None else repr(sorted(target))
