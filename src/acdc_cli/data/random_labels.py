"""Memorization (Zhang et al. 2017, as the AC/DC paper runs it): a seeded subset of the training split gets uniformly
random labels, and accuracy on that subset is tracked against both its random and its true labels."""

from __future__ import annotations

import torch

from acdc_cli.errors import AcdcError

# a generator stream of its own: split_val draws from seed + 1
_STREAM = 2


def select_random_labels(
    train_indices: torch.Tensor, count: int, num_classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``count`` of ``train_indices`` and draw a random label for each.

    Returns (positions into ``train_indices``, random labels). Picking from the training indices only keeps the
    memorized samples disjoint from the validation split; with ``data.val_size = 0`` they are every training image,
    and the pick is among all of them, as the reference's (``policies/manager.py``: a permutation of the whole
    training set).
    """
    if count > len(train_indices):
        raise AcdcError(
            f"data.random_labels ({count}) exceeds the {len(train_indices)} images that train (those left after "
            "the validation split, if any)"
        )
    g = torch.Generator().manual_seed((seed * 1_000_003 + _STREAM) % 2**63)  # seeds up to 2**62 fit
    positions = torch.randperm(len(train_indices), generator=g)[:count].sort().values
    labels = torch.randint(0, num_classes, (count,), generator=g)
    return positions, labels
