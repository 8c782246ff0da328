"""Host snapshots of the training state and the background thread that writes them: a checkpoint is copied off
the live tensors (pinned, non-blocking from CUDA) and written while training goes on; plus the fused finiteness
check that guards every save."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch


def all_finite(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Whether every value of the floating-point ``tensors`` (all on one device) is finite, as a 0-dim bool tensor
    on that device: nothing waits for it until it is read. One fused pass per dtype: a tensor's largest magnitude is
    NaN or infinite exactly when one of its values is (and, unlike a sum, never overflows)."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        if tensor.is_floating_point() and tensor.numel():
            groups.setdefault(tensor.dtype, []).append(tensor.detach())
    verdicts = [torch.stack(torch._foreach_norm(group, float("inf"))).isfinite().all() for group in groups.values()]
    if not verdicts:
        return torch.ones((), dtype=torch.bool)
    return torch.stack(verdicts).all() if len(verdicts) > 1 else verdicts[0]


class HostSnapshot:
    """Host buffers that snapshots of the training state are copied into, reused from one checkpoint to the next.

    From a CUDA device the buffers are pinned and the copies non-blocking: the training thread only queues them,
    behind the kernels already queued, and an event recorded after them tells the writer thread when they have
    landed (:meth:`Taken.wait`). From the CPU the copy is a plain one. Either way the snapshot shares no memory with
    training. The buffers are reused, so a new snapshot may only be taken once the write of the previous one is
    done (``RunDir`` waits for its writer first)::

        with host.taking() as taken:
            weights = host.copy(model.state_dict(), "weights")
        writer.submit(lambda: (taken.wait(), write(weights)))
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}
        self._used: set[tuple[Any, ...]] = set()
        self._cuda: set[torch.device] = set()

    @contextlib.contextmanager
    def taking(self) -> Iterator[Taken]:
        """Copies made inside belong to one snapshot; on leaving, an event is recorded behind the device copies
        and buffers that this snapshot did not use are freed."""
        self._used, self._cuda = set(), set()
        taken = Taken()
        yield taken
        taken.events = [torch.cuda.Event() for _ in self._cuda]
        for event, device in zip(taken.events, self._cuda):
            event.record(torch.cuda.current_stream(device))
        self._buffers = {key: buffer for key, buffer in self._buffers.items() if key in self._used}

    def copy(self, value: Any, *path: Any) -> Any:
        """``value`` with every tensor copied into this snapshot's buffer for its place (``path`` + the keys and
        indices leading to it), nested dicts, lists and tuples rebuilt; as :func:`host_copy`, but reusing memory."""
        if isinstance(value, torch.Tensor):
            return self._copy_tensor(value.detach(), path)
        if isinstance(value, dict):
            return {k: self.copy(v, *path, k) for k, v in value.items()}
        if isinstance(value, list):
            return [self.copy(v, *path, i) for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return tuple(self.copy(v, *path, i) for i, v in enumerate(value))
        return value

    def _copy_tensor(self, tensor: torch.Tensor, path: tuple[Any, ...]) -> torch.Tensor:
        on_cuda = tensor.device.type == "cuda"
        buffer = self._buffers.get(path)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            # contiguous whatever the source's layout (channels_last): the file is written from it as it is
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=on_cuda)
            self._buffers[path] = buffer
        self._used.add(path)
        if on_cuda:
            self._cuda.add(tensor.device)
        buffer.copy_(tensor, non_blocking=on_cuda)
        return buffer


class Taken:
    """One snapshot's device copies: :meth:`wait` returns once they are in host memory."""

    def __init__(self) -> None:
        self.events: list[torch.cuda.Event] = []

    def wait(self) -> None:
        for event in self.events:
            event.synchronize()


class BackgroundWriter:
    """Writes checkpoints in a thread while training goes on, one write at a time.

    ``submit`` first waits for the previous write, so files land in submission order; ``wait`` blocks until the
    last one is on disk and re-raises its error, if any (a full disk is then an AcdcError in the training loop).
    Writes are atomic, so a process killed mid-write still leaves the previous files intact. Callers hand over
    snapshots (:func:`host_copy`), never live tensors.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, write: Callable[..., None], *args: Any) -> None:
        self.wait()

        def run() -> None:
            try:
                write(*args)
            except BaseException as exc:  # handed to the training thread by wait()
                self._error = exc

        self._thread = threading.Thread(target=run, name="acdc-checkpoint-writer")
        self._thread.start()

    @property
    def busy(self) -> bool:
        """Whether a write was submitted and not yet waited for (it may have finished meanwhile)."""
        return self._thread is not None

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
