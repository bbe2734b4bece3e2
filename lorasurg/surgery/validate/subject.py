"""What ``validate`` looks at: the adapter's files read leniently, and the base model's module descriptions.

Reading never raises for a broken adapter: a missing or unreadable file, a key that is not PEFT's or a module
without both factors becomes a finding (``file-*``, ``key-foreign``, ``module-incomplete``) and the parts that
could be read are kept for the other checks. Only what stops validation altogether raises
:class:`~lorasurg.errors.InputError` (exit 2): a PATH that does not exist or holds no adapter at all, a hub id
that cannot be fetched, a base model that cannot be opened.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from torch import Tensor

from ...config import CONFIG_NAME, ConfigReading, LoraConfig, read_config_json, read_config_leniently
from ...errors import InputError
from ...findings import Finding
from ...io.adapter import BIN_WEIGHTS_NAME, WEIGHTS_NAME, Adapter, read_weights, weights_file
from ...io.hub import resolve_source
from ...targeting import match_modules, without_parameters
from .base_model import BaseModel, open_base
from .peft_view import PeftView, peft_view

__all__ = ["BaseModel", "Subject", "open_base", "load_subject"]

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class Subject:
    """An adapter (or a bare config) as read for validation, and the base model when one was given.

    Attributes:
        source: PATH as given.
        directory: the adapter directory; None when PATH is an ``adapter_config.json`` (the config alone).
        config_file: the config's path, when there is one.
        raw_config: the config's JSON object as stored (None when missing or unreadable).
        reading: the config read leniently (None when missing or unreadable).
        weights_file: the weights file read, when there is one.
        state: every tensor of the weights file, keys as stored (None when not read).
        adapter: the tensors sorted into LoRA modules and extra tensors (None when not read). Its config is
            the adapter's own only when :attr:`config` is not None.
        base: the base model, or None.
        consumers: the consumers named with ``--for`` (``("peft",)``: PEFT's own rules only).
        read_findings: what reading found (``file-*``, ``key-foreign``, ``module-incomplete``).
        replication_findings: what replicating the base's layers found (``replication-invalid``).
    """

    source: str
    directory: Optional[Path] = None
    config_file: Optional[Path] = None
    raw_config: Optional[dict] = None
    reading: Optional[ConfigReading] = None
    weights_file: Optional[Path] = None
    state: Optional[dict[str, Tensor]] = None
    adapter: Optional[Adapter] = None
    base: Optional[BaseModel] = None
    consumers: tuple[str, ...] = ("peft",)
    read_findings: list[Finding] = field(default_factory=list)
    replication_findings: list[Finding] = field(default_factory=list)
    _selection: Optional[list[str]] = field(default=None, repr=False)
    _view: Optional[PeftView] = field(default=None, repr=False)

    @property
    def config(self) -> Optional[LoraConfig]:
        """The config when it was read and every field has a usable type, else None."""
        return self.reading.config if self.reading is not None and self.reading.usable else None

    def selection(self) -> Optional[list[str]]:
        """The modules the config's ``target_modules`` selects in the base model (PEFT's rules; per-expert modules
        count as modules, see :mod:`.base_model`), or None without a base or config. Computed once.

        Raises:
            LorasurgError: the config's targeting cannot be evaluated (target_modules None, a bad regex, an
                unsupported option).
        """
        if self.config is None or self.base is None:
            return None
        if self._selection is None:
            from .structure_checks import selecting_config

            config = without_parameters(self.config)  # target_parameters select parameters, not modules
            if not self.replication_findings:
                config = selecting_config(config)  # the base's names are the replicated ones already
            if config.target_modules is None and self.config.target_parameters:
                self._selection = []
            else:
                self._selection = match_modules(config, self.base.modules, self.base.output_layers)[0]
        return list(self._selection)

    def peft_view(self) -> Optional[PeftView]:
        """How PEFT on transformers 5 sees the config and the adapter's names on the base
        (:func:`~.peft_view.peft_view`), or None without a base or config. Computed once."""
        if self.config is None or self.base is None:
            return None
        if self._view is None:
            self._view = peft_view(self.config, self.base, self.adapter.modules if self.adapter is not None else ())
        return self._view


def _locate(path: PathLike) -> tuple[Optional[Path], Optional[Path]]:
    """``(adapter directory, config file)`` for PATH: a directory, an ``adapter_config.json``, or a hub id."""
    text = os.fspath(path)
    local = Path(text)
    if local.is_dir():
        return local, None
    if local.is_file():
        if local.suffix != ".json":
            raise InputError(
                f"{local} is a file but not an adapter_config.json; give the adapter directory (with "
                f"{CONFIG_NAME} and {WEIGHTS_NAME}), its {CONFIG_NAME}, or a hub repo id"
            )
        return None, local
    return resolve_source(text, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, BIN_WEIGHTS_NAME]), None


def load_subject(path: PathLike, base: Union[PathLike, BaseModel, None] = None,
                 consumers: tuple[str, ...] = ("peft",)) -> Subject:
    """Read the adapter or config at ``path`` leniently, and describe ``base`` (a path, hub id, or a
    :class:`BaseModel` already described). ``consumers``: names as :func:`~lorasurg.consumers.parse_consumers`
    returns them, kept for the consumers check.

    Raises:
        InputError: ``path`` does not exist or is a directory with neither a config nor weights; the base
            model cannot be opened.
    """
    directory, config_file = _locate(path)
    subject = Subject(os.fspath(path), directory=directory, config_file=config_file, consumers=tuple(consumers))
    found = subject.read_findings
    weights = None
    if directory is not None:
        config_file = directory / CONFIG_NAME
        weights = weights_file(directory)
        if not config_file.is_file() and weights is None:
            present = sorted(p.name for p in directory.iterdir())[:10]
            raise InputError(
                f"{directory} holds neither {CONFIG_NAME} nor {WEIGHTS_NAME}/{BIN_WEIGHTS_NAME} (found: {present}); "
                "give a PEFT adapter directory or an adapter_config.json"
            )
        if not config_file.is_file():
            found.append(Finding("file-missing", str(config_file), f"the adapter has weights but no {CONFIG_NAME}",
                                 "save the config with the adapter (PEFT's save_pretrained writes both)"))
            config_file = None
        if weights is None:
            found.append(Finding("file-missing", str(directory / WEIGHTS_NAME),
                                 f"the adapter has a config but neither {WEIGHTS_NAME} nor {BIN_WEIGHTS_NAME}",
                                 "copy the weights file next to the config; to check a config alone, give the "
                                 f"{CONFIG_NAME} path"))
    subject.config_file = config_file
    if config_file is not None:
        _read_config(subject, config_file)
    if weights is not None:
        _read_weights(subject, weights)
    if base is not None:
        task_type = _task_type(subject)
        subject.base = base if isinstance(base, BaseModel) else open_base(base, task_type)
        if subject.config is not None:  # judged as PEFT builds it: the stack replicated (layer_replication)
            from .structure_checks import replicate_base

            subject.base, subject.replication_findings = replicate_base(subject.base, subject.config)
    return subject


def _read_config(subject: Subject, config_file: Path) -> None:
    try:
        _, subject.raw_config = read_config_json(config_file)
    except InputError as err:
        subject.read_findings.append(Finding("file-unreadable", str(config_file), str(err),
                                             "fix the JSON, or save the config again"))
        return
    subject.reading = read_config_leniently(subject.raw_config)


def _read_weights(subject: Subject, weights: Path) -> None:
    subject.weights_file = weights
    found = subject.read_findings
    try:
        state = read_weights(weights)
    except InputError as err:
        found.append(Finding("file-unreadable", str(weights), str(err), "download or save the adapter again"))
        return
    if weights.name == BIN_WEIGHTS_NAME:
        found.append(Finding(
            "file-bin", str(weights),
            "the weights are a pickle file (read here with torch.load(weights_only=True))",
            f"convert it to {WEIGHTS_NAME}: lorasurg validate --fix -o OUT writes the same tensors as safetensors",
        ))
    subject.state = state
    config = subject.config if subject.config is not None else LoraConfig()
    subject.adapter, parse_findings = Adapter.parse_state_dict(config, state)
    found.extend(parse_findings)


def _task_type(subject: Subject) -> Optional[str]:
    task = getattr(subject.config, "task_type", None)
    task = getattr(task, "value", task)
    return task if isinstance(task, str) else None
