"""A registry of plain factory functions: ``@register("name")`` fills one dict, ``create(name, **kw)`` looks it up.

A name may be a pattern with ``{int}`` fields (``wrn-{depth}-{width}``); the integers become keyword arguments.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from acdc_cli.errors import AcdcError


@dataclass(frozen=True)
class ModelEntry:
    name: str  # plain name or pattern such as "wrn-{depth}-{width}"
    factory: Callable[..., nn.Module]
    example: str  # a concrete name, used by tests that loop over the registry
    input_size: int  # default square input resolution
    in_channels: int
    regex: re.Pattern[str]


_REGISTRY: dict[str, ModelEntry] = {}


def register(name: str, *, example: str | None = None, input_size: int = 32, in_channels: int = 3):
    """Decorator: add a factory ``f(num_classes, in_channels, **kw) -> nn.Module`` to the registry."""
    fields = re.findall(r"\{(\w+)\}", name)
    pattern = re.escape(name)
    for field in fields:
        pattern = pattern.replace(re.escape("{" + field + "}"), rf"(?P<{field}>\d+)")
    if fields and example is None:
        raise ValueError(f"pattern model {name} needs an example name")

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = ModelEntry(name, factory, example or name, input_size, in_channels, re.compile(pattern))
        return factory

    return wrap


def entries() -> list[ModelEntry]:
    return list(_REGISTRY.values())


def lookup(name: str) -> tuple[ModelEntry, dict[str, int]]:
    for entry in _REGISTRY.values():
        match = entry.regex.fullmatch(name)
        if match:
            return entry, {k: int(v) for k, v in match.groupdict().items()}
    known = ", ".join(e.name for e in _REGISTRY.values())
    raise AcdcError(f"unknown model '{name}' (known: {known})")


# Size guards, so that a name (wrn-100000-1) or a file's metadata (num_classes = 10**12) asking for an absurd model is
# refused in a moment instead of allocating for minutes. Integers in a pattern name are bounded before anything is
# built (a million layers take minutes to build even on the meta device); then every model is built on the meta
# device first, which allocates nothing, and refused above MAX_PARAMETERS (8 GB of fp32 weights, before gradients and
# momentum; the largest model of the paper, WRN-28-10, has 36.5 M).
MAX_NAME_INTEGER = 2048
MAX_PARAMETERS = 2_000_000_000


def create(name: str, num_classes: int, in_channels: int | None = None, **kwargs: Any) -> nn.Module:
    """Build a registered model. ``kwargs`` with value None are dropped so factories keep their defaults.

    The factory runs twice: on the meta device to count the parameters (see MAX_PARAMETERS), then for real; under
    ``torch.device("meta")`` it runs once."""
    entry, fields = lookup(name)
    for field, value in fields.items():
        if value > MAX_NAME_INTEGER:
            raise AcdcError(f"model '{name}': {field} {value} is above the {MAX_NAME_INTEGER} acdc builds")
    kw = {k: v for k, v in kwargs.items() if v is not None}

    def build() -> nn.Module:
        try:
            return entry.factory(num_classes=num_classes, in_channels=in_channels or entry.in_channels, **fields, **kw)
        except (ValueError, TypeError, RuntimeError) as exc:  # RuntimeError: impossible sizes from a file's metadata
            detail = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            raise AcdcError(f"cannot build model '{name}': {detail}") from None

    on_meta = torch.get_default_device().type == "meta"
    with torch.device("meta"):
        sized = build()
    count = sum(t.numel() for t in (*sized.parameters(), *sized.buffers()))
    if count > MAX_PARAMETERS:
        raise AcdcError(f"model '{name}' would have {count:,} parameters, above the {MAX_PARAMETERS:,} acdc builds")
    return sized if on_meta else build()
