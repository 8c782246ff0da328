"""How long an epoch-end checkpoint blocks the training thread, when its files are on disk, and the longest time the
background write holds the interpreter lock (which stalls the training thread's Python in between: measured as
the longest gap between the wake-ups of a thread that sleeps 0.5 ms at a time while the files are written).

    python bench/checkpoint_overlap.py [--model wrn-28-10] [--dir PATH] [--repeats 3] [--epoch-s 5.6]

Saves a compressed-phase checkpoint of the model (last + best_sparse + resume state, with optimizer momentum) the
way the training loop does, through the background writer, into a temporary folder under --dir (default: the
current folder, so the disk measured is the one runs write to).

Then the loop's wait for the writer as a run sees it: ``--repeats`` epoch-end saves back to back, ``--epoch-s``
seconds of (simulated: sleeping) training between two, each save's ``checkpoint_wait_s`` (what metrics.jsonl
records) and its whole blocking time; with ``--epoch-s`` shorter than a write, the loop waits for the write in flight.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch

from acdc_cli.config import load_settings
from acdc_cli.data.bundle import selection_split
from acdc_cli.engine import ACDC
from acdc_cli.models import create
from acdc_cli.training import loop as train
from acdc_cli.training.checkpoints import RunDir
from acdc_cli.training.distributed import DistInfo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="wrn-28-10")
    parser.add_argument("--dir", type=Path, default=Path("."))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epoch-s", type=float, default=5.6, help="seconds an epoch trains between two saves")
    args = parser.parse_args()

    settings = load_settings(preset="wrn-cifar100-95", overrides=[f"model.name='{args.model}'"])
    model = create(args.model, num_classes=100)
    optimizer = train.build_optimizer(model, settings)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # momentum buffers exist, as in a real run
    engine = ACDC.from_settings(settings, model, optimizer)
    phase = engine.start_epoch(settings.schedule.epochs - 1)  # the final compressed phase: masks at the target
    top1 = f"{selection_split(settings)}_top1"  # the split the preset's best checkpoints are chosen on
    folder = Path(tempfile.mkdtemp(dir=args.dir, prefix="acdc-ckpt-bench-"))
    store = RunDir(folder, settings, {"num_classes": 100}, model, engine, optimizer,
                   torch.amp.GradScaler("cpu", enabled=False), DistInfo(0, 1, 0, torch.device("cpu")))
    try:
        for i in range(args.repeats):
            row = {"epoch": i, top1: float(i)}  # improving: best_sparse is written each time too
            started = time.perf_counter()
            store.save_epoch(phase, row)
            returned = time.perf_counter()
            with LockProbe() as probe:  # while the writer thread works and training would go on
                store.wait()
            done = time.perf_counter()
            size = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
            print(f"{args.model}: training thread blocked {returned - started:.3f} s; files ({size:.0f} MB) on disk "
                  f"{done - started:.3f} s after the save began; longest lock hold {1000 * probe.longest:.1f} ms")
        sizes = {f.name: round(f.stat().st_size / 1e6, 1) for f in sorted(folder.iterdir())}
        print(f"files (MB): {sizes}")
        for i in range(args.repeats):
            row = {"epoch": args.repeats + i, top1: float(args.repeats + i)}
            started = time.perf_counter()
            store.save_epoch(phase, row)
            blocked = time.perf_counter() - started
            print(f"back to back, {args.epoch_s:g} s epochs: save {i}: "
                  f"checkpoint_wait_s {row['checkpoint_wait_s']:.3f}, "
                  f"training thread blocked {blocked:.3f} s")
            time.sleep(args.epoch_s)
        store.wait()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class LockProbe:
    """A thread that sleeps 0.5 ms at a time; the longest gap between its wake-ups bounds how long any other thread
    held the interpreter lock in one piece (plus the scheduler's delay on a busy machine)."""

    def __enter__(self) -> LockProbe:
        self.longest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()
        return self

    def _run(self) -> None:
        last = time.perf_counter()
        while not self._stop.is_set():
            time.sleep(0.0005)
            now = time.perf_counter()
            self.longest = max(self.longest, now - last)
            last = now

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


if __name__ == "__main__":
    main()
