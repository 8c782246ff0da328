"""Model names: the built-in registry plus two families built by name from other libraries.

``@register("name")`` fills one dict of factory functions; a name may be a pattern with ``{int}`` fields
(``wrn-{depth}-{width}``) whose integers become keyword arguments. ``torchvision:<name>`` builds any classification
model of ``torchvision.models`` and ``timm:<name>`` any timm model (the optional ``timm`` extra), always randomly
initialised: nothing is ever downloaded (``model.weights`` loads local files). ``create(name, **kw)`` builds any of
them; ``lookup(name)`` checks a name without building anything.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import re
from typing import Any

import torch
from torch import nn

from acdc_cli.errors import AcdcError
from acdc_cli.models.table import REGISTRY, ModelEntry, register  # noqa: F401  (register: the public decorator)

TORCHVISION = "torchvision:"
TIMM = "timm:"
TIMM_EXTRA = "pip install 'acdc-cli[timm]'"


def entries() -> list[ModelEntry]:
    """The built-in models (the torchvision and timm families are not listed one by one)."""
    return list(REGISTRY.values())


def lookup(name: str) -> tuple[ModelEntry, dict[str, int]]:
    """The entry that builds ``name`` and the integer fields its pattern captured. An unknown name is a one-line
    AcdcError with the closest known names."""
    if name.startswith(TORCHVISION):
        return _torchvision_entry(name[len(TORCHVISION):]), {}
    if name.startswith(TIMM):
        return _timm_entry(name[len(TIMM):]), {}
    for entry in REGISTRY.values():
        match = entry.regex.fullmatch(name)
        if match:
            return entry, {k: int(v) for k, v in match.groupdict().items()}
    candidates = [e.example if "{" in e.name else e.name for e in REGISTRY.values()]
    candidates += [TORCHVISION + n for n in torchvision_names()]
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    # "resnet18" is torchvision's resnet18 far more often than a typo of a built-in name
    prefixed = TORCHVISION + name
    if prefixed in candidates and prefixed not in close:
        close.insert(0, prefixed)
    builtin = ", ".join(e.name for e in REGISTRY.values())
    hint = f"did you mean {', '.join(close[:3])}?" if close else f"built-in: {builtin}"
    raise AcdcError(f"unknown model '{name}'; {hint} (also torchvision:<name>, timm:<name>)")


# Size guards, so that a name (wrn-100000-1) or a file's metadata (num_classes = 10**12) asking for an absurd model is
# refused in a moment instead of allocating for minutes. Integers in a pattern name are bounded before anything is
# built (a million layers take minutes to build even on the meta device); then every model is built on the meta
# device first, which allocates nothing, and refused above MAX_PARAMETERS (8 GB of fp32 weights, before gradients and
# momentum; the largest model of the paper, WRN-28-10, has 36.5 M).
MAX_NAME_INTEGER = 2048
MAX_PARAMETERS = 2_000_000_000


def create(name: str, num_classes: int, in_channels: int | None = None, **kwargs: Any) -> nn.Module:
    """Build a model by name. ``kwargs`` with value None are dropped so factories keep their defaults.

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


# ----------------------------------------------------------------------------------------------------------------
# torchvision:<name>


@functools.cache
def torchvision_names() -> tuple[str, ...]:
    """The classification models of ``torchvision.models`` (detection, segmentation, video, ... live in
    submodules and are left out)."""
    import torchvision.models  # imported on use: it costs every acdc command about a second at startup

    return tuple(torchvision.models.list_models(module=torchvision.models))


def _torchvision_entry(model: str) -> ModelEntry:
    names = torchvision_names()
    if model not in names:
        close = difflib.get_close_matches(model, names, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(TORCHVISION + n for n in close)}?" if close else \
            "see torchvision.models.list_models(module=torchvision.models)"
        raise AcdcError(f"unknown model '{TORCHVISION}{model}': torchvision has no classification model of that "
                        f"name; {hint}")
    return ModelEntry(TORCHVISION + model, functools.partial(_build_torchvision, model), TORCHVISION + model,
                      224, 3, re.compile(re.escape(TORCHVISION + model)))


def _build_torchvision(model: str, num_classes: int, in_channels: int, **kwargs: Any) -> nn.Module:
    import torchvision.models

    if in_channels != 3:
        raise ValueError(f"torchvision models take 3-channel images; this data has {in_channels} channel(s)")
    return torchvision.models.get_model(model, weights=None, num_classes=num_classes, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# timm:<name>


def _timm() -> Any:
    try:
        return importlib.import_module("timm")
    except ImportError:
        raise AcdcError(f"timm: models need the optional timm extra: {TIMM_EXTRA}") from None


def _timm_entry(model: str) -> ModelEntry:
    timm = _timm()
    if not timm.is_model(model):
        close = difflib.get_close_matches(model, timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(TIMM + n for n in close)}?" if close else "see timm.list_models()"
        raise AcdcError(f"unknown model '{TIMM}{model}': timm has no model of that name; {hint}")
    config = timm.get_pretrained_cfg(model, allow_unregistered=True)
    input_size = getattr(config, "input_size", None) or (3, 224, 224)
    return ModelEntry(TIMM + model, functools.partial(_build_timm, model), TIMM + model, int(input_size[-1]), 3,
                      re.compile(re.escape(TIMM + model)))


def _build_timm(model: str, num_classes: int, in_channels: int, dropout: float | None = None,
                **kwargs: Any) -> nn.Module:
    timm = _timm()
    if dropout is not None:
        kwargs["drop_rate"] = dropout  # timm's name for the classifier dropout
    return timm.create_model(model, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)


def check_fit(own: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], source: str) -> None:
    """Raise unless ``weights`` has exactly the names and shapes of the state dict ``own``."""
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if missing or unexpected:
        which = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise AcdcError(f"{source} does not fit this model ({which})")
    for name, tensor in weights.items():
        if own[name].shape != tensor.shape:
            raise AcdcError(
                f"{source} does not fit this model: {name} is {tuple(tensor.shape)}, model has {tuple(own[name].shape)}"
            )
