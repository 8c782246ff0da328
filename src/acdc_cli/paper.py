"""The gate in front of the paper's number: a run's top-1 is set beside its preset's paper figure only when the run is
that preset's experiment (every setting that can change a result equal, config.NOT_RESULT_SETTINGS aside) measured
on the test split; otherwise the reason names the first setting that differs. ``acdc eval``, ``acdc report`` and the
summary panel of ``acdc train`` all ask here.
"""

from __future__ import annotations

from acdc_cli.config import Settings, load_settings, result_settings
from acdc_cli.errors import AcdcError


def _shown(value: object) -> str:
    return "(not set)" if value is None else str(value)


def differing_settings(settings: Settings, preset: Settings) -> list[tuple[str, object, object]]:
    """(setting, this run's value, the preset's value) of every result-changing setting that differs, in the order
    the settings are written."""
    ours, theirs = result_settings(settings), result_settings(preset)
    return [(name, ours[name], theirs[name]) for name in ours if ours[name] != theirs[name]]


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
    changed = differing_settings(settings, preset)
    if changed:
        setting, ours, theirs = changed[0]
        more = len(changed) - 1
        others = f", and {more} other setting{'s' * (more > 1)}" if more else ""
        return None, f"not preset {name}'s experiment: {setting} {_shown(ours)} (preset: {_shown(theirs)}){others}"
    if split != "test":
        return None, f"the paper's number is on the test split, this is {split} (use --split test)"
    return preset.paper_top1, None
