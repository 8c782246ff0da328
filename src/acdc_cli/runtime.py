"""How a model runs on its device and across ranks: precision (autocast, gradient scaler), DDP, SyncBatchNorm,
channels_last, torch.compile, cudnn autotuning, rank-sharded evaluation with all-reduced metrics, and the mask agreement
check between ranks.

``train.py`` keeps the raw model for masks, checkpoints and state-dict names and hands the wrapped ``net`` returned by
:func:`prepare_model` to the training step only, so no ``module.`` or ``_orig_mod.`` prefix ever reaches a file.
"""

from __future__ import annotations

import contextlib
import copy
import zlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from acdc_cli.config import Settings
from acdc_cli.distributed import DistInfo
from acdc_cli.errors import AcdcError, TrainingFault

# 2**61 - 1, a Mersenne prime: per-layer mask hashes are combined modulo it so the checksum fits an int64
_CHECKSUM_MODULUS = (1 << 61) - 1


_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def precision(device: torch.device, amp: str | bool) -> str:
    """The precision a forward pass runs in: ``runtime.amp`` ("bf16", "fp16", "off"; a bool from older callers means
    bf16 or off) on CUDA, and always "fp32" elsewhere (CPU autocast is slower than fp32 for these models)."""
    if amp is True:
        amp = "bf16"
    if device.type != "cuda" or amp not in _AUTOCAST_DTYPES:
        return "fp32"
    return str(amp)


def autocast(device: torch.device, amp: str | bool) -> contextlib.AbstractContextManager[Any]:
    """Autocast in :func:`precision`'s dtype, or nothing for fp32."""
    chosen = precision(device, amp)
    if chosen == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_AUTOCAST_DTYPES[chosen])


def grad_scaler(device: torch.device, amp: str | bool) -> torch.amp.GradScaler:
    """A gradient scaler, enabled for fp16 only (bf16 has fp32's range and needs none). A disabled scaler passes
    every call straight through, so one training step serves every precision; its state goes into resume states."""
    return torch.amp.GradScaler(device.type, enabled=precision(device, amp) == "fp16")


def configure_backends(settings: Settings, device: torch.device) -> None:
    """cudnn autotuning picks the fastest convolution kernels for the (fixed) batch shapes; it is non-deterministic,
    so runtime.deterministic turns it off."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not settings.runtime.deterministic


def sgd_kernel(params: list[torch.Tensor], scaled: bool = False) -> dict[str, bool]:
    """``torch.optim.SGD``'s implementation keyword for these parameters: ``fused=True`` (one kernel reads each
    weight, gradient and momentum once) when they are all floating point on a device type with fused kernels, else
    ``foreach=True``; also foreach when a GradScaler is enabled (``scaled``, fp16): a fused SGD whose first step the
    scaler skips creates its momentum buffers with ``torch.empty_like`` and never writes them (torch 2.14's
    ``_fused_sgd`` with ``found_inf``), so the next step would read uninitialised memory."""
    if scaled:
        return {"foreach": True}
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        fused_devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # a private helper: without it, the two device types every recent torch fuses for
        fused_devices = {"cuda", "cpu"}
    if params and all(p.is_floating_point() and p.device.type in fused_devices for p in params):
        return {"fused": True}
    return {"foreach": True}


def prepare_model(model: nn.Module, settings: Settings, info: DistInfo) -> nn.Module:
    """Make the training network for ``model`` (which must already be on ``info.device``) and return it.

    In place on ``model``: SyncBatchNorm (runtime.sync_batchnorm, DDP on CUDA) and channels_last (runtime.channels_last,
    CUDA). Around it: DistributedDataParallel when there is more than one rank, then torch.compile (runtime.compile).
    Build the optimizer and the sparsifier after this call: SyncBatchNorm replaces the BatchNorm parameters.
    """
    device = info.device
    rt = settings.runtime
    configure_backends(settings, device)
    if rt.sync_batchnorm and info.enabled:
        if device.type != "cuda":
            raise AcdcError("runtime.sync_batchnorm needs CUDA (SyncBatchNorm has no CPU kernels); set it to false")
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if converted is not model:
            raise AcdcError("runtime.sync_batchnorm: the model's root module is a BatchNorm layer")
    if rt.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    net: nn.Module = model
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            # gradients live in the all-reduce buckets: no copy between .grad and the buckets after backward
            gradient_as_bucket_view=True,
        )
    if rt.compile:
        # static shapes: every training batch has the same size (the loaders drop a short last batch), so one graph
        # serves the whole run; dynamic=None would make the batch dimension symbolic at the first other size this
        # code sees (the evaluation's: compiled frames of one model share their shape history) and run every later
        # step on the slower dynamic-shape graph
        net = torch.compile(net, dynamic=False)
    return net


def prepare_eval_model(model: nn.Module, settings: Settings) -> nn.Module:
    """The network that validation runs: ``model`` compiled (static shapes: one graph for the full evaluation batch,
    one for the split's short last batch) when runtime.compile is on, else ``model`` itself. Evaluation works on the
    plain model even under DDP: each rank scores its shard and the sums are all-reduced."""
    if settings.runtime.compile:
        return torch.compile(model, dynamic=False)
    return model


# ----------------------------------------------------------------------------------------------------------------
# masks must agree on every rank


def mask_checksum(masks: dict[str, torch.Tensor]) -> int:
    """A position-sensitive 61-bit hash of a set of boolean masks (kept = True), computed on the masks' device.

    Each kept position contributes a multiplicative hash of its flat index, so moving one kept weight, not only
    changing how many are kept, changes the sum. Layers enter by name (sorted), so the value does not depend on
    dict order: masks read back from a checkpoint hash as they did in training. One host sync for all layers.
    """
    if not masks:
        return 0
    names = sorted(masks)
    per_layer = []
    for name in names:
        flat = masks[name].reshape(-1)
        index = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64)
        # Knuth's multiplicative hash of the index, reduced below 2**31 so the int64 sum cannot overflow
        hashed = (index * 2_654_435_761 + 97) % 2_147_483_647
        per_layer.append((hashed * flat.to(torch.int64)).sum())
    total = 0
    for name, value in zip(names, torch.stack(per_layer).tolist()):
        total = (total * 1_000_003 + zlib.crc32(name.encode()) + value) % _CHECKSUM_MODULUS
    return total


def gather_checksums(value: int, info: DistInfo) -> list[int]:
    """Every rank's ``value``, in rank order (a collective: all ranks must call it)."""
    if not info.enabled:
        return [value]
    mine = torch.tensor([value], dtype=torch.int64, device=info.device)
    gathered = [torch.zeros_like(mine) for _ in range(info.world_size)]
    dist.all_gather(gathered, mine)
    return [int(t.item()) for t in gathered]


def check_agreement(checksums: list[int], what: str) -> None:
    """Raise a TrainingFault naming the ranks that disagree with rank 0."""
    differing = [rank for rank, value in enumerate(checksums) if value != checksums[0]]
    if differing:
        raise TrainingFault(
            f"{what} differ between ranks: rank 0 has checksum {checksums[0]}, ranks {differing} have "
            f"{[checksums[r] for r in differing]}; the ranks' weights diverged, so the run stops"
        )


def verify_masks(masks: dict[str, torch.Tensor] | None, info: DistInfo) -> list[int] | None:
    """Call on every rank right after the masks change. Returns one checksum per rank (all equal), or None in a
    dense phase; raises TrainingFault when any rank's masks differ from rank 0's."""
    if masks is None:
        return None
    checksums = gather_checksums(mask_checksum(masks), info)
    check_agreement(checksums, "masks")
    return checksums


# ----------------------------------------------------------------------------------------------------------------
# metrics across ranks


def sync_buffers(model: nn.Module, info: DistInfo) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), which are what rank 0 saves in checkpoints.

    DDP broadcasts them before each forward, but each rank's last training step then updates its own copy.
    """
    if not info.enabled:
        return
    with torch.no_grad():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


class _EveryNthBatch:
    """Batches ``rank``, ``rank + world_size``, ... of a loader whose type offers no cheaper way to shard."""

    def __init__(self, loader: Any, rank: int, world_size: int):
        self.loader, self.rank, self.world_size = loader, rank, world_size

    def __iter__(self) -> Iterator[Any]:
        for index, batch in enumerate(self.loader):
            if index % self.world_size == self.rank:
                yield batch


def shard_for_eval(loader: Any, info: DistInfo) -> Any:
    """This rank's share of an evaluation loader; the shares cover every sample exactly once (none dropped or
    padded), so all-reduced sums equal what one process would count over the whole split."""
    if not info.enabled or loader is None:
        return loader
    from torch.utils.data import DataLoader, Subset

    from acdc_cli.data.tensor_loader import TensorLoader

    rank, world = info.rank, info.world_size
    if isinstance(loader, TensorLoader) and not loader.shuffle and loader.world_size == 1:
        shard = copy.copy(loader)
        shard.images = loader.images[rank::world]
        shard.labels = loader.labels[rank::world]
        shard.extra = loader.extra[rank::world] if loader.extra is not None else None
        return shard
    if callable(getattr(loader, "indices", None)) and not loader.shuffle and loader.world_size == 1:
        # ImageLoader: its order comes from indices(); the shard keeps every world_size-th image of it
        shard = copy.copy(loader)
        full_order = loader.indices
        shard.indices = lambda: full_order()[rank::world]
        return shard
    if isinstance(loader, DataLoader) and hasattr(loader.dataset, "__len__") and loader.batch_size is not None:
        subset = Subset(loader.dataset, range(rank, len(loader.dataset), world))
        return DataLoader(
            subset,
            batch_size=loader.batch_size,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            persistent_workers=loader.persistent_workers,
            prefetch_factor=loader.prefetch_factor if loader.num_workers > 0 else None,
        )
    return _EveryNthBatch(loader, rank, world)


def evaluate(model: nn.Module, loader: Any, device: torch.device, amp: str | bool,
             info: DistInfo) -> dict[str, float]:
    """``evaluate`` over this rank's shard (from :func:`shard_for_eval`), then sums all-reduced: every rank returns
    the metrics of rank 0's model over the whole split. A collective: all ranks must call it."""
    from acdc_cli.evaluate import evaluate as evaluate_local  # evaluate.py imports this module's autocast

    if not info.enabled:
        return evaluate_local(model, loader, device, amp)
    sync_buffers(model, info)
    local = evaluate_local(model, loader, device, amp)
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


def reduce_train_stats(stats: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Whole-job training metrics from each rank's ``train_epoch`` result: every rank sees the same number of
    samples per epoch, so loss and top-1 are the mean over ranks; throughput is the sum. A collective."""
    if not info.enabled:
        return stats
    values = torch.tensor([stats["train_loss"], stats["train_top1"], stats["img_per_s"]],
                          dtype=torch.float64, device=info.device)
    dist.all_reduce(values)
    loss, top1, img_per_s = values.tolist()
    return {**stats, "train_loss": loss / info.world_size, "train_top1": top1 / info.world_size,
            "img_per_s": img_per_s}
