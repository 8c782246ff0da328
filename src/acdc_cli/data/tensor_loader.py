"""Batches from a split that lives in memory (on the GPU when training there) as uint8 images.

Order and augmentation are drawn from generators seeded by (seed, epoch), so an epoch's batches depend only on the
epoch number: a resumed run sees exactly the batches an uninterrupted one would, and every rank agrees on the
permutation it shards. Training loaders (``drop_last``) yield whole batches only, so a compiled step sees one shape.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F


class EpochBatches:
    """What acdc's loaders share: each rank's equal share of a split, whole batches only under ``drop_last``, and
    the epoch's seeded order. Subclasses set the attributes below and say how many samples the split holds."""

    batch_size: int
    drop_last: bool
    shuffle: bool
    seed: int
    rank: int
    world_size: int
    epoch: int

    def _pool_size(self) -> int:
        raise NotImplementedError

    @property
    def shard_size(self) -> int:
        """Samples in this rank's share (ranks get equal shares; a remainder < world_size is dropped)."""
        n = self._pool_size()
        return n // self.world_size if self.world_size > 1 else n

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch: with ``drop_last``, whole batches only, unless the share is smaller
        than one batch (then it is the epoch's one batch)."""
        share = self.shard_size
        if self.drop_last and share >= self.batch_size:
            return share - share % self.batch_size
        return share

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _generator(self, stream: int) -> torch.Generator:
        """A CPU generator of (seed, epoch, stream): stream 0 draws the epoch's order."""
        g = torch.Generator(device="cpu")
        g.manual_seed((self.seed * 1_000_003 + self.epoch * 7_919 + stream) % (2**63))
        return g

    def epoch_order(self) -> torch.Tensor:
        """This rank's sample order for the current epoch, on the CPU: a seeded shuffle (or the split's order), then
        every world_size-th sample from the rank's offset. Every rank and every resume draws the same one."""
        n = self._pool_size()
        order = torch.randperm(n, generator=self._generator(0)) if self.shuffle else torch.arange(n)
        if self.world_size > 1:
            order = order[: self.shard_size * self.world_size][self.rank :: self.world_size]
        return order


class TensorLoader(EpochBatches):
    def __init__(
        self,
        images: torch.Tensor,  # uint8 (N, C, H, W)
        labels: torch.Tensor,  # int64 (N,)
        batch_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        augment: bool = False,
        pad: int = 4,
        flip: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        extra: torch.Tensor | None = None,  # a second label tensor yielded beside the first (memorization)
        policy: Any = None,  # data.augment_policy's (policies.AugmentPolicy), after crop and flip
    ):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError("images must be uint8 (N, C, H, W)")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.long)
        self.extra = extra.to(self.device, torch.long) if extra is not None else None
        self.batch_size = batch_size
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1) * 255.0
        self.shuffle, self.drop_last, self.augment, self.pad, self.flip = shuffle, drop_last, augment, pad, flip
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.policy = policy
        self.epoch = 0

    def _pool_size(self) -> int:
        return len(self.labels)

    def _indices(self) -> torch.Tensor:
        return self.epoch_order().to(self.device, non_blocking=True)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std

    def _augmentation(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The whole epoch's crop offsets (dy, dx) and flips for this rank, drawn on the host from ``g`` and moved to
        the device in one copy: the steps then never copy from the host (or wait for it) to augment a batch. Drawn for
        the whole share, dropped samples included, so a sample's draws do not depend on the batch size."""
        if not self.augment:
            return None
        n = self.shard_size
        span = 2 * self.pad + 1
        offsets = torch.randint(0, span, (2, n), generator=g) if self.pad else torch.zeros(2, n, dtype=torch.long)
        flips = (torch.rand(n, generator=g) < 0.5) if self.flip else torch.zeros(n, dtype=torch.bool)
        packed = torch.cat([offsets, flips.long().view(1, n)])
        if self.device.type == "cuda":
            packed = packed.pin_memory()  # a pinned source makes the copy truly asynchronous
        packed = packed.to(self.device, non_blocking=True)
        return packed[0], packed[1], packed[2].bool()

    def _augment(self, batch: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Random crop with zero padding ``pad`` and horizontal flip, as gathers on the batch's device."""
        n, c, h, w = batch.shape
        device = batch.device
        if self.pad:
            padded = F.pad(batch, (self.pad,) * 4)
            rows = (dy.view(n, 1) + torch.arange(h, device=device)).view(n, 1, h, 1)
            cols = (dx.view(n, 1) + torch.arange(w, device=device)).view(n, 1, 1, w)
            batch = padded[torch.arange(n, device=device).view(n, 1, 1, 1),
                           torch.arange(c, device=device).view(1, c, 1, 1), rows, cols]
        if self.flip:
            batch = torch.where(flips.view(n, 1, 1, 1), batch.flip(3), batch)
        return batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return self.iterate()

    def iterate(self, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """Yield (images float normalized, labels[, extra]) from batch ``start_batch`` of the current epoch."""
        indices = self._indices()
        draws = self._augmentation(self._generator(1 + self.rank))
        for b in range(start_batch, len(self)):
            window = slice(b * self.batch_size, (b + 1) * self.batch_size)
            idx = indices[window]
            batch = self.images[idx]
            if draws is not None:
                batch = self._augment(batch, *(d[window] for d in draws))
            if self.policy is not None:
                batch = self.policy(batch, self.seed, self.epoch, self.world_size * b + self.rank)
            out = (self.normalize(batch), self.labels[idx])
            yield out + (self.extra[idx],) if self.extra is not None else out
