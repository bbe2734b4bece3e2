"""TEMPORARY stand-in for lorasurg.targeting (issue: targeting helper). DELETE when lorasurg/targeting.py lands.

Minimal PEFT-like matching so the runtime can be built and tested; same signatures as the real module.
"""

from __future__ import annotations

import difflib
import re
from typing import Mapping

from ..errors import ConfigError
from ..modules import ModuleInfo

__all__ = ["select_modules", "rank_alpha", "is_module_to_save"]


def _pattern_key(keys, name):
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def rank_alpha(config, module_name: str) -> tuple[int, float]:
    rk = _pattern_key(config.rank_pattern or {}, module_name)
    ak = _pattern_key(config.alpha_pattern or {}, module_name)
    r = config.rank_pattern[rk] if rk is not None else config.r
    alpha = config.alpha_pattern[ak] if ak is not None else config.lora_alpha
    return r, alpha


def is_module_to_save(config, name: str) -> bool:
    return bool(config.modules_to_save) and any(name.endswith(key) for key in config.modules_to_save)


def _excluded(config, name: str) -> bool:
    ex = config.exclude_modules
    if not ex:
        return False
    if isinstance(ex, str):
        return re.fullmatch(ex, name) is not None
    return name in ex or any(name.endswith(f".{k}") for k in ex)


def _layer_ok(config, name: str) -> bool:
    idx = config.layers_to_transform
    if idx is None or (isinstance(idx, list) and not idx):
        return True
    pats = config.layers_pattern
    if not pats:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        m = None
        for p in [pats] if isinstance(pats, str) else pats:
            m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
            if m:
                break
    if not m:
        return False
    i = int(m.group("idx"))
    return i == idx if isinstance(idx, int) else i in idx


def _matches(config, name: str, info: ModuleInfo, output_layers) -> bool:
    tm = config.target_modules
    if _excluded(config, name):
        return False
    if config.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in config.modules_to_save):
        return False
    if tm == "all-linear":
        return info.is_linear_like and name not in output_layers
    if isinstance(tm, str):
        return re.fullmatch(tm, name) is not None
    found = name in tm or any(name.endswith(f".{k}") for k in tm)
    return found and _layer_ok(config, name)


def select_modules(config, modules: Mapping[str, ModuleInfo], output_layers=()) -> list[str]:
    chosen = [n for n, info in modules.items() if _matches(config, n, info, set(output_layers))]
    if not chosen:
        wanted = config.target_modules if isinstance(config.target_modules, str) else ", ".join(config.target_modules or [])
        tails = sorted({n.rsplit(".", 1)[-1] for n in modules})
        near = difflib.get_close_matches(str(wanted), tails, n=5, cutoff=0.0)
        raise ConfigError(f"target_modules {wanted!r} match no module of the model; nearest names: {near}")
    return chosen
