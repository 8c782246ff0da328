"""The table of built-in models: ``@register("name")`` adds a factory to it. It imports nothing of acdc, so every
architecture module can register itself and the lookups (:mod:`acdc_cli.models.registry`) sit above them all.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ModelEntry:
    name: str  # plain name or pattern such as "wrn-{depth}-{width}"
    factory: Callable[..., nn.Module]
    example: str  # a concrete name, used by tests that loop over the registry
    input_size: int  # default square input resolution
    in_channels: int
    regex: re.Pattern[str]


REGISTRY: dict[str, ModelEntry] = {}


def register(name: str, *, example: str | None = None, input_size: int = 32, in_channels: int = 3):
    """Decorator: add a factory ``f(num_classes, in_channels, **kw) -> nn.Module`` to the registry."""
    fields = re.findall(r"\{(\w+)\}", name)
    pattern = re.escape(name)
    for field in fields:
        pattern = pattern.replace(re.escape("{" + field + "}"), rf"(?P<{field}>\d+)")
    if fields and example is None:
        raise ValueError(f"pattern model {name} needs an example name")

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        REGISTRY[name] = ModelEntry(name, factory, example or name, input_size, in_channels, re.compile(pattern))
        return factory

    return wrap
