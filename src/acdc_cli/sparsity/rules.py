"""TODO docstring
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

import torch


def natural_key(name: str) -> list[Any]:
    """Sort key that puts layer2 before layer10 (safetensors files list tensors alphabetically)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def layer_prefix(name: str) -> str:
    """compressed-tensors names a compressed ``<layer>.weight`` by ``<layer>``."""
    return name[: -len(".weight")] if name.endswith(".weight") else name


def layer_weight(name: str, tensor: torch.Tensor) -> bool:
    """A Conv/Linear-like weight of a state dict: a floating tensor of 2+ dimensions named ``*.weight``."""
    return name.endswith("weight") and tensor.dim() >= 2 and tensor.is_floating_point()


def rule_reason(name: str, include: list[str], exclude: list[str]) -> str | None:
    """Why the sparsity.include/exclude globs (over module names) leave weight ``name`` dense; None when they
    select it."""
    module = layer_prefix(name)
    if not any(fnmatch.fnmatchcase(module, p) for p in include):
        return "not in sparsity.include"
    if any(fnmatch.fnmatchcase(module, p) for p in exclude):
        return "excluded by sparsity.exclude"
    return None


def rule_patterns(config: Any) -> tuple[list[str], list[str]]:
    """The sparsity.include / exclude globs a file's saved settings hold. Metadata is not trusted: a section or a
    list that is not one (null, a number) reads as the default (every layer included, none excluded)."""
    rules = config.get("sparsity") if isinstance(config, dict) else None
    rules = rules if isinstance(rules, dict) else {}

    def patterns(value: Any, default: list[str]) -> list[str]:
        return [p for p in value if isinstance(p, str)] if isinstance(value, list) else default

    return patterns(rules.get("include"), ["*"]), patterns(rules.get("exclude"), [])


def prunable_names(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                   config: dict[str, Any]) -> list[str]:
    """The weights sparsity is about: those with a mask; in a checkpoint without masks, the Conv/Linear weights
    (:func:`layer_weight`) that the saved sparsity.include/exclude globs select."""
    if masks:
        return sorted((n for n in weights if n in masks), key=natural_key)
    include, exclude = rule_patterns(config)
    names = [n for n, t in weights.items() if layer_weight(n, t) and rule_reason(n, include, exclude) is None]
    return sorted(names, key=natural_key)
