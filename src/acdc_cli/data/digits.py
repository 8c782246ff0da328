"""The 8x8 handwritten digits that ship inside scikit-learn (1,797 images, no download)."""

from __future__ import annotations

import torch

# the test split does not move with runtime.seed, so test numbers of different runs are comparable
TEST_SEED = 20211206
TEST_SIZE = 270


def load() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 images as uint8 (N, 1, 8, 8) scaled from 0..16 to 0..255, and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().mul(255.0 / 16.0).round().to(torch.uint8).unsqueeze(1)
    return images, torch.from_numpy(digits.target).long()


def split_test(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train pool, test) with a fixed seed."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(TEST_SEED))
    return order[TEST_SIZE:], order[:TEST_SIZE]
