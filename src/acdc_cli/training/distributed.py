"""torchrun integration: the process group comes from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).
"""

from __future__ import annotations

import copy
import gc
import logging
import os
import shutil
import sys
import tempfile
import traceback
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from acdc_cli.config import Settings
from acdc_cli.data.tensor_loader import TensorLoader
from acdc_cli.errors import AcdcError, TrainingFault, one_line

if TYPE_CHECKING:
    from acdc_cli.config import Settings


# 2**61 - 1, a Mersenne prime: per-layer mask hashes are combined modulo it so the checksum fits an int64
_CHECKSUM_MODULUS = (1 << 61) - 1


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


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return _rank_gpu(local_rank)
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise AcdcError("runtime.device is cuda but no CUDA device is available")
        if name == "cuda":
            return _rank_gpu(local_rank)
        index_text = name.split(":", 1)[1] if name.startswith("cuda:") else ""
        if not index_text.isdigit():
            raise AcdcError(f"unknown device {one_line(name[:40])!r} (auto, cpu, cuda, cuda:N, mps)")
        index = int(index_text)
        if index >= torch.cuda.device_count():
            raise AcdcError(f"runtime.device {name}: only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device(name)
    if name == "mps" and not torch.backends.mps.is_available():
        raise AcdcError("runtime.device is mps but MPS is not available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise AcdcError(f"unknown device {one_line(name[:40])!r} (auto, cpu, cuda, cuda:N, mps)") from None


def _rank_gpu(local_rank: int) -> torch.device:
    """One GPU per process on a node: local rank i gets GPU i."""
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise AcdcError(f"local rank {local_rank} has no GPU of its own: this node has {count} CUDA device(s); "
                        f"start at most {count} processes per node")
    return torch.device("cuda", local_rank)


# a gloo group beside an nccl one, for the ranks' small host-side agreements (see control_group)
_CONTROL_GROUP: dist.ProcessGroup | None = None


def control_group() -> dist.ProcessGroup | None:
    """The group for agreements between ranks on host values (stop signals, non-finite losses): gloo over CPU
    tensors, so the host never waits for queued GPU work to exchange a flag. ``None`` means the default group,
    which is gloo itself on the CPU."""
    return _CONTROL_GROUP


def setup(device_name: str) -> DistInfo:
    """Join torchrun's process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU; with nccl also a gloo
    control group)."""
    global _CONTROL_GROUP
    rank, world_size, local_rank = launch_env()
    if world_size > 1 and not dist.is_initialized():
        check_rendezvous(world_size)
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized() and dist.get_backend() == "nccl" and _CONTROL_GROUP is None:
        _CONTROL_GROUP = dist.new_group(backend="gloo")  # a collective: every rank makes it here, in step
    return DistInfo(rank, world_size, local_rank, device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    """Leave the process group, after dropping what still holds it.

    destroy_process_group only unregisters a group that something still references, and DDP's reducer references
    its group: while a DDP model is alive (in a reference cycle, or in the frames of an error in flight, which an
    uncaught error under --debug keeps in sys.last_traceback until exit), gloo's backend and its worker threads
    outlive this call. They then release their last tensors during interpreter shutdown, where taking the GIL
    aborts the process ("terminate called without an active exception") instead of letting it exit with its code.
    So the frames of an error in flight give up their locals (the traceback still names every line), a collection
    frees cycles, and only then is the group destroyed, its threads joined here.
    """
    global _CONTROL_GROUP
    _CONTROL_GROUP = None
    if not dist.is_initialized():
        return
    error = sys.exception()
    if error is not None:
        traceback.clear_frames(error.__traceback__)
    gc.collect()
    dist.destroy_process_group()


_RANK_VARIABLES = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}  # and their values in a process alone


_stray_warned = False


def _launched() -> bool:
    """WORLD_SIZE > 1 beside the rendezvous variables torchrun (or another launcher) sets: only then are RANK and
    LOCAL_RANK this process's place in a process group."""
    world = os.environ.get("WORLD_SIZE", "").strip()
    return (world.isdigit() and int(world) > 1
            and ("MASTER_ADDR" in os.environ or any(k.startswith("TORCHELASTIC_") for k in os.environ)))


def launch_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) of this process.

    Inside a launch (see :func:`_launched`) they must be valid, or this is a one-line AcdcError. Outside one, rank
    variables left in the environment (RANK=1 from another job) are ignored with one warning on stderr, and the
    process runs alone as rank 0: it writes its run dir and reports its errors."""
    global _stray_warned
    if _launched():
        world = int(os.environ["WORLD_SIZE"])
        rank, local = os.environ.get("RANK", "").strip(), os.environ.get("LOCAL_RANK", "0").strip()
        if not (rank.isdigit() and int(rank) < world and local.isdigit() and int(local) < world):
            raise AcdcError(f"launched with WORLD_SIZE={world} but RANK={one_line(rank[:40])!r}, LOCAL_RANK="
                            f"{one_line(local[:40])!r}: each must be a number below WORLD_SIZE")
        return int(rank), world, int(local)
    stray = [f"{name}={one_line(os.environ[name][:40])}" for name, alone in _RANK_VARIABLES.items()
             if os.environ.get(name, alone).strip() != alone]
    if stray and not _stray_warned:
        _stray_warned = True
        print(f"warning: ignoring {', '.join(stray)}: no torchrun launch (that needs WORLD_SIZE > 1 and MASTER_ADDR "
              "or TORCHELASTIC_* variables); running as one process, rank 0", file=sys.stderr)
    return 0, 1, 0


# far beyond any cluster that runs one process per GPU; a 20-digit WORLD_SIZE is a broken environment, not a launch
MAX_WORLD_SIZE = 1_048_576


def check_rendezvous(world: int) -> None:
    """The variables the env:// rendezvous of init_process_group reads, checked before it reads them: torchrun sets
    MASTER_ADDR and MASTER_PORT for every process it starts, so a launch that lacks one was not made by it."""
    if world > MAX_WORLD_SIZE:
        raise AcdcError(f"launched with WORLD_SIZE={world}, above the {MAX_WORLD_SIZE:,} processes acdc joins")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name, "").strip()]
    if missing:
        raise AcdcError(f"launched with WORLD_SIZE={world} but without {' and '.join(missing)}: start the processes "
                        "with torchrun, which sets them, or set both for your launcher")
    port = os.environ["MASTER_PORT"].strip()
    if not (port.isdigit() and 0 < int(port) < 65536):
        raise AcdcError(f"MASTER_PORT={one_line(port[:40])!r} is not a TCP port (1 to 65535)")


def env_rank() -> int:
    """This process's global rank in a torchrun launch; 0 outside one, and where the launch's variables are invalid
    (so that the error about them is printed)."""
    try:
        return launch_env()[0]
    except AcdcError:
        return 0


def under_launcher() -> bool:
    """True inside a process that torchrun (or another launcher setting its variables) started."""
    return "TORCHELASTIC_RUN_ID" in os.environ or _launched()


def check_nproc(nproc: int, settings: Settings) -> int:
    """Refuse what would fail on every rank, before any rank starts. Returns the CPU threads each process should use.

    On CUDA every process needs a GPU of its own. On the CPU (gloo) processes share the machine, so acdc allows at
    most one per core: more would only oversubscribe the cores and slow every rank down.
    """
    if nproc < 1:
        raise AcdcError(f"--nproc must be at least 1, got {nproc}")
    if under_launcher():
        raise AcdcError("--nproc starts torchrun itself; inside a torchrun process leave it out")
    device_name = settings.runtime.device
    cores = os.cpu_count() or 1
    device = resolve_device(device_name)
    if settings.runtime.sync_batchnorm and nproc > 1 and device.type != "cuda":
        raise AcdcError("runtime.sync_batchnorm needs CUDA (SyncBatchNorm has no CPU kernels); set it to false")
    if device.type == "cuda":
        if device_name not in ("auto", "cuda"):
            raise AcdcError(f"runtime.device {device_name} pins one GPU; with --nproc use cuda (one GPU per process)")
        count = torch.cuda.device_count()
        if nproc > count:
            raise AcdcError(f"--nproc {nproc} exceeds the {count} CUDA device(s) of this machine (one GPU per process)")
    elif device.type == "cpu":
        if nproc > cores:
            raise AcdcError(f"--nproc {nproc} exceeds the {cores} CPU cores of this machine (on the CPU acdc runs at "
                            f"most one process per core)")
    else:
        raise AcdcError(f"--nproc needs CUDA or the CPU; runtime.device {device_name} runs one process")
    if settings.data.batch_size % nproc:
        raise AcdcError(f"data.batch_size {settings.data.batch_size} (the global batch) does not divide across "
                        f"{nproc} processes")
    return max(1, cores // nproc)


STOPPED_MARKER_ENV = "_ACDC_LAUNCH_STOPPED_MARKER"


def mark_stopped() -> None:
    """Tell `acdc train --nproc` (when it started this process) that the ranks stopped cleanly on a signal."""
    path = os.environ.get(STOPPED_MARKER_ENV)
    if path:
        Path(path).write_text("stopped\n")


def launch(nproc: int, argv: list[str], threads: int, stopped_code: int = 0) -> int:
    """Run ``python -m acdc_cli <argv>`` in ``nproc`` processes on this machine through torchrun's own launcher
    (a standalone c10d rendezvous on a free local port). Returns the exit code of the first failing rank, else 0;
    ``stopped_code`` when a signal to this process stopped the ranks cleanly."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # torchrun would otherwise set 1 thread per process and print a warning about it
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    args = ["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc), "--module", "acdc_cli", *argv]
    # rank 0 creates this file once a signal has stopped the ranks after a checkpoint (see cli.train)
    marker = Path(tempfile.mkdtemp(prefix="acdc-launch-")) / "stopped"
    os.environ[STOPPED_MARKER_ENV] = str(marker)
    # the ranks print their own errors (rank 0 for what all of them hit); torchrun's log lines would repeat them
    elastic_log = logging.getLogger("torch.distributed.elastic")
    level = elastic_log.level
    elastic_log.setLevel(logging.CRITICAL)
    try:
        torchrun.main(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        # a rank killed by a signal reports -signum; shells report that as 128 + signum
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
        if rank != 0:
            print(f"error: rank {rank} failed first (exit code {code}); `acdc --debug train ...` shows every "
                  "rank's traceback", file=sys.stderr)
        return code
    except SignalException as exc:
        # the launcher got SIGTERM/SIGINT and passed it on to every rank; it cannot see their exit codes, so the
        # marker tells a clean stop (checkpoint written: exit 0) from ranks that were killed
        return stopped_code if marker.exists() else 128 + int(exc.sigval)
    finally:
        elastic_log.setLevel(level)
        os.environ.pop(STOPPED_MARKER_ENV, None)
        shutil.rmtree(marker.parent, ignore_errors=True)
    return 0
