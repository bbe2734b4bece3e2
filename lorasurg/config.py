"""``LoraConfig``: PEFT 0.21.2's LoRA configuration, field for field, and ``adapter_config.json`` I/O.

Every field of ``peft.LoraConfig`` (and its ``PeftConfig`` base) is here with the same name and default.
Construction normalises the way PEFT does (``target_modules``/``exclude_modules`` list -> set,
``peft_type`` -> ``"LORA"``, nested sub-configs filled with PEFT's defaults), warns where PEFT warns, and
refuses what PEFT refuses. It also refuses values PEFT only fails on later, when it builds the layers
(``r`` not a positive int, an unknown ``bias`` or ``init_lora_weights``, a dropout outside [0, 1], ...),
and a few values PEFT silently mangles (see :class:`LoraConfig`). Every problem is collected before raising.

Differences from PEFT, on purpose:

* Sub-configs (``eva_config``, ``corda_config``, ``lora_ga_config``, ``velora_config``,
  ``monteclora_config``, ``use_bdlora``, ``arrow_config``, ``kasa_config``, ``loftq_config``,
  ``runtime_config``) are plain dicts, not dataclasses; PEFT writes them as the same dicts.
* ``peft_version`` stays ``None`` unless given (PEFT fills in its own version). A file written with
  ``peft_version`` None says :data:`WRITTEN_PEFT_VERSION`, the PEFT release whose format lorasurg writes.
  PEFT 0.21.2 reads any ``peft_version`` string without a warning, newer ones included; a loaded config
  keeps the version its file names.
* A wrong *type* raises :class:`ConfigTypeError`, which is both a :class:`~lorasurg.errors.ConfigError`
  (so a ``ValueError``) and a ``TypeError``: PEFT raises ``TypeError`` for those it checks.
* Keys a file has that this version does not know (a newer PEFT) are kept, written back, and warned
  about; PEFT drops them with a warning.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from . import _subconfigs
from ._config_checks import field_problems
from ._subconfigs import Problem
from .errors import ConfigError, ConfigTypeError, InputError
from .io.atomic import atomic_output_file
from .io.hub import looks_like_repo_id, resolve_source

__all__ = [
    "LoraConfig", "TaskType", "CONFIG_NAME", "WRITTEN_PEFT_VERSION", "ConfigReading", "read_config_json",
    "read_config_leniently",
]

CONFIG_NAME = "adapter_config.json"
#: ``peft_version`` written when a config has none: the PEFT release whose format lorasurg follows.
WRITTEN_PEFT_VERSION = "0.21.2"

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class TaskType(str, enum.Enum):
    """The task an adapter's model head serves; the same members as ``peft.TaskType``."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


_TASK_TYPES = tuple(t.value for t in TaskType)


@dataclass
class LoraConfig:
    """PEFT's ``LoraConfig`` (0.21.2): same fields, defaults, normalisation, warnings and refusals.

    See PEFT's documentation for what each field means; ``scale = lora_alpha / r`` (``lora_alpha /
    sqrt(r)`` with ``use_rslora``), per module from ``rank_pattern``/``alpha_pattern``.

    Beyond PEFT's own checks this refuses (PEFT accepts them here but fails or misbehaves later):
    ``r`` or a ``rank_pattern`` value that is not a positive int; ``lora_alpha``/``alpha_pattern`` values
    that are not numbers; ``lora_dropout`` outside [0, 1]; ``bias`` not in none/all/lora_only;
    ``init_lora_weights`` not one PEFT's layers know; ``rank_pattern``/``alpha_pattern`` None; lists of
    the wrong element type; a string ``modules_to_save`` (PEFT matches it character by character); and a
    ``peft_type`` other than LORA (PEFT overwrites it).

    Raises:
        ConfigError: a value or combination is refused; the message lists every problem, naming the
            field(s) and the fix. :class:`ConfigTypeError` when any problem is a wrong type.
    """

    task_type: Optional[Union[str, TaskType]] = None
    peft_type: Optional[str] = None
    auto_mapping: Optional[dict] = None
    peft_version: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    r: int = 8
    target_modules: Optional[Union[set[str], list[str], str]] = None
    exclude_modules: Optional[Union[set[str], list[str], str]] = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: Optional[list[str]] = None
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: Optional[dict] = field(default_factory=dict)
    alpha_pattern: Optional[dict] = field(default_factory=dict)
    megatron_config: Optional[dict] = None
    megatron_core: Optional[str] = "megatron.core"
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = None
    loftq_config: Optional[dict] = field(default_factory=dict)
    eva_config: Optional[dict] = None
    corda_config: Optional[dict] = None
    lora_ga_config: Optional[dict] = None
    use_dora: bool = False
    velora_config: Optional[dict] = None
    alora_invocation_tokens: Optional[list[int]] = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: Optional[dict] = None
    layer_replication: Optional[list[tuple[int, int]]] = None
    runtime_config: dict = field(default_factory=lambda: {"ephemeral_gpu_offload": False})
    lora_bias: bool = False
    target_parameters: Optional[list[str]] = None
    use_bdlora: Optional[dict] = None
    arrow_config: Optional[dict] = None
    kasa_config: Optional[dict] = None
    ensure_weight_tying: bool = False

    def __post_init__(self) -> None:
        self._unknown: dict[str, Any] = {}
        self._normalise()
        _raise_if(self._problems())

    # ----------------------------------------------------------------------------------------- public API

    @property
    def unknown_keys(self) -> dict[str, Any]:
        """Keys read from a file that this version does not know, with their values (written back as-is)."""
        return copy.deepcopy(self._unknown)

    def validate(self) -> None:
        """Check the config again (after fields were changed by assignment).

        Raises:
            ConfigError: see :class:`LoraConfig`.
        """
        _raise_if(self._problems())

    def to_dict(self) -> dict[str, Any]:
        """PEFT's ``to_dict()``: every field but ``runtime_config`` (sets stay sets), plus unknown keys."""
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}
        del out["runtime_config"]
        if isinstance(out["task_type"], TaskType):
            out["task_type"] = out["task_type"].value
        out.update(copy.deepcopy(self._unknown))
        return out

    def to_json_string(self) -> str:
        """The ``adapter_config.json`` text PEFT would write: keys sorted, indent 2, sets as sorted lists.

        Raises:
            ConfigError: the config is invalid, or a field holds a value JSON cannot represent.
        """
        self.validate()
        data = self.to_dict()
        if data["peft_version"] is None:
            data["peft_version"] = WRITTEN_PEFT_VERSION
        data = {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in data.items()}
        bad = []
        for key, value in data.items():
            try:
                json.dumps(value)
            except (TypeError, ValueError) as err:
                bad.append(f"{key} ({err})")
        if bad:
            raise ConfigError(f"cannot write as JSON: {', '.join(bad)}; use plain lists, dicts, str and numbers")
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: Optional[str] = None) -> "LoraConfig":
        """Build a config from a dict as found in ``adapter_config.json``.

        Args:
            data: field -> value; missing fields take their defaults.
            source: where ``data`` came from, named in warnings and errors.

        Returns:
            The config; keys it does not know are kept (see :attr:`unknown_keys`) with a warning.

        Raises:
            ConfigError: ``peft_type`` is not LORA, or the config is invalid.
        """
        where = source or "the config"
        data = dict(data)
        peft_type = data.get("peft_type")
        if peft_type is not None and peft_type != "LORA":
            raise ConfigError(
                f"{where} is a {_text(peft_type)} adapter (peft_type {peft_type!r}); lorasurg handles LoRA only "
                "(peft_type 'LORA'); use PEFT itself for other adapter types"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = {k: data.pop(k) for k in list(data) if k not in known}
        if unknown:
            _warn(
                f"{where} has key(s) this lorasurg does not know: {sorted(unknown)} (written by a newer PEFT?); "
                "they are kept and written back unchanged but have no effect here"
            )
        try:
            config = cls(**data)
        except ConfigError as err:
            if source is None:
                raise
            raise type(err)(f"{source}: {err}") from err
        config._unknown = unknown
        return config

    @classmethod
    def from_pretrained(cls, source: Union[str, os.PathLike], *, revision: Optional[str] = None) -> "LoraConfig":
        """Read ``adapter_config.json`` from a directory, the file itself, or a Hugging Face Hub repo id.

        A repo id is fetched with ``huggingface_hub.hf_hub_download`` (its cache; ``HF_HUB_OFFLINE=1``
        uses the cache only). A ``runtime_config`` key in the file is ignored with a warning, as in PEFT.

        Raises:
            InputError: no such path (and no such Hub repo), no ``adapter_config.json`` in the directory,
                unreadable file, invalid JSON (line and column named), or JSON that is not an object.
            ConfigError: see :meth:`from_dict`.
        """
        path, data = read_config_json(source, revision)
        if "runtime_config" in data:
            _warn(f"{path}: ignoring its runtime_config key (runtime settings are not stored)")
            del data["runtime_config"]
        return cls.from_dict(data, source=str(path))

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> Path:
        """Write ``<directory>/adapter_config.json`` (creating the directory; replacing the file atomically).

        Returns:
            The path of the written file.

        Raises:
            InputError: ``directory`` is an existing file.
            ConfigError: see :meth:`to_json_string`.
        """
        out = Path(directory)
        if out.exists() and not out.is_dir():
            raise InputError(f"cannot save the config into {out}: it is a file; give a directory")
        text = self.to_json_string()
        with atomic_output_file(out / CONFIG_NAME, force=True) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return out / CONFIG_NAME

    # ------------------------------------------------------------------------- normalisation and checks

    def _normalise(self) -> None:
        """PEFT's normalisation and warnings; leaves values it cannot normalise for :meth:`_problems`."""
        if isinstance(self.task_type, str) and self.task_type in _TASK_TYPES:
            self.task_type = TaskType(self.task_type)
        if self.peft_type is None or self.peft_type == "LORA":
            self.peft_type = "LORA"
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple, frozenset)) and all(isinstance(s, str) for s in value):
                setattr(self, name, set(value))
        for name in _subconfigs.SUBCONFIGS:
            value, _, unknown = _subconfigs.normalise(name, getattr(self, name))
            if value is not None:
                setattr(self, name, value)
            if unknown:
                _warn(f"{name}: unknown key(s) {sorted(unknown)} kept and written back (written by a newer PEFT?)")
        for name, default in (("loftq_config", {}), ("runtime_config", {"ephemeral_gpu_offload": False})):
            value = _subconfigs.as_plain_dict(getattr(self, name))
            if value is not None:
                setattr(self, name, {**default, **value} if name == "runtime_config" else value)
        init_configs = (self.loftq_config, self.eva_config, self.corda_config)
        if all(isinstance(c, (dict, type(None))) for c in init_configs):
            self._normalise_init_configs()  # PEFT refuses a sub-config of the wrong type before these rules run
        if self.alora_invocation_tokens is not None and self.task_type != TaskType.CAUSAL_LM:
            _warn("alora_invocation_tokens (aLoRA) is only supported by PEFT for task_type CAUSAL_LM")
        init = self.init_lora_weights
        residual = isinstance(init, str) and (init.startswith("pissa") or init in ("olora", "corda", "lora_ga"))
        if self.use_rslora and (self.rank_pattern or self.alpha_pattern) and residual:
            _warn(
                f"use_rslora with rank_pattern/alpha_pattern and init_lora_weights={init!r}: PEFT cannot convert "
                "such an adapter back to plain LoRA (path_initial_model_for_weight_conversion); drop rslora or the "
                "patterns if you need that"
            )

    def _normalise_init_configs(self) -> None:
        """The loftq/eva/corda sub-config rules, in PEFT's order (only the first matching rule applies)."""
        init = self.init_lora_weights
        if init == "loftq":
            return  # an empty loftq_config is a problem, reported by _problems
        if self.loftq_config:
            _warn(f"loftq_config is ignored (reset to {{}}) because init_lora_weights is {init!r}, not 'loftq'")
            self.loftq_config = {}
        elif init == "eva" and self.eva_config is None:
            _warn("init_lora_weights is 'eva' but eva_config is not given; using EVA's default config")
            self.eva_config = _subconfigs.normalise("eva_config", {})[0]
        elif init != "eva" and self.eva_config is not None:
            _warn(f"eva_config is ignored because init_lora_weights is {init!r}, not 'eva'")
        elif init == "corda" and self.corda_config is None:
            _warn("init_lora_weights is 'corda' but corda_config is not given; using CorDA's default config")
            self.corda_config = _subconfigs.normalise("corda_config", {})[0]
        elif init != "corda" and self.corda_config is not None:
            _warn(f"corda_config is ignored because init_lora_weights is {init!r}, not 'corda'")

    def _problems(self) -> list[Problem]:
        """Every value and combination refused, as (message, is_type_error); no side effects."""
        problems = field_problems(self, _TASK_TYPES)
        for name in _subconfigs.SUBCONFIGS:
            problems.extend(_subconfigs.normalise(name, getattr(self, name))[1])
        return problems


# ---------------------------------------------------------------------------------------- lenient reading


@dataclass
class ConfigReading:
    """A config read without raising or warning (:func:`read_config_leniently`).

    Attributes:
        config: the config, normalised as PEFT does; trustworthy only when ``problems`` is empty, and usable
            for targeting and rank look-ups when :attr:`usable`.
        problems: every refusal :class:`LoraConfig` would raise, as ``(message, is_type_error)``.
        warnings: every warning PEFT (and :class:`LoraConfig`) would give for it, unknown keys left out.
        unknown: keys this version does not know, with their values.
    """

    config: LoraConfig
    problems: list[Problem]
    warnings: list[str]
    unknown: dict[str, Any]

    @property
    def usable(self) -> bool:
        """No field has a value of the wrong type, so the targeting rules can read every field."""
        return not any(is_type for _, is_type in self.problems)


def read_config_leniently(data: Mapping[str, Any]) -> ConfigReading:
    """Build a :class:`LoraConfig` from an ``adapter_config.json`` dict, collecting instead of raising.

    The same normalisation and checks as :meth:`LoraConfig.from_dict` (and ``from_pretrained``'s handling of a
    ``runtime_config`` key), but refusals come back in ``problems`` and warnings in ``warnings``: nothing is
    raised or warned, so a caller can report every problem of a broken config at once.
    """
    data = dict(data)
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = {k: data.pop(k) for k in list(data) if k not in known}
    notes = []
    if "runtime_config" in data:
        del data["runtime_config"]
        notes.append("runtime_config is ignored: runtime settings are not stored with an adapter")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = LoraConfig()
        for key, value in data.items():
            setattr(config, key, copy.deepcopy(value))
        config._unknown = copy.deepcopy(unknown)
        try:
            config._normalise()
            problems = config._problems()
        except Exception as err:  # noqa: BLE001 - a value of a type the normalisation does not expect
            problems = [(f"cannot normalise the config ({type(err).__name__}: {err})", True)]
    notes += [str(w.message) for w in caught]
    return ConfigReading(config, problems, notes, unknown)


def read_config_json(source: Union[str, os.PathLike], revision: Optional[str] = None) -> tuple[Path, dict]:
    """The path of the ``adapter_config.json`` that ``source`` names (a directory, the file, or a Hub repo id)
    and the JSON object in it.

    Raises:
        InputError: see :meth:`LoraConfig.from_pretrained`.
    """
    path = _locate(source, revision)
    return path, _read_json(path)


# ------------------------------------------------------------------------------------------------ helpers


def _raise_if(problems: list[Problem]) -> None:
    """Raise one ConfigError (ConfigTypeError if any problem is a wrong type) listing every problem."""
    if not problems:
        return
    cls = ConfigTypeError if any(is_type for _, is_type in problems) else ConfigError
    if len(problems) == 1:
        raise cls(f"invalid LoRA config: {problems[0][0]}")
    raise cls(f"invalid LoRA config ({len(problems)} problems):\n" + "\n".join(f"  - {m}" for m, _ in problems))


def _is_internal(filename: str) -> bool:
    return filename.startswith(_PACKAGE_DIR) or filename == "<string>"  # "<string>": the dataclass __init__


def _warn(message: str) -> None:
    """``warnings.warn`` attributed to the first caller outside lorasurg (and the dataclass ``__init__``)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and _is_internal(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


def _text(value: Any) -> str:
    return value.value if isinstance(value, enum.Enum) else str(value)


def _locate(source: Union[str, os.PathLike], revision: Optional[str]) -> Path:
    """The ``adapter_config.json`` that ``source`` names: a directory, the file, or a Hub repo id."""
    path = Path(source)
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise InputError(f"directory {path} has no {CONFIG_NAME}; give an adapter directory or the json file")
        return path / CONFIG_NAME
    if path.is_file():
        return path
    text = os.fspath(source)
    if text.endswith(".json") or not looks_like_repo_id(text):
        raise InputError(
            f"no such file or directory: {text}; give an adapter directory, its {CONFIG_NAME}, or a Hub repo id"
        )
    snapshot = resolve_source(text, revision, allow_patterns=[CONFIG_NAME])
    if not (snapshot / CONFIG_NAME).is_file():
        raise InputError(f"Hub repo {text} has no {CONFIG_NAME}; is it a PEFT adapter repo?")
    return snapshot / CONFIG_NAME

def _read_json(path: Path) -> dict:
    """The JSON object in ``path``; InputError naming the file (and line/column) if it is not one."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise InputError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); is it a JSON file?") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(
            f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}; fix the file or write it again"
        ) from err
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object of config fields, found a {type(data).__name__}")
    return data
