"""Stopping a run cleanly when the job is told to go (SIGTERM from a scheduler, SIGUSR1 from SLURM's
``--signal=USR1@SECONDS`` warning before the time limit, SIGINT from Ctrl-C).

The first signal only raises a flag: the loop finishes the step it is in, writes a checkpoint and returns, so
``acdc train --resume`` loses nothing. A second signal raises KeyboardInterrupt at once (the CLI exits 130); the same
signal repeated within a second counts as the first one (torchrun passes on the Ctrl-C the terminal also sent).

Under torchrun every rank must stop after the same step, or the ranks that go on would wait forever in the next
collective: the ranks compare their flags with an all_reduce over CPU tensors (the gloo control group beside nccl),
which lines up the ranks' host threads but never waits for their GPUs. It happens every ``SYNC_EVERY_STEPS`` steps
and at every epoch end.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType, TracebackType
from typing import Any

import torch
import torch.distributed as dist

from acdc_cli import testing_hooks
from acdc_cli.training.distributed import control_group

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


SYNC_EVERY_STEPS = 10


DUPLICATE_WINDOW_S = 1.0


def _group_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def reduce_int(value: int, op: str = "max") -> int:
    """``value`` combined over all ranks (``"max"`` or ``"min"``); without a process group, the value itself."""
    if not _group_active():
        return value
    group = control_group()
    on_gpu = group is None and dist.get_backend() == "nccl"  # an nccl group that acdc's setup did not make
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    tensor = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN, group=group)
    return int(tensor.item())


class StopSignal:
    """While entered, SIGTERM/SIGUSR1/SIGINT set a flag instead of killing the process; ``should_stop`` reads it.

    Handlers can only be installed from the main thread; elsewhere (a run started from a worker thread) the
    signals keep their usual behaviour.
    """

    def __init__(self, sync_every: int = SYNC_EVERY_STEPS):
        self.sync_every = sync_every
        self.received: int | None = None  # the first signal's number
        self._received_at = 0.0
        self._previous: dict[int, Any] = {}
        # signals a test asked for at exact steps (testing_hooks, _ACDC_TEST_SIGNAL); None in every real run
        self._planned = testing_hooks.planned_signals()

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            # None means a handler installed from C; the default is the closest we can put back
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # no printing here: the handler may run inside a write to the same stream, which Python refuses
        now = time.monotonic()
        if self.received is not None:
            # Ctrl-C under `acdc train --nproc` reaches each rank twice within milliseconds (from the terminal and
            # passed on by torchrun): the same signal again so soon is one request, not a second one
            if signum == self.received and now - self._received_at < DUPLICATE_WINDOW_S:
                return
            self._restore()
            raise KeyboardInterrupt
        self.received, self._received_at = signum, now

    @property
    def name(self) -> str | None:
        return signal.Signals(self.received).name if self.received is not None else None

    def should_stop(self, epoch: int, step: int | None = None) -> bool:
        """True on every rank once any rank got a signal.

        ``epoch`` is the epoch the loop is in (the one just finished at the epoch-end check); ``step`` the number of
        steps done in it. With a process group, ranks only compare flags when ``step`` is a multiple of
        ``sync_every``; ``None`` (epoch end) always compares. Every rank must make the same calls.
        """
        if self._planned is not None:
            testing_hooks.deliver_planned(self._planned, epoch, step, lambda: self.received is not None)
        if not _group_active():
            return self.received is not None
        if step is not None and step % self.sync_every:
            return False
        return reduce_int(int(self.received is not None)) > 0
