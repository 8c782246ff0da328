"""The presets and resolved settings as data: what ``acdc presets`` lists, and the resolved views that
``acdc presets show`` and ``acdc train --dry-run`` print (TOML that ``--config`` reads back, or JSON)."""

from __future__ import annotations

from typing import Any

from acdc_cli.config import Settings, load_settings, preset_names
from acdc_cli.sparsity.schedule import epoch_plan, plan
from acdc_cli.version import __version__


def preset_rows() -> list[dict[str, Any]]:
    """One row per preset: model, dataset, method, sparsity (0 for dense), structure, scope, epochs, paper top-1."""
    rows = []
    for name in preset_names():
        s = load_settings(preset=name)
        rows.append({
            "name": name,
            "model": s.model.name,
            "dataset": s.data.name,
            "method": s.schedule.method,
            "sparsity": 0.0 if s.schedule.method == "dense" else s.sparsity.target,
            "structure": s.sparsity.structure,
            "scope": s.sparsity.scope,
            "epochs": s.schedule.epochs,
            "paper_top1": s.paper_top1,
            "inferred": s.inferred,  # settings taken by analogy, not from a reference run script
        })
    return rows


def resolved_json(settings: Settings) -> dict[str, Any]:
    """The settings with their phases and every epoch's plan (phase, sparsity, LR, momentum reset): what
    ``acdc train --dry-run --json`` and ``acdc presets show --json`` print."""
    return {
        "config": settings.model_dump(mode="json"),
        "phases": [p.as_dict() for p in plan(settings)],
        "epochs": [e.as_dict() for e in epoch_plan(settings)],
    }


def resolved_toml(settings: Settings) -> str:
    """The settings as a TOML document that ``--config`` reads back, the phase timeline, momentum resets and LR
    after them as TOML comments."""
    lines = [f"# acdc {__version__}: resolved settings; save them and run them with `acdc train --config FILE`",
             _marked_inferred(settings.to_toml().rstrip("\n"), settings.inferred), "",
             "# phase timeline (epochs; end exclusive)",
             f"# {'start':>6} {'end':>6}  {'kind':<6}  sparsity"]
    lines += [f"# {p.start:>6} {p.end:>6}  {p.kind:<6}  {p.sparsity:.4g}" for p in plan(settings)]
    epochs = epoch_plan(settings)
    resets = [str(e.epoch) for e in epochs if e.reset_momentum]
    lines.append(f"# momentum zeroed at the start of epochs: {', '.join(resets) or 'none'} "
                 f"(schedule.reset_momentum = {settings.schedule.reset_momentum})")
    shown = epochs if len(epochs) <= 4 else [*epochs[:3], None, epochs[-1]]
    lrs = ", ".join("..." if e is None else f"{e.epoch}: {e.lr:.6g}" for e in shown)
    cadence = "at every step" if settings.optim.lr_per_step else "once per epoch"
    lines.append(f"# LR set {cadence}; at the start of epochs {lrs} (every epoch: --json, key \"epochs\")")
    return "\n".join(lines) + "\n"


INFERRED_NOTE = "# inferred: no reference run script gives it (docs/paper.md)"


def _marked_inferred(toml: str, inferred: list[str]) -> str:
    """``toml`` with each setting named in ``inferred`` followed by a comment saying so."""
    section, out = "", []
    for line in toml.split("\n"):
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1] + "."
        key = line.split(" = ", 1)[0].removeprefix("# ")
        out.append(f"{line}  {INFERRED_NOTE}" if " = " in line and section + key in inferred else line)
    return "\n".join(out)
