"""A PEFT adapter on disk, read one module at a time: for writers that stream an adapter of any size.

:meth:`AdapterFile.open` reads ``adapter_config.json`` and the weights file's header only; :attr:`AdapterFile.view`
is the :class:`~lorasurg.io.adapter.Adapter` with every tensor a placeholder on the meta device (right names,
shapes and dtypes, no storage), so everything that needs only names, kinds, shapes and the config (the config
checks, :func:`lorasurg.consumers.blocked_parts`, :func:`lorasurg.consumers.prepare_for` given the energies) runs
before any tensor is read. :meth:`AdapterFile.module` then reads one module's tensors (keys from
:meth:`~lorasurg.io.adapter.AdapterModule.tensors`, so PEFT's naming stays in :mod:`lorasurg.io.adapter`).
An in-memory :class:`Adapter` is served the same way by :meth:`AdapterFile.of`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from ..config import CONFIG_NAME, LoraConfig
from ..errors import InputError
from ._shards import ShardReader, open_shard
from .adapter import BIN_WEIGHTS_NAME, KEY_PREFIX, WEIGHTS_NAME, Adapter, AdapterModule, peft_key, weights_file
from .hub import resolve_source

__all__ = ["AdapterFile", "meta_view"]

PathLike = Union[str, "os.PathLike[str]"]


def meta_view(adapter: Adapter) -> Adapter:
    """``adapter`` with every tensor replaced by a placeholder of the same shape and dtype on the meta device."""
    state = {k: torch.empty(t.shape, dtype=t.dtype, device="meta") for k, t in adapter.to_state_dict().items()}
    return Adapter.from_state_dict(adapter.config, state)


@dataclass
class AdapterFile:
    """An adapter whose tensors are read on demand (see the module docstring).

    Attributes:
        view: the adapter with meta-device placeholders.
        source: how it is named in messages.
    """

    view: Adapter
    source: str
    _shard: Optional[ShardReader] = None
    _memory: Optional[Adapter] = field(default=None, repr=False)

    @classmethod
    def open(cls, path_or_repo: PathLike, revision: Optional[str] = None) -> "AdapterFile":
        """Read the config and the weights header of the adapter at ``path_or_repo`` (a directory or hub repo id).

        Raises:
            InputError: missing files, an unreadable header, keys that are not PEFT's, or tensors that contradict
                the config (every problem listed, as :meth:`Adapter.load` lists them).
        """
        directory = resolve_source(path_or_repo, revision, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, BIN_WEIGHTS_NAME])
        if not (directory / CONFIG_NAME).is_file():
            raise InputError(f"{directory} has no {CONFIG_NAME}; is this a PEFT adapter directory?")
        config = LoraConfig.from_pretrained(directory / CONFIG_NAME)
        path = weights_file(directory)
        if path is None:
            present = sorted(p.name for p in directory.iterdir())
            raise InputError(f"{directory} has neither {WEIGHTS_NAME} nor {BIN_WEIGHTS_NAME} (found: {present})")
        shard = open_shard(path)
        try:
            state = {e.name: torch.empty(e.shape, dtype=e.dtype, device="meta") for e in shard.entries()}
            view = Adapter.from_state_dict(config, state, source=str(directory))
            found = view.problems()
            if found:
                raise InputError(f"adapter at {directory} does not match its {CONFIG_NAME}:\n  - "
                                 + "\n  - ".join(found)
                                 + "\nFix the config or the tensors (lorasurg validate shows the same list).")
        except BaseException:
            shard.close()
            raise
        return cls(view, os.fspath(path_or_repo), shard)

    @classmethod
    def of(cls, adapter: Adapter, source: str = "adapter") -> "AdapterFile":
        """An in-memory adapter served like a file (its tensors are returned as they are)."""
        return cls(meta_view(adapter), source, None, adapter)

    def module(self, name: str) -> AdapterModule:
        """Module ``name`` with its tensors read (owned copies for a file)."""
        if self._memory is not None:
            return self._memory.modules[name]
        placeholder = self.view.modules[name]
        slots = {"A": placeholder.A, "B": placeholder.B, "bias": placeholder.bias, "magnitude": placeholder.magnitude}
        read = {next(slot for slot, t in slots.items() if t is tensor): self._shard.read(peft_key(name, part))
                for part, tensor in placeholder.tensors().items()}
        return AdapterModule(name, embedding=placeholder.embedding, **read)

    def extra(self, key: str) -> torch.Tensor:
        """A non-LoRA tensor (``modules_to_save`` copy), key without ``base_model.model.``."""
        if self._memory is not None:
            return self._memory.extra[key]
        return self._shard.read(KEY_PREFIX + key)

    def close(self) -> None:
        if self._shard is not None:
            self._shard.close()
            self._shard = None

    def __enter__(self) -> "AdapterFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
