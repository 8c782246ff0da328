"""evaluate() and evaluate_memorized() count exactly what they name: top-1 and top-5 hits over every image, the loss
as the mean over images (not over batches), in eval mode, against a model whose logits are known in advance."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from acdc_cli.training.evaluation import evaluate, evaluate_memorized

CPU = torch.device("cpu")
CLASSES = 10


class TableModel(nn.Module):
    """Logits read from a fixed table by the image's index (its first value); wrong logits in training mode, so a
    pass that forgets eval() gives other numbers."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.logits[x[:, 0].long()]
        return -rows if self.training else rows


def _table(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, CLASSES, generator=g)


def _label_at_rank(logits: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    """For each image, the class whose logit is the rank-th largest (0: the prediction)."""
    order = logits.argsort(dim=1, descending=True)
    return torch.tensor([int(order[i, r]) for i, r in enumerate(ranks)])


def _batches(labels: torch.Tensor, sizes: list[int], *extra: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    out, start = [], 0
    for size in sizes:
        index = torch.arange(start, start + size, dtype=torch.float32).view(-1, 1)
        out.append((index, labels[start:start + size], *(t[start:start + size] for t in extra)))
        start += size
    return out


# ranks of the true label among the logits: 2 of rank 0 (top-1), 8 under rank 5 (top-5); the last batch, of 3
# images, holds ranks 3 and 4, which only a top-5 over the classes (not over the batch) counts
RANKS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 3, 4, 0]
SIZES = [5, 5, 3]


def test_top1_top5_and_loss_are_exact_counts_over_uneven_batches():
    logits = _table(len(RANKS))
    labels = _label_at_rank(logits, RANKS)
    model = TableModel(logits)
    result = evaluate(model, _batches(labels, SIZES), CPU)
    assert result["images"] == 13
    assert result["top1"] == 2 / 13
    assert result["top5"] == 8 / 13
    # the mean over the 13 images, not the mean of the three batches' means
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)


def test_evaluation_runs_in_eval_mode_and_restores_the_mode():
    logits = _table(len(RANKS))
    labels = _label_at_rank(logits, RANKS)
    model = TableModel(logits)
    model.train()
    assert evaluate(model, _batches(labels, SIZES), CPU)["top1"] == 2 / 13
    assert model.training
    model.eval()
    evaluate(model, _batches(labels, SIZES), CPU)
    assert not model.training


def test_fewer_than_five_classes_make_top5_every_image():
    logits = _table(6)[:, :3]
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    result = evaluate(TableModel(logits), _batches(labels, [4, 2]), CPU)
    assert result["top5"] == 1.0
    assert result["top1"] == (logits.argmax(1) == labels).sum().item() / 6


def test_memorized_counts_random_and_true_labels_apart():
    logits = _table(8)
    predicted = logits.argmax(1)
    # random labels: the prediction for 5 of 8 images; true labels: the prediction for 2 of 8, never the same images
    random_labels = torch.where(torch.arange(8) < 5, predicted, (predicted + 1) % CLASSES)
    true_labels = torch.where(torch.arange(8) >= 6, predicted, (predicted + 2) % CLASSES)
    batches = [(index, r, t) for index, r, t in _batches(random_labels, [3, 5], true_labels)]
    result = evaluate_memorized(TableModel(logits), batches, CPU)
    assert result == {"memorized_top1": 5 / 8, "memorized_true_top1": 2 / 8}
