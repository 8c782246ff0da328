"""Top-1 / top-5 / loss of a model over a loader (sums stay on the device until the end of the pass), and of a
checkpoint on its own dataset (``acdc eval``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn

from acdc_cli import data as data_mod
from acdc_cli.checkpoint import build_model, load_checkpoint
from acdc_cli.config import load_settings
from acdc_cli.distributed import resolve_device
from acdc_cli.errors import AcdcError
from acdc_cli.runtime import autocast
from acdc_cli.sparsity.sparsifier import select_layers


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: str | bool = False) -> dict[str, float]:
    """``{"loss", "top1", "top5", "images"}``; accuracies are fractions in [0, 1]."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    top1 = torch.zeros((), device=device, dtype=torch.long)
    top5 = torch.zeros((), device=device, dtype=torch.long)
    count = 0
    for batch in loader:
        images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        k = min(5, logits.shape[1])
        best = logits.topk(k, dim=1).indices
        hits = best.eq(labels.view(-1, 1))
        top1 += hits[:, 0].sum()
        top5 += hits.any(dim=1).sum()
        count += labels.numel()
    model.train(was_training)
    n = max(count, 1)
    return {"loss": loss_sum.item() / n, "top1": top1.item() / n, "top5": top5.item() / n, "images": count}


@torch.no_grad()
def evaluate_memorized(model: nn.Module, loader, device: torch.device, amp: str | bool = False) -> dict[str, float]:
    """Memorization metrics over a loader of (x, random label, true label): how many of the random-label training
    images the model predicts as their random label (``memorized_top1``) and as their true one
    (``memorized_true_top1``)."""
    was_training = model.training
    model.eval()
    hits_random = torch.zeros((), device=device, dtype=torch.long)
    hits_true = torch.zeros((), device=device, dtype=torch.long)
    count = 0
    for images, random_labels, true_labels in loader:
        with autocast(device, amp):
            predicted = model(images.to(device, non_blocking=True)).argmax(1)
        hits_random += (predicted == random_labels.to(device, non_blocking=True)).sum()
        hits_true += (predicted == true_labels.to(device, non_blocking=True)).sum()
        count += random_labels.numel()
    model.train(was_training)
    n = max(count, 1)
    return {"memorized_top1": hits_random.item() / n, "memorized_true_top1": hits_true.item() / n}


SPLITS = ("val", "test")


def eval_checkpoint(
    path: Path | str,
    split: str = "val",
    data_dir: Path | str | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Top-1 / top-5 / loss of a checkpoint's weights as saved, on its own dataset rebuilt from its saved settings.

    ``progress`` (optional) gets one task that advances per batch. Accuracies and sparsity are fractions in [0, 1].
    """
    if split not in SPLITS:
        raise AcdcError(f"unknown split '{split}' (choose {', '.join(SPLITS)})")
    path = Path(path)
    ckpt = load_checkpoint(path)
    if "data" not in ckpt.config:  # acdc.save() without data=...
        raise AcdcError(f"{path} records no dataset, so there is nothing to evaluate it on")
    flags = {
        "data.dir": str(data_dir) if data_dir is not None else None,
        "data.eval_batch_size": batch_size,
        "runtime.device": device,
    }
    settings = load_settings(base=ckpt.config, flags=flags)
    dev = resolve_device(settings.runtime.device)
    bundle = data_mod.build(settings, dev)
    loader = bundle.val if split == "val" else bundle.test
    if loader is None or len(loader) == 0:
        raise AcdcError(f"dataset '{settings.data.name}' has no {split} split in these settings")
    model = build_model(ckpt).to(dev)

    batches = loader if progress is None else _advancing(loader, progress, f"eval {split}")
    metrics = evaluate(model, batches, dev, settings.runtime.amp)

    if ckpt.masks:
        names = list(ckpt.masks)
    else:
        sp = settings.sparsity
        names = [r.param for r in select_layers(model, sp.include, sp.exclude, sp.n_m) if r.selected]
    weights = dict(model.named_parameters())
    zeros = sum(int((weights[n] == 0).sum()) for n in names)
    numel = sum(weights[n].numel() for n in names)
    paper = ckpt.extra.get("paper_top1", settings.paper_top1)
    paper = paper if isinstance(paper, (int, float)) else None
    recorded = ckpt.metrics.get("val_top1")
    return {
        "checkpoint": str(path),
        "arch": ckpt.arch,
        "preset": ckpt.extra.get("preset", settings.preset),
        "epoch": ckpt.epoch,
        "phase": ckpt.phase,
        "split": split,
        "images": metrics["images"],
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "loss": metrics["loss"],
        "sparsity": zeros / max(numel, 1),
        "paper_top1": paper,
        "paper_diff": metrics["top1"] - paper if paper is not None else None,
        "recorded_val_top1": recorded if isinstance(recorded, (int, float)) else None,
        "device": str(dev),
    }


def _advancing(loader, progress: Progress, description: str) -> Iterator:
    task = progress.add_task(description, total=len(loader))
    for batch in loader:
        yield batch
        progress.advance(task)
