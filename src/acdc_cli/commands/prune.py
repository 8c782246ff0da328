"""One-shot magnitude pruning of a checkpoint with the training engine (same layer rules, same masks).

The output is a checkpoint with masks whose recorded settings have a schedule that is one compressed phase over all
epochs, so ``acdc train --from OUT.safetensors`` fine-tunes with exactly these masks held; the same settings are
written beside it as a TOML file to edit and pass with ``--config``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from acdc_cli.config import Settings, format_validation_error, merge_layer
from acdc_cli.data.bundle import KNOWN_CLASSES, check_model_fits, input_shape
from acdc_cli.data.preprocessing import preprocessing
from acdc_cli.errors import AcdcError
from acdc_cli.files.atomic import atomic_write_text, check_writable
from acdc_cli.files.checkpoint import Checkpoint, build_model, save_checkpoint
from acdc_cli.files.open import CHECKPOINT, PLAIN_STATE_DICT_HINT, open_any
from acdc_cli.sparsity.sparsifier import Sparsifier


@dataclass
class PruneResult:
    path: Path
    config_path: Path
    structure: str
    scope: str
    target: float
    sparsity: float  # zeros over the selected weights after pruning
    layers: list[dict[str, Any]]  # name, shape, sparsity; and the layers left dense with the reason

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "config": str(self.config_path),
            "structure": self.structure,
            "scope": self.scope,
            "target": self.target,
            "sparsity": self.sparsity,
            "layers": self.layers,
        }


def finetune_config_path(out: Path) -> Path:
    return out.with_suffix(".toml")


def finetune_settings(source: Checkpoint, sparsity: dict[str, Any], data_name: str | None = None) -> Settings:
    """The source's settings with these sparsity rules and a schedule that is compressed from the first epoch on.

    With no warm-up and a final compressed phase as long as the run, the plan is one sparse phase, so training from
    the pruned checkpoint holds its masks (train.py keeps ``--from`` masks when the plan starts sparse).
    """
    config = dict(source.config) if source.config else {"model": {"name": source.arch}}
    recorded = dict(config.get("data") or {})
    if data_name is not None and data_name != recorded.get("name"):
        # the folder of another dataset does not hold this one: eval takes --data-dir
        config["data"] = {**{k: v for k, v in recorded.items() if k != "dir"}, "name": data_name}
    schedule = dict(config.get("schedule") or {})
    if "start_epoch" in schedule:
        schedule["start_epoch"] = 0  # a fine-tune is a new run: its plan starts at epoch 0
    config["schedule"] = {
        **schedule,
        "method": "acdc",
        "warmup_epochs": 0,
        "final_decompressed_epochs": 0,
        "final_compressed_epochs": schedule.get("epochs", Settings().schedule.epochs),
    }
    try:
        # the source's sparsity rules under these: a target the source stated for its own structure goes with it
        return Settings(**merge_layer(config, {"sparsity": sparsity}))
    except ValidationError as exc:
        raise AcdcError(format_validation_error(exc)) from None


def prune_checkpoint(
    source: Path,
    out: Path,
    sparsity: float | None = None,
    structure: str = "unstructured",
    scope: str = "global",
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    force: bool = False,
    model_name: str | None = None,
    num_classes: int | None = None,
    data_name: str | None = None,
) -> PruneResult:
    """Prune ``source`` to ``sparsity`` (implied by an N:M ``structure``) and write ``out`` and its fine-tune TOML.

    ``source`` is an acdc checkpoint, or with ``model_name`` and ``num_classes`` a plain state dict. ``data_name``: the
    dataset the model takes, recorded for eval and fine-tuning (a plain state dict records none of its own); the
    model is checked against it (channels, input size, classes), as it is against an acdc checkpoint's own."""
    source, out = Path(source), Path(out)
    if out.suffix != ".safetensors":
        raise AcdcError(f"-o {out}: name the pruned checkpoint *.safetensors (its fine-tune settings go beside it)")
    config_path = finetune_config_path(out)
    check_writable(out, force)
    check_writable(config_path, force)
    if structure == "unstructured" and sparsity is None:
        raise AcdcError("--sparsity is required for unstructured pruning (e.g. --sparsity 0.9)")
    ckpt = open_any(source, (CHECKPOINT,), torch_files=True, model_name=model_name, num_classes=num_classes,
                    hint=PLAIN_STATE_DICT_HINT).checkpoint()
    rules: dict[str, Any] = {"structure": structure, "scope": scope}
    if sparsity is not None and structure == "unstructured":
        rules["target"] = sparsity
    if include:
        rules["include"] = list(include)
    if exclude:
        rules["exclude"] = list(exclude)
    settings = finetune_settings(ckpt, rules, data_name)
    sp = settings.sparsity
    if sparsity is not None and abs(sparsity - sp.target) > 1e-9:
        raise AcdcError(f"--sparsity {sparsity:g} contradicts --structure {sp.structure}, which prunes {sp.target:g}")

    model = build_model(ckpt)
    fits_checked = bool(ckpt.config) or data_name is not None
    if fits_checked:
        d = settings.data
        shape = input_shape(d.name, ckpt.arch, d.image_size)
        check_model_fits(model, shape, KNOWN_CLASSES.get(d.name), "cpu", str(source), d.name)
    sparsifier = Sparsifier(model, sp.include, sp.exclude, sp.scope, sp.structure)
    sparsifier.compress(sp.target)
    stats = sparsifier.stats()

    pruned = Checkpoint(
        weights={k: v.detach() for k, v in model.state_dict().items()},
        masks=dict(sparsifier.masks or {}),
        arch=ckpt.arch,
        model_kwargs=ckpt.model_kwargs,
        config=settings.model_dump(mode="json"),
        epoch=ckpt.epoch,
        phase="sparse",
        # the source's metrics described other weights; eval measures these
        metrics={},
        extra={**ckpt.extra, "kind": "prune", "pruned_from": source.name,
               # a plain state dict pruned without --data does not say what its images are
               "preprocessing": preprocessing(settings.model_dump(mode="json")) if fits_checked else None},
    )
    save_checkpoint(out, pruned)
    atomic_write_text(config_path, settings.to_toml())

    params = dict(model.named_parameters())
    layers: list[dict[str, Any]] = []
    for rule in sparsifier.rules:
        entry: dict[str, Any] = {"name": rule.param, "shape": list(params[rule.param].shape)}
        if rule.selected:
            entry["sparsity"] = stats["per_layer"][rule.param]
        else:
            entry["kept_dense"] = rule.reason
        layers.append(entry)
    return PruneResult(out, config_path, sp.structure, sp.scope, sp.target, stats["sparsity"], layers)
