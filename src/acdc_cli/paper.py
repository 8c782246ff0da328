"""The paper's number beside a result only for the paper's experiment: the gate that compares a run's settings
with its preset's and says why a number is not comparable when they differ."""

from __future__ import annotations

from acdc_cli.config import Settings, load_settings
from acdc_cli.errors import AcdcError


def _planned_sparsity(settings: Settings) -> float:
    return 0.0 if settings.schedule.method == "dense" else settings.sparsity.target


def paper_reference(settings: Settings, split: str) -> tuple[float | None, str | None]:
    """(the paper's top-1, None) when the file's run is its preset's experiment, evaluated on the test split;
    otherwise (None, why no paper number is comparable)."""
    name = settings.preset
    if not name:
        return None, "the file names no preset"
    try:
        preset = load_settings(preset=name)
    except AcdcError:
        return None, f"'{name}' is not a preset of this acdc"
    if preset.paper_top1 is None:
        return None, f"preset {name} has no paper number"
    changed = [
        f"{label} {ours} (preset: {theirs})"
        for label, ours, theirs in (
            ("model", settings.model.name, preset.model.name),
            ("dataset", settings.data.name, preset.data.name),
            ("sparsity", _planned_sparsity(settings), _planned_sparsity(preset)),
            ("structure", settings.sparsity.structure, preset.sparsity.structure),
            ("epochs", settings.schedule.epochs, preset.schedule.epochs),
        )
        if ours != theirs
    ]
    if changed:
        return None, f"not preset {name}'s experiment: " + ", ".join(changed)
    if split != "test":
        return None, f"the paper's number is on the test split, this is {split} (use --split test)"
    return preset.paper_top1, None
