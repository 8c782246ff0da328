"""Top-1 / top-5 / loss of a model over a loader (sums stay on the device until the end of the pass), and of a
checkpoint or export (safetensors or ONNX) on its own dataset (``acdc eval``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.progress import Progress

from acdc_cli import data as data_mod
from acdc_cli.commands.inspect_file import file_flops
from acdc_cli.config import load_settings, preset_label
from acdc_cli.data.bundle import check_model_fits, selection_split
from acdc_cli.errors import AcdcError
from acdc_cli.files.onnx_file import output_classes
from acdc_cli.files.open import CHECKPOINT, EXPORT, ONNX, open_any
from acdc_cli.paper import paper_reference
from acdc_cli.schemas import EVAL_SCHEMA
from acdc_cli.sparsity.rules import prunable_names
from acdc_cli.training.distributed import resolve_device
from acdc_cli.training.evaluation import evaluate
from acdc_cli.training.runtime import precision

SPLITS = ("val", "test")




def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def eval_checkpoint(
    path: Path | str,
    split: str | None = None,
    data_dir: Path | str | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    progress: Progress | None = None,
    amp: bool | None = None,
    data_name: str | None = None,
) -> dict[str, Any]:
    """Top-1 / top-5 / loss of a checkpoint's or export's weights as saved, on its own dataset rebuilt from its saved
    settings, in the precision the run evaluated in (its runtime.eval_precision: fp32 unless it said amp); ``amp``
    True or False overrides it (True: autocast in the run's runtime.amp precision, bf16 when that is off; CUDA only).
    An ONNX export runs on ONNX Runtime's CPU provider.

    ``data_name``: the dataset to evaluate on instead of the one the file records (a file pruned from a plain state
    dict records the default unless pruned with ``--data``). A model that does not take that dataset's images or
    classes is a one-line error.

    ``split`` None: the split the run measured every epoch and chose its best checkpoints on ("val", or "test" for a
    run with ``data.val_size = 0``). ``progress`` (optional) gets one task that advances per batch. Accuracies and
    sparsity are fractions in [0, 1].
    """
    if split is not None and split not in SPLITS:
        raise AcdcError(f"unknown split '{split}' (choose {', '.join(SPLITS)})")
    path = Path(path)
    source = open_any(path, (CHECKPOINT, EXPORT, ONNX))
    if "data" not in source.config and data_name is None:
        raise AcdcError(f"{path} records no dataset, so there is nothing to evaluate it on")
    if source.kind == ONNX and (amp or device not in (None, "cpu")):
        raise AcdcError("an ONNX file runs on ONNX Runtime's CPU provider in fp32: drop --device/--amp")
    flags = {
        "data.name": data_name,
        "data.dir": str(data_dir) if data_dir is not None else None,
        "data.eval_batch_size": batch_size,
        "runtime.device": "cpu" if source.kind == ONNX else device,
        # an override is part of the settings, so the paper's gate sees the precision this number is measured in
        "runtime.eval_precision": "fp32" if source.kind == ONNX or amp is False else "amp" if amp else None,
    }
    settings = load_settings(base=source.config, flags=flags)
    selected_on = selection_split(settings)
    split = split or selected_on
    if split == "val" and selected_on == "test":
        raise AcdcError(f"{path} comes from a run that held no validation split out (data.val_size = 0: every "
                        "training image trained, and the test split chose the best checkpoints); use --split test")
    dev = resolve_device(settings.runtime.device)
    bundle = data_mod.build(settings, dev)
    loader = bundle.val if split == "val" else bundle.test
    if loader is None or len(loader) == 0:
        raise AcdcError(f"dataset '{settings.data.name}' has no {split} split in these settings")
    classes = output_classes(source.proto) if source.kind == ONNX else source.model_kwargs.get("num_classes")
    if isinstance(classes, int) and classes < bundle.num_classes:
        raise AcdcError(f"{path} gives {classes} class scores per image; {settings.data.name} has "
                        f"{bundle.num_classes} classes")
    model = source.model().to(dev)
    shape = (bundle.in_channels, bundle.image_size, bundle.image_size)
    check_model_fits(model, shape, bundle.num_classes, dev, str(path), settings.data.name)
    # as the run evaluated (runtime.eval_amp) unless a flag says; --amp uses the run's autocast precision, bf16 when
    # the run trained without one; only on CUDA: elsewhere it still computes in fp32, and says so
    mode = settings.runtime.eval_amp
    if amp and mode == "off":
        mode = "bf16"
    batches = loader if progress is None else _advancing(loader, progress, f"eval {split}")
    metrics = evaluate(model, batches, dev, mode)

    # the weights inspect counts too: a checkpoint's masked ones, or else the ones its saved sparsity rules select
    names = source.prunable
    if names is None:
        names = prunable_names(source.weights, source.masks, source.config)
    zeros = sum(int((source.weights[n] == 0).sum()) for n in names)
    numel = sum(source.weights[n].numel() for n in names)
    paper, paper_note = paper_reference(settings, split)
    flops, flops_note = file_flops(source.arch, source.model_kwargs, source.config, source.weights, shape)
    return {
        "schema": EVAL_SCHEMA,
        "checkpoint": str(path),
        "kind": source.kind,
        "format": source.format,
        "arch": source.arch,
        "preset": source.preset if isinstance(source.preset, str) else settings.preset,
        # what the run is, for the table: "-" with the preset it started from when it trained other data or a model
        "preset_label": preset_label(settings) if settings.preset else None,
        # epochs completed, as the file's header and acdc inspect count them (metrics.jsonl numbers the last of
        # them epoch - 1): one name with one meaning in every file command's output
        "epoch": source.epoch,
        "phase": source.phase,
        "split": split,
        "images": metrics["images"],
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "loss": metrics["loss"],
        "sparsity": zeros / max(numel, 1),
        "flops": flops,
        "flops_note": flops_note,
        "precision": precision(dev, mode),
        "weights_dtype": source.dtype,
        "paper_top1": paper,
        "paper_diff": metrics["top1"] - paper if paper is not None else None,
        "paper_note": paper_note,
        "selection_split": selected_on,
        "recorded_val_top1": _number(source.metrics.get("val_top1")),
        "recorded_test_top1": _number(source.metrics.get("test_top1")),
        "device": "cpu (onnxruntime)" if source.kind == ONNX else str(dev),
    }


def _advancing(loader, progress: Progress, description: str) -> Iterator:
    task = progress.add_task(description, total=len(loader))
    for batch in loader:
        yield batch
        progress.advance(task)
