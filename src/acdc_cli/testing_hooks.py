"""Test-only fault hooks: a crash, a full disk or a signal at an exact point of a run, chosen by an environment
variable, so that tests never aim a kill at a wall-clock window.

Both variables start with ``_ACDC_`` rather than ``ACDC_``: every ``ACDC_*`` variable is read as a setting, and an
unknown one is refused. When a variable is unset the hooks cost one environment lookup per atomic file write and
nothing per training step.

``_ACDC_TEST_FAULT`` - at the N-th atomic file write of this process (checkpoint.py's write path)::

    ACTION@POINT:N[:NAME]   several separated by ";"

- ACTION ``kill``: SIGKILL this process there (nothing is cleaned up, as with ``kill -9`` or a power cut);
  ``fail``: raise ``OSError(ENOSPC, "No space left on device")`` there, as a full disk would.
- POINT ``write``: half of the file's bytes are in its temporary file (a torn temporary file);
  ``rename``: the temporary file is complete and fsynced, the rename over the target has not happened;
  ``renamed``: the rename has happened, the folder is not fsynced yet.
- N counts, from 1, the writes (all three points of one write count as that write) of files whose name matches
  NAME (a file name such as ``last.safetensors``, or a glob such as ``last.state.*.pt``: every resume state has a
  name of its own), or of every file when NAME is left out. Counting restarts when the variable's value changes or
  :func:`reset` is called.

  Examples: ``kill@rename:3`` kills before the third write of the process is renamed into place;
  ``fail@write:2:last.safetensors`` makes the second write of a ``last.safetensors`` fail with a full disk.
  In a training run, name the file: the checkpoint thread and the main thread (metrics.jsonl) write concurrently,
  so the order of writes to different files is not fixed.

``_ACDC_TEST_SIGNAL`` - deliver a signal to this process when the training loop asks whether to stop
(:meth:`acdc_cli.training.preemption.StopSignal.should_stop`) after an exact step::

    SIGNAL@epoch=E,step=S[,rank=R][,to=parent]   several separated by ";"

- SIGNAL: a name such as ``SIGTERM`` or ``SIGINT``.
- ``epoch=E``: the epoch as metrics.jsonl numbers it (from 0); ``step=S``: after S steps of that epoch (from 1),
  or ``step=end``: at the check after the epoch's validation and checkpoint (the loop makes none after the last
  epoch).
- ``rank=R``: only on global rank R (``RANK``; 0 outside torchrun); every rank when left out.
- ``to=parent``: signal the parent process instead (under ``acdc train --nproc`` that is the launcher, which
  passes the signal on to every rank, as a scheduler's SIGTERM would arrive), then wait until it has come back
  to this process (at most ``PARENT_WAIT_S``; an error after that), so the stop is as exact as a direct signal.

  Each entry fires once per run. Two entries at the same point fire in the order given, so
  ``SIGTERM@epoch=1,step=3;SIGINT@epoch=1,step=3`` is a second signal arriving while the first is handled.

The training loop passes its ``(epoch, step)`` to ``should_stop``, which hands them to :func:`deliver_planned`.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

FAULT_ENV = "_ACDC_TEST_FAULT"
SIGNAL_ENV = "_ACDC_TEST_SIGNAL"

_POINTS = ("write", "rename", "renamed")
_ACTIONS = ("kill", "fail")


class HookSyntaxError(ValueError):
    """A test hook variable that does not parse; tests should fail loudly, not run without their fault."""


@dataclass(frozen=True)
class Fault:
    action: str  # "kill" | "fail"
    point: str  # "write" | "rename" | "renamed"
    nth: int  # 1-based count of the writes that match ``name``
    name: str | None  # file name the count is restricted to; None counts every write


def parse_faults(text: str) -> list[Fault]:
    faults = []
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        try:
            action, rest = entry.split("@", 1)
            point, nth, *name = rest.split(":", 2)
            fault = Fault(action, point, int(nth), name[0] if name else None)
        except ValueError:
            raise HookSyntaxError(f"{FAULT_ENV}: cannot read {entry!r} (expected ACTION@POINT:N[:NAME])") from None
        if fault.action not in _ACTIONS or fault.point not in _POINTS or fault.nth < 1:
            raise HookSyntaxError(f"{FAULT_ENV}: {entry!r}: ACTION is one of {_ACTIONS}, POINT one of {_POINTS}, "
                                  "N counts from 1")
        faults.append(fault)
    return faults


class _WriteCounter:
    """Writes seen so far under the current value of the variable (writes run in the checkpoint thread too)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spec: str | None = None
        self.faults: list[Fault] = []
        self.counts: dict[str | None, int] = {}

    def reset(self) -> None:
        with self.lock:
            self.spec, self.faults, self.counts = None, [], {}


_writes = _WriteCounter()


def reset() -> None:
    """Forget the writes counted so far (tests that run several commands in one process call this)."""
    _writes.reset()


def faults_for_write(path: Path) -> list[Fault] | None:
    """Called when an atomic write of ``path`` starts: counts it and returns the faults planned for it (for
    :func:`fault_point`), or None when there are none, which is the case whenever the variable is unset."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    name = Path(path).name
    with _writes.lock:
        if spec != _writes.spec:
            _writes.spec, _writes.faults, _writes.counts = spec, parse_faults(spec), {}
        matching = {None} | {f.name for f in _writes.faults if f.name is not None and fnmatch.fnmatchcase(name, f.name)}
        for key in matching:
            _writes.counts[key] = _writes.counts.get(key, 0) + 1
        mine = [f for f in _writes.faults if f.name in matching and _writes.counts[f.name] == f.nth]
    return mine or None


def fault_point(faults: list[Fault] | None, point: str, path: Path) -> None:
    """Called at ``point`` of a write: kill the process or fail the write there if one of ``faults`` says so."""
    for fault in faults or ():
        if fault.point == point:
            if fault.action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


# ----------------------------------------------------------------------------------------------------------------
# signals at an exact step


@dataclass
class PlannedSignal:
    signum: int
    epoch: int
    step: int | None  # None: the epoch-end check
    rank: int | None
    to_parent: bool
    fired: bool = False


def parse_signals(text: str) -> list[PlannedSignal]:
    planned = []
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        try:
            name, rest = entry.split("@", 1)
            fields = dict(item.split("=", 1) for item in rest.split(","))
            signum = int(signal.Signals[name.strip()])
            step = None if fields.get("step") == "end" else int(fields["step"])
            rank = int(fields["rank"]) if "rank" in fields else None
            unknown = set(fields) - {"epoch", "step", "rank", "to"}
            if unknown or fields.get("to", "parent") != "parent" or (step is not None and step < 1):
                raise ValueError
            planned.append(PlannedSignal(signum, int(fields["epoch"]), step, rank, "to" in fields))
        except (ValueError, KeyError):
            raise HookSyntaxError(f"{SIGNAL_ENV}: cannot read {entry!r} (expected "
                                  "SIGNAL@epoch=E,step=S|end[,rank=R][,to=parent])") from None
    return planned


def planned_signals() -> list[PlannedSignal] | None:
    """The signals this run should deliver to itself, or None when the variable is unset (the usual case)."""
    spec = os.environ.get(SIGNAL_ENV)
    if not spec:
        return None
    rank = int(os.environ.get("RANK", "0"))
    return [p for p in parse_signals(spec) if p.rank is None or p.rank == rank]


PARENT_WAIT_S = 300.0


def deliver_planned(planned: list[PlannedSignal], epoch: int, step: int | None,
                    received: Callable[[], bool]) -> None:
    """Raise the signals planned for this check, the loop's ``(epoch, step)`` (called from ``should_stop``, in the
    main thread). The handler runs before this returns, so ``should_stop`` sees its flag at once; ``received`` says
    whether it has run."""
    for p in planned:
        if p.fired or p.epoch != epoch or p.step != step:
            continue
        p.fired = True
        if not p.to_parent:
            signal.raise_signal(p.signum)
            continue
        os.kill(os.getppid(), p.signum)
        deadline = time.monotonic() + PARENT_WAIT_S
        while not received():  # the handler runs in this thread, during the sleep
            if time.monotonic() > deadline:
                raise RuntimeError(f"{SIGNAL_ENV}: the parent did not pass {signal.Signals(p.signum).name} back "
                                   f"within {PARENT_WAIT_S:.0f} s")
            time.sleep(0.001)
