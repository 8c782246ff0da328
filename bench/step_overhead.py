"""acdc's training step against a minimal hand-written PyTorch loop, on a tiny model where per-step host costs show,
for two versions of acdc in one run: the ratio of acdc's step time to the minimal loop's, before and after.

    python bench/step_overhead.py [--before REV] [--rounds 6] [--steps 200]

Each round starts one fresh process per version, alternating (before, after, before, ...), so machine load moves
both alike. Inside a process, on one CPU thread: the same tiny conv net (dropout 0.3, 80 % of its conv and linear
weights pruned by the AC/DC engine) trains ``--steps`` steps of 32 8x8 images through
``training.loop.train_epoch`` (acdc's step: per-step seeding, LR, autocast context, metric sums, the engine's
gradient-mask hook, fused SGD) and through a plain loop (zero_grad, forward, cross-entropy, backward, fused SGD;
no masks, no seeding, no metrics), the two alternating 5 times; the ratio is acdc's median step over the plain
loop's. ``--before`` is a git revision of this repository (default: the parent of the first commit that changed
the step, 5b614ae); its ``src/`` is extracted into a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(steps: int) -> dict[str, float]:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from acdc_cli.config import load_settings
    from acdc_cli.engine import ACDC
    from acdc_cli.training import loop

    torch.set_num_threads(1)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
            self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
            self.drop, self.fc = nn.Dropout(0.3), nn.Linear(32, 10)

        def forward(self, x):
            x = F.relu(self.bn1(self.conv1(x)))
            x = F.relu(self.bn2(self.conv2(x)))
            return self.fc(self.drop(x.mean((2, 3))))

    class Batches:
        def __init__(self, batches):
            self.batches = batches

        def __len__(self):
            return len(self.batches)

        def __iter__(self):
            return iter(self.batches)

        def iterate(self, start):
            return iter(self.batches[start:])

    g = torch.Generator().manual_seed(0)
    batches = Batches([(torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g))
                       for _ in range(steps)])
    settings = load_settings(overrides=["optim.lr=0.05", "optim.momentum=0.9", "schedule.method='acdc'",
                                        "schedule.epochs=4", "schedule.warmup_epochs=1", "schedule.compressed_epochs=1",
                                        "schedule.decompressed_epochs=1", "schedule.final_compressed_epochs=1",
                                        "sparsity.target=0.8",
                                        "log.progress=false"])
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = Tiny()
    optimizer = loop.build_optimizer(model, settings)
    engine = ACDC.from_settings(settings, model, optimizer)
    engine.start_epoch(1)  # compressed: the gradient mask runs every step
    torch.manual_seed(0)
    plain = Tiny()
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9, fused=True)

    def acdc_epoch():
        loop.train_epoch(model, batches, optimizer, settings, epoch=1, device=device)

    def plain_epoch():
        plain.train()
        for images, labels in batches:
            plain_optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(plain(images), labels).backward()
            plain_optimizer.step()

    times: dict[str, list[float]] = {"acdc": [], "plain": []}
    acdc_epoch(), plain_epoch()  # warm-up
    for _ in range(5):
        for name, fn in (("acdc", acdc_epoch), ("plain", plain_epoch)):
            started = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - started) / steps)
    acdc_s, plain_s = statistics.median(times["acdc"]), statistics.median(times["plain"])
    return {"acdc_step_ms": 1000 * acdc_s, "plain_step_ms": 1000 * plain_s, "ratio": acdc_s / plain_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="5b614ae")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.steps)))
        return
    with tempfile.TemporaryDirectory(prefix="acdc-step-bench-") as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before, "src", "presets"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        sources = {"before": Path(tmp) / "src", "after": ROOT / "src"}
        results: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
        for _ in range(args.rounds):
            for version, src in sources.items():
                env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
                done = subprocess.run([sys.executable, __file__, "--child", "--steps", str(args.steps)], env=env,
                                      capture_output=True, text=True, check=True)
                results[version].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"tiny conv net, {args.steps} steps of 32 8x8 images, 1 CPU thread, {args.rounds} alternating rounds; "
          f"before = {args.before}")
    print(f"{'version':8} {'acdc ms/step':>12} {'plain ms/step':>13} {'ratio min':>9} {'ratio median':>12}")
    for version, rows in results.items():
        ratios = [r["ratio"] for r in rows]
        print(f"{version:8} {statistics.median(r['acdc_step_ms'] for r in rows):12.3f} "
              f"{statistics.median(r['plain_step_ms'] for r in rows):13.3f} {min(ratios):9.3f} "
              f"{statistics.median(ratios):12.3f}")


if __name__ == "__main__":
    main()
