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

A LoRA on an ``nn.Parameter`` (``target_parameters``: PEFT's ``ParamWrapper``, e.g. on the fused 3-D experts of a
transformers-5 MoE layer, see :mod:`lorasurg.engine.experts` for the layout) is saved like a module's, under the
module that holds the parameter; several targeted parameters of one module nest, one ``base_layer`` each, in the
order of the module's own parameters, the first innermost (:func:`wrapper_paths`): Qwen3-MoE's
``mlp.experts.gate_up_proj`` is ``mlp.experts.base_layer.lora_A.weight`` when ``down_proj`` is targeted too
(``mlp.experts.lora_A.weight``).

Anything else (``modules_to_save`` copies saved as ``<module>.weight``, trainable-token rows
``<module>.token_adapter.trainable_tokens_delta`` (:meth:`Adapter.token_rows`), an embedding's
``<module>.base_layer.weight``) is kept verbatim in :attr:`Adapter.extra`. A grouped convolution's ``lora_B`` has
``r / groups`` columns; an ``nn.MultiheadAttention``'s out_proj LoRA is the module ``<attention>.base_layer.out_proj``.
Loading then saving is lossless: same keys, dtypes and tensors.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Mapping, Optional, Sequence, Union

from torch import Tensor

from ..config import CONFIG_NAME, LoraConfig
from ..errors import InputError, LorasurgError
from ..findings import Finding
from ..modules import ModuleInfo
from ..targeting import ALL_LINEAR, anchored_pattern_key, rank_alpha, select_modules, without_parameters
from ._shards import open_shard
from .hub import resolve_source
from .values import nonfinite_findings
from .writer import atomic_output_dir, write_file

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "BIN_WEIGHTS_NAME",
    "KEY_PREFIX",
    "TOKENS_PART",
    "NESTED_OUT_PROJ",
    "AdapterModule",
    "Adapter",
    "peft_key",
    "parse_peft_key",
    "wrapper_paths",
    "wrapped_module",
    "weights_file",
    "read_weights",
]

WEIGHTS_NAME = "adapter_model.safetensors"
BIN_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
#: Where PEFT keeps the out_proj LoRA of a targeted ``nn.MultiheadAttention``, under the attention's name.
NESTED_OUT_PROJ = "base_layer.out_proj"
#: The key part of a module's trainable-token rows (``trainable_token_indices``): ``<module>.<TOKENS_PART>``.
TOKENS_PART = "token_adapter.trainable_tokens_delta"

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
    def groups(self) -> int:
        """The convolution groups the tensors are laid out for: a grouped conv's ``lora_B`` has ``r / groups``
        columns (PEFT's layout); 1 for every other layer."""
        cols = int(self.B.shape[1]) if self.B.dim() > 1 else 0
        if self.kind.startswith("conv") and cols and self.rank != cols and self.rank % cols == 0:
            return self.rank // cols
        return 1

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


def wrapper_paths(module: str, targeted: Sequence[str]) -> dict[str, str]:
    """The module path PEFT saves each targeted parameter's LoRA under (``target_parameters``).

    Args:
        module: the module holding the parameters (``model.layers.0.mlp.experts``).
        targeted: the targeted parameters' leaf names, in the order of the module's own ``named_parameters``.

    Returns:
        ``{leaf: path}``: with ``k`` targeted parameters, the ``j``-th is ``module`` followed by ``k - 1 - j`` times
        ``.base_layer`` (PEFT wraps them in that order, each wrapper around the previous one).
    """
    count = len(targeted)
    return {leaf: module + ".base_layer" * (count - 1 - j) for j, leaf in enumerate(targeted)}


def wrapped_module(path: str) -> str:
    """The module a saved path names, without the ``.base_layer`` parts PEFT's wrappers add."""
    while ".base_layer" in path:
        head, _, tail = path.rpartition(".base_layer")
        path = head + tail
    return path


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
                (or ``adapter_model.bin``, read with ``torch.load(weights_only=True)``), that directory's
                ``adapter_config.json``, or a hub repo id.
            revision: hub revision, for a repo id.
            strict: raise when the tensors do not match the config (see :meth:`problems`); with False the
                adapter is returned as stored and the caller inspects ``problems()``.

        Raises:
            InputError: missing files, unreadable weights, keys that are not PEFT's, or (strict) tensors that
                contradict the config or hold NaN/inf — every problem listed.
        """
        directory = resolve_source(path_or_repo, revision, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, BIN_WEIGHTS_NAME])
        if directory.name == CONFIG_NAME and directory.is_file():  # DIR/adapter_config.json stands for DIR
            directory = directory.parent
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
                    f"adapter at {directory} cannot be used as it is (its tensors contradict its {CONFIG_NAME} or "
                    f"hold NaN/inf):\n  - {listing}\n"
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
        parsed = _parse_state(state)
        if parsed.foreign:
            raise InputError(f"{source}: {next(iter(parsed.foreign.values()))}")
        if parsed.incomplete:
            listing = ", ".join(f"{m} (has {p})" for m, p in parsed.incomplete.items())
            raise InputError(f"{source}: these modules lack lora_A or lora_B: {listing}; the adapter file is incomplete")
        return cls(config, parsed.modules, parsed.extra)

    @classmethod
    def parse_state_dict(cls, config: LoraConfig, state: dict[str, Tensor]) -> tuple["Adapter", list[Finding]]:
        """Like :meth:`from_state_dict`, but a key that is not PEFT's (``key-foreign``) or a module without
        both factors (``module-incomplete``) becomes a finding instead of an error; those tensors are left out.
        """
        parsed = _parse_state(state)
        found = [Finding("key-foreign", key, message, "save the adapter with PEFT or lorasurg")
                 for key, message in parsed.foreign.items()]
        found += [
            Finding("module-incomplete", module, f"lacks lora_A or lora_B (has {parts})",
                    "the adapter file is incomplete: save it again, or drop this module's tensors")
            for module, parts in parsed.incomplete.items()
        ]
        return cls(config, parsed.modules, parsed.extra), found

    # ----------------------------------------------------------------------------------------- tokens
    def token_rows(self) -> dict[str, Tensor]:
        """``{module: rows}`` of the trainable tokens in the file: the ``(k, dim)`` values PEFT writes into rows
        ``trainable_token_indices`` of that module's weight (they replace the rows; they are not a difference)."""
        tail = f".{TOKENS_PART}"
        return {key[: -len(tail)]: t for key, t in self.extra.items() if key.endswith(tail)}

    def token_indices(self) -> dict[str, list[int]]:
        """``{module: indices}`` for each module with token rows, from ``trainable_token_indices``: a dict's first key
        that ends the module's name (PEFT's suffix rule), or the list for every such module; [] when none fits."""
        spec = self.config.trainable_token_indices
        out = {}
        for module in self.token_rows():
            if isinstance(spec, dict):
                key = next((k for k in spec if module.endswith(k)), None)
                out[module] = list(spec[key]) if key is not None else []
            else:
                out[module] = list(spec or [])
        return out

    # ----------------------------------------------------------------------------------------- checking
    def rank_alpha(self, module: str) -> tuple[int, float]:
        """``(r, lora_alpha)`` the config gives ``module`` (rank_pattern / alpha_pattern applied)."""
        return rank_alpha(self.config, module)

    def problems(self) -> list[str]:
        """Every way the stored tensors contradict the config, one line each (empty when consistent).

        The lines of :meth:`findings` (``"<module>: <what is wrong>"``).
        """
        return [str(f) for f in self.findings()]

    def findings(self, selected: Optional[Collection[str]] = None,
                 parameters: Optional[Collection[str]] = None) -> list[Finding]:
        """Every way the stored tensors contradict the config, as :class:`~lorasurg.findings.Finding` s.

        Checks, per module: the config targets it (``tensor-untargeted``); A's rows equal B's columns, or are a
        multiple of them for a grouped convolution (``rank-inconsistent``); the rank equals the config's,
        rank_pattern applied (``rank-mismatch``);
        ``lora_B.bias`` present exactly when ``lora_bias`` is set, never on an embedding, shaped ``(out,)``
        (``bias-*``); DoRA magnitude present exactly when ``use_dora`` is set, one entry per output
        (``magnitude-*``); and every tensor holds finite values (``value-nonfinite``, :func:`nonfinite_findings`).

        Args:
            selected: the modules the config selects in the model, when the caller knows the model; by default
                judged among the adapter's own module names (so ``"all-linear"`` is not checked).
            parameters: the saved paths of the ``target_parameters`` LoRAs the config selects in the model (their
                rank is ``r`` times the experts: the caller checks it); by default judged from names alone.
        """
        wrapped = set(parameters) if parameters is not None else self.parameter_wrapped()
        found: list[Finding] = self._untargeted_modules(selected, wrapped)
        ignored = {f.where for f in found}  # PEFT ignores their tensors: their rank does not matter
        for name, mod in self.modules.items():
            if mod.A.shape[0] != mod.B.shape[1] * mod.groups:
                found.append(Finding(
                    "rank-inconsistent", name, f"A has {mod.A.shape[0]} rows but B has {mod.B.shape[1]} columns",
                    "the factors do not belong together: save the adapter again",
                ))
                continue
            expected_r, _ = self.rank_alpha(name)
            if mod.rank != expected_r and name not in wrapped | ignored:  # a parameter's LoRA: r * experts rows
                found.append(Finding(
                    "rank-mismatch", name, f"stored rank {mod.rank}, config gives r={expected_r} (r / rank_pattern)",
                    f"set rank_pattern {{{anchored_pattern_key(name)!r}: {mod.rank}}} (and alpha_pattern to keep "
                    "the scale), or fix r",
                ))
            found.extend(self._bias_findings(name, mod))
            found.extend(self._magnitude_findings(name, mod))
        return found + nonfinite_findings(self.to_state_dict())

    def _bias_findings(self, name: str, mod: AdapterModule) -> list[Finding]:
        lora_bias, out, found = self.config.lora_bias, mod.B.shape[0], []
        if lora_bias and mod.embedding:
            found.append(Finding("bias-on-embedding", name,
                                 "lora_bias is true but PEFT cannot give an embedding a lora_B bias",
                                 "set lora_bias to false, or do not target the embedding"))
        elif lora_bias and mod.bias is None:
            found.append(Finding("bias-missing", name,
                                 "lora_bias is true but lora_B.bias is missing (PEFT warns of a missing key)",
                                 "PEFT starts it at zero; save a zero lora_B.bias to silence the warning"))
        if not lora_bias and mod.bias is not None:
            found.append(Finding("bias-unflagged", name,
                                 "has lora_B.bias but lora_bias is false (PEFT would drop it silently)",
                                 "set lora_bias to true (lorasurg validate --fix does)"))
        if mod.bias is not None and tuple(mod.bias.shape) != (out,):
            found.append(Finding("bias-shape", name, f"lora_B.bias has shape {tuple(mod.bias.shape)}, expected ({out},)",
                                 "save the adapter again: the bias belongs to another layer"))
        return found

    def _magnitude_findings(self, name: str, mod: AdapterModule) -> list[Finding]:
        use_dora, out, found = self.config.use_dora, mod.B.shape[0], []
        if use_dora and mod.magnitude is None:
            found.append(Finding("magnitude-missing", name, "use_dora is true but lora_magnitude_vector is missing",
                                 "PEFT would compute a fresh magnitude from the base weight: save the trained one"))
        if not use_dora and mod.magnitude is not None:
            found.append(Finding("magnitude-unflagged", name, "has lora_magnitude_vector but use_dora is false",
                                 "set use_dora to true if this is a DoRA adapter"))
        if mod.magnitude is not None and mod.magnitude.numel() != out:
            found.append(Finding("magnitude-shape", name,
                                 f"lora_magnitude_vector has {mod.magnitude.numel()} entries, expected {out}",
                                 "save the adapter again: the magnitude belongs to another layer"))
        return found

    def _untargeted_modules(self, selected: Optional[Collection[str]], wrapped: set[str]) -> list[Finding]:
        """Modules with tensors that the config's target_modules would not select (PEFT drops their tensors).

        Without ``selected``, judged among the adapter's own module names, so ``"all-linear"`` (which needs the
        model) is not checked; nor is ``target_modules`` None (PEFT's default targets per model type).
        """
        target = self.config.target_modules
        if selected is None:
            if not self.modules or (isinstance(target, str) and target.lower() == ALL_LINEAR):
                return []
            if target is None and not self.config.target_parameters:
                return []
            infos = {name: ModuleInfo(mod.kind, mod.kind) for name, mod in self.modules.items() if name not in wrapped}
            config = copy.copy(without_parameters(self.config))
            config.layer_replication = None  # the file's names are those of the replicated stack already
            try:
                selected = select_modules(config, infos) if target is not None and infos else ()
            except LorasurgError:
                selected = ()
        chosen = set(selected) | wrapped
        chosen |= {f"{name}.{NESTED_OUT_PROJ}" for name in chosen}  # an attention's out_proj LoRA (PEFT's layout)
        return [
            Finding(
                "tensor-untargeted", name,
                f"has LoRA tensors but target_modules={_shown(target)} does not select it (PEFT would ignore them)",
                "add it to target_modules, or drop its tensors (lorasurg validate --fix does)",
            )
            for name in self.modules
            if name not in chosen
        ]

    def parameter_wrapped(self) -> set[str]:
        """Modules whose tensors a ``target_parameters`` entry can account for, judged from names alone: a saved
        path with ``.base_layer`` in it, or a module an entry's module part is a ``.``-suffix of (an entry without
        a module part, ``gate_up_proj``, can name a parameter of any module)."""
        entries = list(self.config.target_parameters or [])
        if not entries:
            return set()
        owners = [entry.rpartition(".")[0] for entry in entries]
        found = set()
        for name in self.modules:
            module = wrapped_module(name)
            if module != name or any(not o or module == o or module.endswith("." + o) for o in owners):
                found.add(name)
        return found

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
        with atomic_output_dir(directory, force) as tmp:
            self.config.save_pretrained(tmp)
            write_file(tmp, self.to_state_dict(), WEIGHTS_NAME.removesuffix(".safetensors"), metadata)
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


@dataclass
class _Parsed:
    """A state dict sorted into LoRA modules, extra tensors, foreign keys (with why) and incomplete modules."""

    modules: dict[str, AdapterModule]
    extra: dict[str, Tensor]
    foreign: dict[str, str]
    incomplete: dict[str, list[str]]


def _parse_state(state: dict[str, Tensor]) -> _Parsed:
    parts: dict[str, dict[str, Tensor]] = {}
    embedding: dict[str, bool] = {}
    parsed = _Parsed({}, {}, {}, {})
    for key, tensor in state.items():
        try:
            module, part = parse_peft_key(key)
        except InputError as err:
            parsed.foreign[key] = str(err)
            continue
        if part is None:
            parsed.extra[module] = tensor
            continue
        slot, is_embedding = _LORA_PARTS[part]
        parts.setdefault(module, {})[slot] = tensor
        embedding[module] = embedding.get(module, False) or is_embedding
    for m, p in parts.items():
        if "A" in p and "B" in p:
            parsed.modules[m] = AdapterModule(m, p["A"], p["B"], p.get("bias"), p.get("magnitude"), embedding[m])
        else:
            parsed.incomplete[m] = sorted(p)
    return parsed


def weights_file(directory: Path) -> Optional[Path]:
    """The weights file of the adapter in ``directory``: ``adapter_model.safetensors`` (preferred, as PEFT
    does) or ``adapter_model.bin``; None when there is neither."""
    return next((directory / n for n in (WEIGHTS_NAME, BIN_WEIGHTS_NAME) if (directory / n).is_file()), None)


def read_weights(path: Path) -> dict[str, Tensor]:
    """Every tensor of one adapter weights file, keys as stored.

    Read through the checkpoint reader's shard readers: owned copies, ``.bin`` only with
    ``torch.load(weights_only=True)``, corrupt files named with what is wrong.

    Raises:
        InputError: the file is missing, truncated, corrupt, or (``.bin``) needs code to unpickle.
    """
    shard = open_shard(path)
    try:
        return {entry.name: shard.read(entry.name) for entry in shard.entries()}
    finally:
        shard.close()


def _read_weights(directory: Path) -> dict[str, Tensor]:
    """Tensors of the adapter's weights file in ``directory`` (:func:`weights_file`, :func:`read_weights`)."""
    path = weights_file(directory)
    if path is None:
        present = sorted(p.name for p in directory.iterdir())
        raise InputError(f"{directory} has neither {WEIGHTS_NAME} nor {BIN_WEIGHTS_NAME} (found: {present})")
    return read_weights(path)


def _shown(target: object) -> str:
    """target_modules as a user wrote it: a regex string, or a sorted list."""
    return repr(target) if isinstance(target, str) or target is None else repr(sorted(target))
