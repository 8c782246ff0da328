"""Mutation pass over the code whose numbers users read or whose bits checkpoints hold.

Each mutant is one small, realistic one-line bug: a file, the exact original snippet, its replacement, and the
quick tests that should notice it. The script copies the worktree (but its git data and caches: tests read
presets/ and docs/) to a scratch folder once, applies one mutant at a time there (the worktree is never touched),
runs the mutant's tests with ``pytest -x -q`` under a timeout, and prints a table and the score (killed / run; a
timeout is reported apart, never counted as a kill).

    python tools/mutants.py --jobs 2        # every mutant, two at a time (about 8 minutes on two busy cores)
    python tools/mutants.py --list          # the mutants and the equivalent ones, without running anything
    python tools/mutants.py --only NAME     # one mutant (repeatable); --jobs 2 runs two at a time

A mutant whose original snippet is no longer in its file is reported as "stale", not as a failure: re-point it at
the code as it now reads. Mutants that no test can observe are listed in EQUIVALENT with the reason, and not run.
Standard library only.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = "src/acdc_cli/"


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to src/acdc_cli/
    original: str  # exact text, found exactly once in the file
    replacement: str
    tests: tuple[str, ...]  # pytest node ids or files, relative to the repository root


def m(name: str, file: str, original: str, replacement: str, *tests: str) -> Mutant:
    return Mutant(name, file, original, replacement, tests)


T_SCHED = "tests/sparsity/test_schedule.py"
T_MASKS = "tests/sparsity/test_masks.py"
T_FORMATS = "tests/sparsity/test_formats.py"
T_SPARSIFIER = "tests/sparsity/test_sparsifier.py"
T_FLOPS = "tests/config/test_flops.py"
T_EVAL = "tests/training/test_evaluation.py"
T_STEPS = "tests/training/test_epoch_steps.py"
T_EXPORT_RT = "tests/files/test_export.py::test_round_trip_is_exact_for_every_format_and_dtype"
T_EXPORT_24 = "tests/files/test_export.py::test_sparse_24_layout_read_back_with_numpy"
T_EXPORT_OFFSETS = "tests/files/test_export.py::test_sparse_bitmask_layout_has_row_offsets"
T_EXPORT_DIR = "tests/files/test_export_dir.py"

MUTANTS: list[Mutant] = [
    # --- sparsity/schedule.py: phases ---------------------------------------------------------------------------
    m("merge-keeps-empty-phases", "sparsity/schedule.py", "if p.end <= p.start:", "if p.end < p.start:", T_SCHED),
    m("merge-ignores-sparsity", "sparsity/schedule.py", "(out[-1].kind, out[-1].sparsity) == (p.kind, p.sparsity)",
      "out[-1].kind == p.kind", T_SCHED),
    m("cycle-ignores-final-dense", "sparsity/schedule.py",
      "cycle_end = epochs - final_decompressed - final_compressed", "cycle_end = epochs - final_compressed", T_SCHED),
    m("alternation-starts-dense", "sparsity/schedule.py", "epoch, sparse = warmup, True",
      "epoch, sparse = warmup, False", T_SCHED),
    m("alternation-not-cut", "sparsity/schedule.py", "end = min(epoch + length, cycle_end)",
      "end = epoch + length", T_SCHED),
    m("final-compressed-one-late", "sparsity/schedule.py",
      'Phase(epochs - final_compressed, epochs, "sparse", sparsity)',
      'Phase(epochs - final_compressed + 1, epochs, "sparse", sparsity)', T_SCHED),
    m("gmp-ramp-squared", "sparsity/schedule.py", "(1.0 - progress) ** 3", "(1.0 - progress) ** 2", T_SCHED),
    m("gmp-ramp-ease-in", "sparsity/schedule.py", "return target + (initial - target) * (1.0 - progress) ** 3",
      "return initial + (target - initial) * progress ** 3", T_SCHED),
    m("gmp-no-prune-at-end", "sparsity/schedule.py", "list(range(start, end, every)) + [end]",
      "list(range(start, end, every))", T_SCHED),
    m("gmp-sparsity-2-decimals", "sparsity/schedule.py", "initial, target), 6)", "initial, target), 2)", T_SCHED),
    m("phase-at-end-inclusive", "sparsity/schedule.py", "if p.start <= epoch < p.end:",
      "if p.start <= epoch <= p.end:", T_SCHED),
    m("restore-starts-reversed", "sparsity/schedule.py", "zip(phases, phases[1:])", "zip(phases[1:], phases)",
      T_SCHED),
    m("reset-restore-at-compression", "sparsity/schedule.py", "return set(decompressed_starts(phases))",
      "return set(compressed_starts(phases))", T_SCHED),
    m("reset-every-includes-epoch-0", "sparsity/schedule.py", "{p.start for p in phases if p.start > 0}",
      "{p.start for p in phases if p.start >= 0}", T_SCHED),
    # --- sparsity/schedule.py: learning rate --------------------------------------------------------------------
    m("lr-warmup-from-zero", "sparsity/schedule.py", "min((epoch + 1) / warmup, 1.0)", "min(epoch / warmup, 1.0)",
      T_SCHED),
    m("lr-floor-inverted", "sparsity/schedule.py", "if not o.lr_per_step:", "if o.lr_per_step:", T_SCHED),
    m("lr-step-milestone-late", "sparsity/schedule.py", "if epoch >= m)", "if epoch > m)", T_SCHED),
    m("lr-cosine-quarter-wave", "sparsity/schedule.py", "math.cos(math.pi * t)", "math.cos(math.pi * t / 2)",
      T_SCHED),
    m("lr-cosine-period-ignored", "sparsity/schedule.py", "period = o.cosine_epochs or settings.schedule.epochs",
      "period = settings.schedule.epochs", T_SCHED),
    m("lr-cosine-counts-warmup", "sparsity/schedule.py", "max(epoch - warmup, 0.0)", "max(epoch, 0.0)", T_SCHED),
    m("lr-cosine-drops-min-lr", "sparsity/schedule.py", "return o.min_lr + (o.lr - o.min_lr) * 0.5",
      "return (o.lr - o.min_lr) * 0.5", T_SCHED),
    # --- sparsity/masks.py --------------------------------------------------------------------------------------
    m("pruned-count-truncates", "sparsity/masks.py", "int(round(sparsity * numel))", "int(sparsity * numel)",
      T_MASKS),
    m("threshold-off-by-one", "sparsity/masks.py", "torch.sort(flat).values[k - 1]", "torch.sort(flat).values[k]",
      T_MASKS),
    m("ties-all-pruned", "sparsity/masks.py", "below = flat < threshold", "below = flat <= threshold", T_MASKS),
    m("ties-one-short", "sparsity/masks.py", "torch.cumsum(tied, 0) <= room", "torch.cumsum(tied, 0) < room",
      T_MASKS),
    m("nan-ranks-first", "sparsity/masks.py", 'nan=float("inf")', "nan=0.0", T_MASKS),
    m("uniform-is-global", "sparsity/masks.py", "return uniform_magnitude_masks(weights, sparsity)",
      "return global_magnitude_masks(weights, sparsity)", T_MASKS),
    m("nm-keeps-smallest", "sparsity/masks.py", "torch.sort(groups, dim=1, descending=True, stable=True)",
      "torch.sort(groups, dim=1, descending=False, stable=True)", T_MASKS),
    m("nm-groups-along-kernel", "sparsity/masks.py",
      "groups = to_groups_layout(weight.detach().abs().float()).reshape(-1, m)",
      "groups = weight.detach().abs().float().reshape(-1, m)", T_MASKS),
    m("nm-valid-strict", "sparsity/masks.py", "((groups != 0).sum(dim=1) <= n).all()",
      "((groups != 0).sum(dim=1) < n).all()", T_MASKS),
    m("groups-layout-inverse-swaps-kernel", "sparsity/masks.py", "permuted.permute(0, d - 1, *range(1, d - 1))",
      "permuted.permute(0, d - 1, *reversed(range(1, d - 1)))", T_MASKS),
    # --- sparsity/sparsifier.py ---------------------------------------------------------------------------------
    m("mask-change-counts-newly-pruned-only", "sparsity/sparsifier.py", "int((old[n] != new[n]).sum())",
      "int((old[n] & ~new[n]).sum())", T_SPARSIFIER),
    m("stats-counts-nonzeros", "sparsity/sparsifier.py", "counts = [p.numel() - n for", "counts = [0 * p.numel() + n for",
      T_SPARSIFIER),
    # --- sparsity/formats.py (export encodings) -----------------------------------------------------------------
    m("bitmask-packed-big-endian", "sparsity/formats.py", 'axis=-1, bitorder="little")\n    return torch',
      'axis=-1, bitorder="big")\n    return torch', T_FORMATS),
    m("row-offsets-are-ends", "sparsity/formats.py", "(torch.cumsum(counts, 0) - counts)",
      "torch.cumsum(counts, 0)", T_FORMATS, T_EXPORT_OFFSETS),
    m("directory-takes-rows", "commands/export.py", "if directory and stored_shape != list(weight.shape):",
      "if directory and stored_shape[:1] != list(weight.shape)[:1]:", T_EXPORT_DIR),
    m("bitmask-default-rows", "commands/export.py", "(formats.ROWS if fmt == formats.BITMASK_24 else formats.NATIVE)",
      "formats.ROWS", T_EXPORT_DIR),
    m("crop-pct-inverted", "files/export.py", 'prep["center_crop"] / prep["resize_shorter_side"]',
      'prep["resize_shorter_side"] / prep["center_crop"]', T_EXPORT_DIR),
    m("config-labels-one-short", "files/export.py", "[str(i) for i in range(num_classes)]",
      "[str(i) for i in range(num_classes - 1)]", T_EXPORT_DIR),
    m("rows-keep-native-order", "sparsity/formats.py", "return to_groups_layout(weight).reshape(",
      "return weight.reshape(", T_FORMATS),
    m("select-24-mask-outranks-values", "sparsity/formats.py", "priority = 2 * nonzero.to(torch.int8)",
      "priority = nonzero.to(torch.int8)", T_FORMATS),
    m("select-24-trusts-a-short-mask", "sparsity/formats.py", "bool((group_counts(mask, 4) == 2).all())",
      "bool((group_counts(mask, 4) <= 2).all())", T_FORMATS),
    m("24-shape-as-a-row", "sparsity/formats.py", "dtype=torch.int64).reshape(-1, 1)",
      "dtype=torch.int64).reshape(1, -1)", T_FORMATS, T_EXPORT_24),
    m("negative-zero-dropped", "sparsity/formats.py", "return t.view(_SAME_WIDTH_INT[t.element_size()]) != 0",
      "return t != 0", T_FORMATS),
    m("stored-bytes-counts-elements", "sparsity/formats.py", "t.numel() * t.element_size()", "t.numel()",
      T_FORMATS),
    # --- flops.py -----------------------------------------------------------------------------------------------
    m("flops-backward-once", "flops.py", "per_image = 3 * epoch_forward_flops", "per_image = 2 * epoch_forward_flops",
      T_FLOPS),
    m("flops-dense-baseline-follows-phase", "flops.py", "self.dense_flops + 3 * flops.dense * images",
      "self.dense_flops + 3 * epoch_forward_flops(phase, flops) * images", T_FLOPS),
    m("flops-linear-counts-features", "flops.py", "output.shape[1:-1]", "output.shape[1:]", T_FLOPS),
    m("flops-dense-epoch-at-sparse-cost", "flops.py", 'return flops.dense\n    if phase == "sparse":',
      'return flops.sparse\n    if phase == "sparse":', T_FLOPS),
    m("flops-negative-weights-skipped", "flops.py", "torch.count_nonzero(w.detach())",
      "torch.count_nonzero(w.detach() > 0)", T_FLOPS),
    m("flops-of-weights-ignores-zeros", "flops.py", "sparse += count * int(torch.count_nonzero(weight))",
      "sparse += count * weight.numel()", T_FLOPS),
    # --- training/evaluation.py ---------------------------------------------------------------------------------
    m("eval-top5-counted-as-top1", "training/evaluation.py", "top1 += hits[:, 0].sum()",
      "top1 += hits.any(dim=1).sum()", T_EVAL),
    m("eval-topk-over-the-batch", "training/evaluation.py", "k = min(5, logits.shape[1])",
      "k = min(5, logits.shape[0])", T_EVAL),
    m("eval-loss-mean-of-batch-means", "training/evaluation.py", 'reduction="sum").double()',
      'reduction="mean").double()', T_EVAL),
    m("eval-in-train-mode", "training/evaluation.py", "model.eval()\n    loss_sum", "loss_sum", T_EVAL),
    m("memorized-true-is-random", "training/evaluation.py",
      "hits_true += (predicted == true_labels.to(device, non_blocking=True)).sum()",
      "hits_true += (predicted == random_labels.to(device, non_blocking=True)).sum()", T_EVAL),
    # --- training/loop.py ---------------------------------------------------------------------------------------
    m("nan-at-step-0-unnoticed", "training/loop.py", "local if local >= 0 else _NO_BAD_STEP",
      "local if local > 0 else _NO_BAD_STEP", T_STEPS),
    m("lr-read-at-step-end", "training/loop.py",
      "lr = set_lr(optimizer, learning_rate(settings, epoch + step / steps))",
      "lr = set_lr(optimizer, learning_rate(settings, epoch + (step + 1) / steps))", T_STEPS),
    m("seed-ignores-step", "training/loop.py", "step_seed(settings.runtime.seed, epoch, step, self.rank)",
      "step_seed(settings.runtime.seed, epoch, 0, self.rank)", T_STEPS),
    m("train-loss-per-batch", "training/loop.py", "totals.loss_sum.add_(detached, alpha=labels.numel())",
      "totals.loss_sum.add_(detached)", T_STEPS),
    m("accumulation-sums-losses", "training/loop.py", "scaler.scale(loss / (group_end - group_start)).backward()",
      "scaler.scale(loss).backward()", "tests/training/test_recipe.py::test_accumulating_two_batches_of_b_is_one_step_of_2b"),
    m("skip-limit-one-late", "training/loop.py", "if totals.streak >= limit:", "if totals.streak > limit:", T_STEPS),
    # --- engine.py ----------------------------------------------------------------------------------------------
    m("engine-resets-at-every-phase", "engine.py", "reset=epoch == phase.start and epoch in self._resets",
      "reset=epoch == phase.start", "tests/engine/test_api.py::test_masks_exact_after_every_step_and_momentum_reset_per_policy"),
    # --- training/checkpoints.py --------------------------------------------------------------------------------
    m("best-sparse-at-any-sparsity", "training/checkpoints.py",
      'at_target = phase.kind == "sparse" and abs(phase.sparsity - self.settings.sparsity.target) < 1e-9',
      'at_target = phase.kind == "sparse"', "tests/training/test_train.py::test_gmp_run_follows_the_cubic_ramp"),
]

# mutants that no test can observe, with why (kept so that no one spends time trying to kill them)
EQUIVALENT: list[tuple[Mutant, str]] = [
    (m("nan-step-recorded-last", "training/loop.py", "self.finite_steps += torch.isfinite(totals.loss_sum)",
       "self.finite_steps += torch.isfinite(detached)"),
     "counting finite steps by the running sum or by the step's own loss differs only for a finite step after a "
     "non-finite one; under nan_policy stop the non-finite step's update makes the weights non-finite, so every "
     "later loss is non-finite too, and under skip the step is undone and counted by the skip path instead"),
    (m("gmp-held-from-after-end", "sparsity/schedule.py", "if end <= start or epoch >= end:",
       "if end <= start or epoch > end:"),
     "at epoch == end the ramp's formula gives target exactly ((1 - 1) ** 3 = 0), the same as the early return"),
    (m("restore-after-anything", "sparsity/schedule.py", 'if a.kind == "sparse" and b.kind == "dense"',
       'if b.kind == "dense"'),
     "after _merge two neighbouring dense phases cannot exist (both have sparsity 0.0 and are joined), so every "
     "dense phase but the first follows a compressed one"),
    (m("engine-reset-anywhere-in-phase", "engine.py", "reset=epoch == phase.start and epoch in self._resets",
       "reset=epoch in self._resets"),
     "momentum_resets only holds phase starts, so epoch in resets implies epoch == phase.start"),
    (m("nm-sort-unstable", "sparsity/masks.py", "torch.sort(groups, dim=1, descending=True, stable=True)",
       "torch.sort(groups, dim=1, descending=True, stable=False)"),
     "PyTorch's CPU and CUDA sorts are stable in practice for these sizes; a test cannot make them reorder ties"),
]


def apply(text: str, mutant: Mutant) -> str | None:
    """The mutated text, or None when the original snippet is not found exactly once (a stale mutant)."""
    if text.count(mutant.original) != 1:
        return None
    return text.replace(mutant.original, mutant.replacement)


def scratch_copy(destination: Path) -> None:
    shutil.copytree(ROOT, destination, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache", "runs", "*.egg-info"))


def first_failure(output: str) -> str:
    """The test that failed first (pytest -x stops there), from the short summary that -ra prints."""
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split()[1]
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def run_one(mutant: Mutant, scratch: Path, python: str, timeout: float) -> tuple[str, float, str]:
    """(status, seconds, the test that killed it or the last line of output): killed | alive | stale | timeout
    (killed) | error."""
    path = scratch / PKG / mutant.file
    original = path.read_text()
    mutated = apply(original, mutant)
    if mutated is None:
        return "stale", 0.0, f"snippet found {original.count(mutant.original)} times in {mutant.file}"
    env = dict(os.environ, PYTHONPATH=str(scratch / "src"), PYTHONDONTWRITEBYTECODE="1")
    command = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests]
    started = time.monotonic()
    path.write_text(mutated)
    try:
        done = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - started, f"over {timeout:.0f} s"
    finally:
        path.write_text(original)
    seconds = time.monotonic() - started
    last = first_failure(done.stdout + done.stderr)
    if done.returncode == 0:
        return "alive", seconds, last
    if done.returncode in (1, 2, 3):  # failed tests, an error while collecting (the mutant broke an import)
        return "killed", seconds, last
    return "error", seconds, last  # 4: usage, 5: no tests collected: the mutant's test ids are wrong


def baseline(scratch: Path, python: str, tests: list[str], timeout: float) -> None:
    env = dict(os.environ, PYTHONPATH=str(scratch / "src"), PYTHONDONTWRITEBYTECODE="1")
    try:
        done = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=scratch, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        sys.exit(f"the unmutated tests took over {timeout:.0f} s; give a larger --timeout")
    if done.returncode != 0:
        sys.exit(f"the unmutated tests fail; fix them first:\n{done.stdout[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="run this mutant (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutants and the equivalent ones; run nothing")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at a time (one scratch copy each)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant's tests")
    parser.add_argument("--python", default=sys.executable, help="the interpreter with acdc's dependencies")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the first run of the chosen tests unmutated (which must pass in the scratch copy)")
    args = parser.parse_args()

    names = [x.name for x in MUTANTS]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        sys.exit(f"mutant names must be unique: {sorted(duplicates)}")
    if args.list:
        for x in MUTANTS:
            stale = apply((ROOT / PKG / x.file).read_text(), x) is None
            print(f"{x.name:40} {x.file:28} {'STALE ' if stale else ''}{' '.join(x.tests)}")
        print(f"\n{len(MUTANTS)} mutants; equivalent, not run:")
        for x, why in EQUIVALENT:
            print(f"  {x.name:38} {x.file:28} {why}")
        return
    unknown = [n for n in args.only if n not in names]
    if unknown:
        sys.exit(f"no mutant named {unknown[0]!r} (see --list)")
    chosen = [x for x in MUTANTS if not args.only or x.name in args.only]

    with tempfile.TemporaryDirectory(prefix="acdc-mutants-") as tmp:
        scratches = []
        for i in range(max(1, min(args.jobs, len(chosen)))):
            scratches.append(Path(tmp) / f"copy{i}")
            scratch_copy(scratches[-1])
        if not args.no_baseline:
            baseline(scratches[0], args.python, sorted({t for x in chosen for t in x.tests}), args.timeout * 4)
        free = list(scratches)
        results: dict[str, tuple[str, float, str]] = {}

        def work(mutant: Mutant) -> None:
            scratch = free.pop()
            try:
                results[mutant.name] = run_one(mutant, scratch, args.python, args.timeout)
            finally:
                free.append(scratch)
            status, seconds, last = results[mutant.name]
            print(f"{status:8} {seconds:6.1f}s  {mutant.name:40} {last[:110]}", flush=True)

        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(len(scratches)) as pool:
            list(pool.map(work, chosen))

    print()
    print(f"{'mutant':40} {'file':28} {'status':8} killed by")
    for x in chosen:
        status, _, by = results[x.name]
        print(f"{x.name:40} {x.file:28} {status:8} {by if status == 'killed' else ''}")
    counted = [x for x in chosen if results[x.name][0] != "stale"]
    # a timeout is not a kill: on a slow machine a surviving mutant would time out too
    killed = [x for x in counted if results[x.name][0] == "killed"]
    timed_out = [x.name for x in counted if results[x.name][0] == "timeout"]
    stale = len(chosen) - len(counted)
    print(f"\nscore: {len(killed)} killed / {len(counted)} run ({len(timed_out)} timed out, {stale} stale, "
          f"{len(EQUIVALENT)} equivalent not run) in {time.monotonic() - started:.0f} s")
    if timed_out:
        print("timed out (rerun them with a larger --timeout): " + ", ".join(timed_out))
    alive = [x.name for x in counted if x not in killed and x.name not in timed_out]
    if alive:
        print("alive or error: " + ", ".join(alive))
    sys.exit(1 if alive or timed_out else 0)


if __name__ == "__main__":
    main()
