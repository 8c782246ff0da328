"""Evaluation inside a run: top-1 / top-5 / loss of a model over a loader (``evaluate``), the same over the ranks'
shards of a split summed exactly (``evaluate_sharded``), and a memorization run's accuracy on its random-label
subset against both its random and its true labels (``evaluate_memorized``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from acdc_cli.training.distributed import DistInfo, sync_buffers
from acdc_cli.training.runtime import autocast


def evaluate_sharded(model: nn.Module, loader: Any, device: torch.device, amp: str | bool,
                     info: DistInfo) -> dict[str, float]:
    """``evaluate`` over this rank's shard (from :func:`shard_for_eval`), then sums all-reduced: every rank returns
    the metrics of rank 0's model over the whole split. A collective: all ranks must call it."""
    if not info.enabled:
        return evaluate(model, loader, device, amp)
    sync_buffers(model, info)
    local = evaluate(model, loader, device, amp)
    n = local["images"]
    # evaluate() returns fractions of this shard; turn them back into sums (counts are exact integers)
    sums = torch.tensor(
        [local["loss"] * n, round(local["top1"] * n), round(local["top5"] * n), n],
        dtype=torch.float64,
        device=device,
    )
    dist.all_reduce(sums)
    loss_sum, top1, top5, total = sums.tolist()
    total_images = int(total)
    denominator = max(total_images, 1)
    return {"loss": loss_sum / denominator, "top1": top1 / denominator, "top5": top5 / denominator,
            "images": total_images}


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
