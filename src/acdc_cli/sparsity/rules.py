"""The sparsity rules, the one place that says which weights are pruned: the ``weight`` of every Conv2d / Linear
whose module name the ``sparsity.include`` globs match and the ``exclude`` globs do not, and which, under an N:M
structure, has input channels in multiples of M. A model (:func:`select_layers`, what the engine prunes) and a
file's weight names (:func:`prunable_names`, what inspect / export / ONNX read) go through the same
:func:`rule_reason`, so every command says why a layer is left dense in the same words.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from acdc_cli.errors import AcdcError
from acdc_cli.sparsity.masks import nm_compatible

SELECTED = "selected"
NOT_INCLUDED = "not included"
EXCLUDED = "excluded"

_WILDCARDS = set("*?[")


def nm_reason(m: int) -> str:
    """Why a layer cannot be N:M sparse."""
    return f"input channels not a multiple of {m}"


def parse_nm(structure: str) -> tuple[int, int] | None:
    """(N, M) of an ``"N:M"`` structure; None for ``"unstructured"``."""
    if structure == "unstructured":
        return None
    n, m = structure.split(":")
    return int(n), int(m)


def natural_key(name: str) -> list[Any]:
    """Sort key that puts layer2 before layer10 (safetensors files list tensors alphabetically)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def layer_prefix(name: str) -> str:
    """compressed-tensors names a compressed ``<layer>.weight`` by ``<layer>``."""
    return name[: -len(".weight")] if name.endswith(".weight") else name


def module_of(param: str) -> str:
    """The module name a weight's state-dict name belongs to (``""``: the model itself is the layer)."""
    return "" if param == "weight" else layer_prefix(param)


def layer_weight(name: str, tensor: torch.Tensor) -> bool:
    """A Conv/Linear-like weight of a state dict: a floating tensor of 2+ dimensions named ``*.weight``."""
    return name.endswith("weight") and tensor.dim() >= 2 and tensor.is_floating_point()


def _matches(module: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(module, p) for p in patterns)


def rule_reason(param: str, include: list[str], exclude: list[str], weight: torch.Tensor | None = None,
                nm: tuple[int, int] | None = None) -> str | None:
    """Why the rules leave weight ``param`` (a state-dict name) dense; None when they select it. ``weight`` and
    ``nm``: its tensor and the N:M structure, to check that its input channels can hold N:M groups."""
    module = module_of(param)
    if not _matches(module, include):
        return NOT_INCLUDED
    if _matches(module, exclude):
        return EXCLUDED
    if nm is not None and weight is not None and not nm_compatible(weight, nm[1]):
        return nm_reason(nm[1])
    return None


@dataclass(frozen=True)
class LayerRule:
    """Why a layer is or is not pruned."""

    module: str
    param: str  # state-dict name of the weight
    selected: bool
    reason: str  # SELECTED, or the rule_reason that leaves it dense


def prunable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def select_layers(
    model: nn.Module, include: list[str], exclude: list[str], nm: tuple[int, int] | None = None
) -> list[LayerRule]:
    """The rules applied to every Conv2d/Linear of the model. Settings that cannot mean what they say are errors: an
    include pattern that matches no layer, a layer named explicitly (no wildcard) that cannot be N:M, rules that
    select nothing."""
    modules = prunable_modules(model)
    for pattern in include:
        if not any(fnmatch.fnmatchcase(n, pattern) for n, _ in modules):
            raise AcdcError(f"sparsity.include pattern '{pattern}' matches no Conv2d/Linear layer of the model")
    rules = []
    for name, module in modules:
        param = f"{name}.weight" if name else "weight"
        reason = rule_reason(param, include, exclude, module.weight, nm)
        if nm is not None and reason == nm_reason(nm[1]) and any(p == name and not (_WILDCARDS & set(p))
                                                                 for p in include):
            raise AcdcError(
                f"layer '{name}' has {module.weight.shape[1]} input channels per group, not a multiple of "
                f"{nm[1]}: it cannot be {nm[0]}:{nm[1]} sparse"
            )
        rules.append(LayerRule(name, param, reason is None, reason or SELECTED))
    if not any(r.selected for r in rules):
        raise AcdcError("the sparsity rules select no layer to prune")
    return rules


def rule_patterns(config: Any) -> tuple[list[str], list[str]]:
    """The sparsity.include / exclude globs a file's saved settings hold. Metadata is not trusted: a section or a
    list that is not one (null, a number) reads as the default (every layer included, none excluded)."""
    rules = config.get("sparsity") if isinstance(config, dict) else None
    rules = rules if isinstance(rules, dict) else {}

    def patterns(value: Any, default: list[str]) -> list[str]:
        return [p for p in value if isinstance(p, str)] if isinstance(value, list) else default

    return patterns(rules.get("include"), ["*"]), patterns(rules.get("exclude"), [])


def saved_nm(config: Any) -> tuple[int, int] | None:
    """(N, M) of the N:M sparsity.structure a file's saved settings name; None for unstructured. Metadata is not
    trusted: a structure that is not ``N:M`` with 0 < N < M reads as none."""
    rules = config.get("sparsity") if isinstance(config, dict) else None
    structure = rules.get("structure") if isinstance(rules, dict) else None
    match = re.fullmatch(r"(\d{1,9}):(\d{1,9})", structure) if isinstance(structure, str) else None
    if match is None or not 0 < int(match.group(1)) < int(match.group(2)):
        return None
    return int(match.group(1)), int(match.group(2))


def prunable_names(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                   config: dict[str, Any], nm: tuple[int, int] | None = None) -> list[str]:
    """The weights sparsity is about: those with a mask; in a checkpoint without masks, the Conv/Linear weights
    (:func:`layer_weight`) that the saved sparsity rules select, as :func:`select_layers` selects a model's: the
    include/exclude globs, and under an N:M structure only layers whose input channels hold N:M groups. ``nm``: the
    N:M structure to check that against (an export's own format); None: the saved sparsity.structure's."""
    if masks:
        return sorted((n for n in weights if n in masks), key=natural_key)
    include, exclude = rule_patterns(config)
    nm = nm or saved_nm(config)
    names = [n for n, t in weights.items() if layer_weight(n, t) and rule_reason(n, include, exclude, t, nm) is None]
    return sorted(names, key=natural_key)
