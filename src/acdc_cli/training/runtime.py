"""How a model runs on its device and across ranks: precision (autocast, gradient scaler), DDP, SyncBatchNorm,
channels_last, torch.compile, cudnn autotuning, rank-sharded evaluation with all-reduced metrics, and the mask agreement
check between ranks.

``train.py`` keeps the raw model for masks, checkpoints and state-dict names and hands the wrapped ``net`` returned by
:func:`prepare_model` to the training step only, so no ``module.`` or ``_orig_mod.`` prefix ever reaches a file.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from acdc_cli.config import Settings
from acdc_cli.errors import AcdcError
from acdc_cli.training.distributed import DistInfo

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def precision(device: torch.device, amp: str) -> str:
    """The precision a forward pass runs in: ``runtime.amp`` ("bf16", "fp16", "off") on CUDA, and always "fp32"
    elsewhere (CPU autocast is slower than fp32 for these models)."""
    if device.type != "cuda" or amp not in _AUTOCAST_DTYPES:
        return "fp32"
    return str(amp)


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast in :func:`precision`'s dtype, or nothing for fp32."""
    chosen = precision(device, amp)
    if chosen == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_AUTOCAST_DTYPES[chosen])


def grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """A gradient scaler, enabled for fp16 only (bf16 has fp32's range and needs none). A disabled scaler passes
    every call straight through, so one training step serves every precision; its state goes into resume states."""
    return torch.amp.GradScaler(device.type, enabled=precision(device, amp) == "fp16")


def seed_step_generators(seed: int, device: torch.device) -> None:
    """Seed the generators a training step draws from (dropout, random layers): the CPU's default generator and,
    on CUDA (or MPS), this device's, with what ``torch.manual_seed(seed)`` gives them, so the draws are the same. Cheaper per
    step than ``torch.manual_seed``, which also seeds every other accelerator backend and, for those not started,
    records a Python stack trace each time."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()] \
            .manual_seed(seed)
    elif device.type == "mps":
        torch.mps.manual_seed(seed)


def cpu_threads(requested: int | None) -> tuple[int, str]:
    """The CPU threads torch uses for this process, and why: ``runtime.threads`` when set; else the count that
    OMP_NUM_THREADS gave torch (``acdc train --nproc`` and torchrun set it); else the cores this process may run on
    (its CPU affinity, as ``data.num_workers`` counts them) shared among the processes of this machine (torchrun's
    LOCAL_WORLD_SIZE). torch's own default counts every core of the machine, which oversubscribes a process
    pinned to a few of them, or sharing them."""
    if requested:
        return requested, "runtime.threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_processes = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1)
    return max(cores // local_processes, 1), f"{cores} cores for {local_processes} process(es)"


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


def elapsed_seconds(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall time of ``fn()`` including all device work it queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def interleaved_seconds(modes: dict[str, Callable[[int], None]], steps: int, warmup: int, rounds: int,
                        device: torch.device, before: dict[str, Callable[[], None]] | None = None
                        ) -> dict[str, list[float]]:
    """Seconds of ``steps`` steps of each mode in each of ``rounds`` rounds, the modes taking turns within a round
    (and starting in turn, so that none always runs first after another): a change in machine load hits all alike.
    ``before[mode]()`` runs before each of the mode's passes (untimed: global backend flags)."""
    before = before or {}
    names = list(modes)
    for name in names:
        before.get(name, lambda: None)()
        if warmup:
            modes[name](warmup)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        for name in names[index % len(names):] + names[:index % len(names)]:
            before.get(name, lambda: None)()
            seconds[name].append(elapsed_seconds(lambda name=name: modes[name](steps), device))
    return seconds


# address space a CPU thread of torch's OpenMP pool takes: its stack (RLIMIT_STACK, 8 MiB by default) and as much
# again for what the pool and the allocator reserve beside it; measured: 1024 threads failed under `ulimit -v` 16 GB
# (12.7 GB left after torch's import) and ran under 24 GB (20.7 GB left)
THREAD_ADDRESS_FACTOR = 2


def check_threads(threads: int | None) -> None:
    """Refuse ``runtime.threads`` that cannot start under the process's address-space limit (``ulimit -v``, common
    on clusters). libgomp aborts the process when it cannot create a thread ("Thread creation failed"), with no
    Python error to catch, so this is estimated before the first parallel region rather than caught after it."""
    if threads is None:
        return
    limit = _address_space_limit()
    if limit is None:
        return
    stack = resource.getrlimit(resource.RLIMIT_STACK)[0]
    stack = stack if 0 < stack < 2**40 else 8 * 2**20
    used = _virtual_size()
    need = threads * stack * THREAD_ADDRESS_FACTOR
    if used is not None and need > limit - used:
        raise AcdcError(f"runtime.threads={threads} needs about {need / 2**30:.1f} GiB of address space for its "
                        f"threads and {max(limit - used, 0) / 2**30:.1f} GiB are left under this process's limit "
                        f"(ulimit -v {limit // 1024}); set fewer threads")


def _address_space_limit() -> int | None:
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    return None if soft == resource.RLIM_INFINITY or soft < 0 else soft


def _virtual_size() -> int | None:
    """The process's virtual memory size in bytes (Linux), None where it cannot be read."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[0]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return None
