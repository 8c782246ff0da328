"""RandAugment and TrivialAugment of training images, through torchvision's transforms v2 (``data.augment_policy``).

Each image gets its own draw of operations. The draws come from torch's CPU generator, reseeded here per batch (tensor
loaders) or per image (ImageFolder workers) from the run's seed, the epoch and the position, and put back afterwards:
a resumed run augments every batch as an uninterrupted one would, and nothing else's random stream moves.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch


class AugmentPolicy:
    """A torchvision v2 transform of uint8 images, applied to each image of a batch on its own with seeded draws."""

    def __init__(self, name: str, ops: int = 2, magnitude: int = 9):
        from torchvision.transforms import v2  # slow to import, and only runs that augment so need it

        self.name = name
        self.transform = v2.RandAugment(num_ops=ops, magnitude=magnitude) if name == "randaugment" else \
            v2.TrivialAugmentWide()

    def __call__(self, images: torch.Tensor, seed: int, epoch: int, position: int) -> torch.Tensor:
        """The transform on each image of ``images`` (N, C, H, W uint8), drawn from (seed, epoch, position):
        ``position`` is a rank's batch, or an image's index."""
        digest = hashlib.blake2b(f"policy/{seed}/{epoch}/{position}".encode(), digest_size=8).digest()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int.from_bytes(digest, "little") >> 1)
            return torch.stack([self.transform(image) for image in images])


def build_policy(data: Any) -> AugmentPolicy | None:
    """The policy of ``data`` (the settings' data section) for training images; None for augment_policy "none" and
    when ``data.augment`` is off (it turns every training augmentation off, on every dataset)."""
    if data.augment_policy == "none" or not data.augment:
        return None
    return AugmentPolicy(data.augment_policy, data.randaugment_ops, data.randaugment_magnitude)
