"""acdc's CUDA checks and speed figures on one machine, in under 8 minutes.

    python bench/gpu_check.py                           # from anywhere; outputs under $OUT, else runs/gpu-check-<time>/
    python bench/gpu_check.py --deps build/gpu-deps     # with acdc's Python dependencies in a folder (see below)
    python bench/gpu_check.py --steps pipeline torchrun_smoke   # only these steps (and the preflight): a second
                                                        # call for what the first one's budget left SKIPPED
    python bench/gpu_check.py --rehearsal               # every step on the CPU at toy sizes (see below)

Needs a CUDA GPU and a python3 with torch and torchvision. acdc itself is not installed: it runs from src/ through
PYTHONPATH. It also needs typer, rich, pydantic, pydantic-settings and safetensors; where python3 lacks them, make the
folder with `bash bench/gpu_deps.sh 3.12` on a machine with pip (3.12: the GPU machine's Python), copy build/gpu-deps
along and pass --deps. Nothing is installed here. The GPU tests (`pytest -m gpu`) run with the machine's own pytest,
hypothesis and scikit-learn.

Outputs (at most 7 small files): gpu_check.log, checks.jsonl, mask_update.json, bench-<preset>.json (2) and the two
short runs' metrics as <run>-metrics.jsonl. The runs themselves (WRN-28-10 checkpoints are 146 MB each) live in a
temporary folder removed at exit.

--rehearsal runs every step on the CPU at toy sizes (WRN-16-4 / WRN-10-2, a few steps, no channels_last, no
torch.compile, ResNet-20 for ResNet-50, 2 gloo processes for torchrun, the GPU tests collected but not run, no
nvJPEG): it proves the script works before a GPU's minutes are spent on it (tests/commands/test_bench.py runs
it); its figures mean nothing, and its steps have no time limit but the overall budget.

Steps, each in a process of its own with its own time limit inside the budget, in order of what matters most should
the budget run out (the table at the end says what passed):
  1. preflight: GPU, python, torch, the modules acdc imports
  2. masks on CUDA: the global mask's time over WRN-28-10's weights, then `pytest -m gpu tests/gpu/test_gpu.py` (GPU
     mask = CPU mask with the exact count; pruned weights and gradients stay zero through bf16 autocast +
     channels_last + torch.compile steps of acdc's own training step, unstructured 95 % and 2:4)
  3. the fused post-backward step: `pytest -m gpu` of tests/engine/test_fused_step.py and
     tests/training/test_snapshots.py, then its time against the previous path at WRN-28-10 size
  4. a short WRN-28-10 AC/DC run (dense, compressed, decompressed, compressed) on a generated CIFAR-100 folder
  5. acdc bench for wrn-cifar100-95 and resnet50-imagenet-90, torch.compile on
  6. the ImageFolder pipeline per core on generated ImageNet-sized JPEGs (data.decode = cpu, pil, gpu), then
     `pytest -m gpu` of tests/data/test_imagefolder_pipeline.py and tests/commands/test_bench_inference.py
  7. a torchrun smoke run (one process per GPU, at most 2; SyncBatchNorm when there are 2)
  8. the summary table, with the speed targets
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 470  # every step gets at most what is left of it
REHEARSAL_BUDGET_S = 900


class Context:
    """What every step reads: where outputs and temporary files go, and whether this is the CPU rehearsal."""

    def __init__(self, out: Path, work: Path, rehearsal: bool):
        self.out, self.work, self.rehearsal = out, work, rehearsal
        self.checks = out / "checks.jsonl"

    def record(self, check: str, status: str, detail: str, **figures) -> None:
        with self.checks.open("a") as fh:
            fh.write(json.dumps({"check": check, "status": status, "detail": detail, **figures}) + "\n")

    def device(self):
        import torch

        return torch.device("cpu" if self.rehearsal else "cuda")


def _acdc(*args: str) -> list[str]:
    return [sys.executable, "-m", "acdc_cli", *args]


# ---------------------------------------------------------------------------------------------------------------
# 1. preflight


def preflight(ctx: Context) -> int:
    if shutil.which("nvidia-smi"):
        subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    problems = []
    if sys.version_info < (3, 11):
        problems.append(f"python {sys.version.split()[0]}: acdc needs 3.11 or newer (tomllib)")
    try:
        import torch
        import torchvision
    except ImportError as exc:
        sys.exit(f"preflight: {exc}; this script needs a python3 with torch and torchvision")
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"CUDA {torch.version.cuda}")
    if ctx.rehearsal:
        print("REHEARSAL on the CPU at toy sizes: the checks below test this script, not a GPU")
    elif not torch.cuda.is_available():
        problems.append("torch sees no CUDA device")
    else:
        print(f"GPUs: {[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}")
    needed = ["typer", "rich", "pydantic", "pydantic_settings", "safetensors", "numpy", "PIL"]
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        pip_names = {"pydantic_settings": "pydantic-settings", "PIL": "pillow"}
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        problems.append(
            "missing Python modules: " + ", ".join(pip_names.get(m, m) for m in missing) + ". Nothing is installed "
            f"here; on a machine with pip run\n    bash bench/gpu_deps.sh {version}\n"
            "  then copy build/gpu-deps here and run: python bench/gpu_check.py --deps build/gpu-deps")
    optional = [name for name in ("tensorboard", "sklearn") if importlib.util.find_spec(name) is None]
    if optional:
        print(f"not installed (not needed by the runs, which turn TensorBoard off and use no digits; the GPU tests' "
              f"quickstart needs both): {optional}")
    testing = [name for name in ("pytest", "hypothesis") if importlib.util.find_spec(name) is None]
    if testing:
        print(f"not installed, so the GPU test steps will fail: {testing}")
    if not problems:
        import acdc_cli
        import acdc_cli.cli.app  # everything the CLI imports at start

        print(f"acdc {acdc_cli.__version__} imports from {os.path.dirname(acdc_cli.__file__)}")
    ctx.record("preflight", "FAIL" if problems else "PASS", "; ".join(problems) or f"torch {torch.__version__}")
    if problems:
        sys.exit("preflight:\n  " + "\n  ".join(problems))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# the suite's GPU tests: pytest -m gpu (in the rehearsal, their collection only: without CUDA they would skip)


def gpu_tests(ctx: Context, name: str, *pytest_args: str) -> int:
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", *pytest_args]
    if ctx.rehearsal:
        done = subprocess.run([*base, "--collect-only"], cwd=ROOT, capture_output=True, text=True)
        print(done.stdout + done.stderr)
        collected = done.stdout.count("::")
        ok = done.returncode == 0 and collected > 0
        ctx.record(name, "PASS" if ok else "FAIL", f"rehearsal: {collected} GPU test(s) collected, not run (no CUDA)"
                   if ok else f"collection failed (exit {done.returncode}, {collected} collected)")
        return 0 if ok else 1
    done = subprocess.run([*base, "-rA"], cwd=ROOT, capture_output=True, text=True)
    print(done.stdout + done.stderr)
    passed = re.findall(r"^PASSED (\S+)", done.stdout, re.M)
    skipped = re.findall(r"^SKIPPED ", done.stdout, re.M)
    # on a GPU machine nothing here may skip: a skipped test is a check that did not run
    if done.returncode == 0 and passed and not skipped:
        ctx.record(name, "PASS", f"{len(passed)} GPU test(s) passed: {' '.join(passed)}")
        return 0
    ctx.record(name, "FAIL", f"pytest exit {done.returncode}, {len(passed)} passed, {len(skipped)} skipped "
                             "(see gpu_check.log)")
    return 1


# ---------------------------------------------------------------------------------------------------------------
# 2. masks on CUDA


def masks_on_cuda(ctx: Context) -> int:
    import torch

    from acdc_cli.models import create
    from acdc_cli.sparsity import masks as M
    from acdc_cli.sparsity.sparsifier import Sparsifier

    dev = ctx.device()
    sync = (lambda: None) if ctx.rehearsal else torch.cuda.synchronize
    torch.manual_seed(0)
    wrn = create("wrn-16-4" if ctx.rehearsal else "wrn-28-10", num_classes=100).to(dev)
    weights = dict(Sparsifier(wrn, ["*"], [], "global", "unstructured").params)
    n = sum(w.numel() for w in weights.values())
    times = []
    for _ in range(11):
        sync()
        t0 = time.perf_counter()
        M.compute_masks(weights, 0.95)
        sync()
        times.append(1000 * (time.perf_counter() - t0))
    ms = statistics.median(times[1:])
    ctx.record("global mask time (target <= 10 ms)", "PASS", f"{ms:.2f} ms median of 10 over {n:,} weights")
    (ctx.out / "mask_update.json").write_text(json.dumps({"weights": n, "median_ms": ms, "all_ms": times[1:]}))
    del wrn, weights
    return gpu_tests(ctx, "masks on CUDA (pytest -m gpu)", "tests/gpu/test_gpu.py", "-k", "not tensorrt")


# ---------------------------------------------------------------------------------------------------------------
# 3. the fused post-backward step


def fused_step(ctx: Context) -> int:
    tests_rc = gpu_tests(ctx, "fused step and pinned snapshots (pytest -m gpu)", "tests/engine/test_fused_step.py",
                         "tests/training/test_snapshots.py")
    from acdc_cli.commands.bench import post_backward_ms
    from acdc_cli.config import load_settings

    settings = load_settings(preset="wrn-cifar100-95", overrides=["model.name=wrn-10-2"] if ctx.rehearsal else [])
    measured = post_backward_ms(settings, ctx.device())
    kernel, acdc_ms, previous_ms = (measured["post_backward_kernel"], measured["post_backward_ms"],
                                    measured["post_backward_previous_ms"])
    ratio, share = measured["post_backward_ratio"], measured["post_backward_fused_share"]
    detail = (f"{settings.model.name}: gradient mask + {kernel} SGD {acdc_ms:.3f} ms, gradient mask + foreach SGD + "
              f"weight mask {previous_ms:.3f} ms: {ratio:.2f}x; single mask pass + foreach SGD "
              f"{measured['post_backward_single_pass_ms']:.3f} ms: fused=True itself "
              + ("-" if share is None else f"{100 * share:.0f} %") + " of the saving")
    print(f"post-backward step: {detail}")
    ctx.record("post-backward step ratio", "PASS" if kernel == "fused" else "FAIL", detail, ratio=ratio,
               acdc_ms=acdc_ms, previous_ms=previous_ms, single_pass_ms=measured["post_backward_single_pass_ms"],
               fused_share=share)
    return tests_rc or (0 if kernel == "fused" else 1)


# ---------------------------------------------------------------------------------------------------------------
# 4. a short WRN-28-10 AC/DC run on a generated CIFAR-100 folder


def make_cifar(ctx: Context) -> Path:
    import numpy as np

    folder = ctx.work / "cifar"
    root = folder / "cifar-100-python"
    if root.exists():
        return folder
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    sizes = (600, 100) if ctx.rehearsal else (10_000, 2_000)
    for name, count in zip(("train", "test"), sizes):
        batch = {b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                 b"fine_labels": rng.integers(0, 100, count).tolist()}
        with open(root / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)  # the layout (and protocol) of the original CIFAR-100 python files
    print(f"CIFAR-100-format folder with {sizes[0]:,} train / {sizes[1]:,} test random images at {root}")
    return folder


def short_acdc(ctx: Context) -> list[str]:
    """The settings of the short runs: dense, compressed, decompressed, compressed; one epoch each."""
    items = ["schedule.epochs=4", "schedule.warmup_epochs=1", "schedule.compressed_epochs=1",
             "schedule.decompressed_epochs=1", "schedule.final_compressed_epochs=1", "optim.milestones=[]",
             "optim.lr=0.02", f"data.val_size={100 if ctx.rehearsal else 1000}", "log.tensorboard=false",
             "log.progress=false"]
    extra = ["model.name=wrn-10-2", "data.batch_size=50", "runtime.device=cpu"] if ctx.rehearsal else []
    return [arg for item in [*items, *extra] for arg in ("--set", item)]


def check_run(ctx: Context, name: str, run_dir: Path, epochs: int, ranks: int, target: float) -> int:
    """Metrics and files of a finished run."""
    import torch
    from safetensors.torch import load_file

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tensors = load_file(run_dir / "last.safetensors")
    masks = {k[5:]: v.bool() for k, v in tensors.items() if k.startswith("mask.")}
    pruned = sum(int((~m).sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    zeros_ok = all(int(torch.count_nonzero(tensors[k][~m])) == 0 for k, m in masks.items())
    checks = [r["mask_checksums"] for r in rows if r.get("mask_checksums")]
    agree = bool(checks) and all(len(c) == ranks and len(set(c)) == 1 for c in checks)
    clean = not any(k.startswith(("_orig_mod.", "module.")) for k in tensors)
    ok = (len(rows) == epochs and rows[-1]["phase"] == "sparse" and pruned == round(target * total) and zeros_ok
          and agree and clean)
    rates = [r["img_per_s"] for r in rows[1:]] or [rows[0]["img_per_s"]]
    detail = (f"{len(rows)} epochs, phases {[r['phase'] for r in rows]}, {pruned:,}/{total:,} pruned, masked weights "
              f"zero: {zeros_ok}, masks agree on {ranks} rank(s): {agree}, plain names: {clean}, "
              f"epoch img/s {max(rates):,.0f}")
    print(f"{name}: {'PASS' if ok else 'FAIL'} ({detail})")
    shutil.copyfile(run_dir / "metrics.jsonl", ctx.out / f"{run_dir.name}-metrics.jsonl")
    ctx.record(name, "PASS" if ok else "FAIL", detail, img_per_s=max(rates))
    return 0 if ok else 1


def wrn_run(ctx: Context) -> int:
    data, run = make_cifar(ctx), ctx.work / "wrn-run"
    done = subprocess.run(_acdc("train", "--preset", "wrn-cifar100-95", "--data-dir", str(data), "--out", str(run),
                                "--force", *short_acdc(ctx), "--json"), stdout=subprocess.DEVNULL)
    if done.returncode:
        return done.returncode
    return check_run(ctx, "WRN-28-10 AC/DC run (generated CIFAR-100)", run, 4, 1, 0.95)


# ---------------------------------------------------------------------------------------------------------------
# 5. acdc bench


def bench(ctx: Context, preset: str) -> int:
    if ctx.rehearsal:
        extra = {"wrn-cifar100-95": ["--set", "model.name=wrn-10-2", "--batch-size", "16", "--steps", "3",
                                     "--warmup", "1", "--set", "runtime.compile=false", "--rounds", "2"],
                 "resnet50-imagenet-90": ["--set", "model.name=resnet20", "--batch-size", "4", "--steps", "2",
                                          "--warmup", "1", "--set", "runtime.compile=false", "--set",
                                          "data.num_workers=1", "--rounds", "2"]}[preset]
    else:
        # 5 alternating rounds of 3 step modes (reference, acdc, acdc at fp32 eager): fewer steps per round
        extra = {"wrn-cifar100-95": ["--steps", "20"], "resnet50-imagenet-90": ["--steps", "10"]}[preset]
    target = ctx.out / f"bench-{preset}.json"
    with target.open("w") as fh:
        done = subprocess.run(_acdc("bench", "--preset", preset, "--set", "runtime.compile=true", *extra, "--json"),
                              stdout=fh)
    if done.returncode:
        return done.returncode
    print(json.dumps(json.loads(target.read_text()), indent=1))
    ctx.record(f"acdc bench {preset}", "PASS", f"see bench-{preset}.json")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# 6. the ImageFolder pipeline: decode_jpeg, PIL and nvJPEG per core; the GPU tests of the pipeline and 2:4 inference


def pipeline(ctx: Context) -> int:
    from acdc_cli.commands import bench as acdc_bench
    from acdc_cli.config import load_settings

    dev = ctx.device()
    settings = load_settings(preset="resnet50-imagenet-90")
    batch, batches = (4, 2) if ctx.rehearsal else (128, 2)
    root = ctx.work / "jpegs"
    images = batch * batches + acdc_bench.IMAGEFOLDER_VAL_IMAGES
    acdc_bench.write_jpeg_tree(root, train_images=images, test_images=4)
    decoders = ["cpu", "pil"] if ctx.rehearsal else ["cpu", "pil", "gpu"]  # nvJPEG needs CUDA
    loaders = [acdc_bench._imagefolder_loader(settings, batch, dev, root, decode)[0] for decode in decoders]
    rates = dict(zip(decoders, acdc_bench.per_core_rates(loaders, dev)))
    ratio = rates["cpu"] / rates["pil"]
    detail = ", ".join(f"data.decode={d} {r:,.0f} img/s" for d, r in rates.items())
    detail += f"; decode_jpeg / PIL {ratio:.2f}x"
    print(f"ImageFolder pipeline per core ({batch * batches} JPEGs of 500x375): {detail}")
    ctx.record("ImageFolder pipeline per core", "PASS", detail, img_per_s=rates, ratio=ratio)
    rc = gpu_tests(ctx, "nvJPEG pipeline = CPU pipeline (pytest -m gpu)", "tests/data/test_imagefolder_pipeline.py")
    return gpu_tests(ctx, "2:4 inference kernel (pytest -m gpu)", "tests/commands/test_bench_inference.py") or rc


# ---------------------------------------------------------------------------------------------------------------
# 7. torchrun smoke run


def torchrun_smoke(ctx: Context) -> int:
    import torch

    gpus = torch.cuda.device_count()
    nproc = 2 if gpus >= 2 or ctx.rehearsal else 1
    extra = ["--set", "runtime.sync_batchnorm=true"] if nproc == 2 and not ctx.rehearsal else []
    if ctx.rehearsal:
        extra = ["--set", "runtime.threads=1"]  # two gloo processes on the CPU
    data, run = make_cifar(ctx), ctx.work / "torchrun-run"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m",
         "acdc_cli", "train", "--preset", "wrn-cifar100-95", "--set", "model.name=wrn-10-2", "--data-dir", str(data),
         "--out", str(run), "--force", *short_acdc(ctx), *extra, "--json"], stdout=subprocess.DEVNULL)
    if done.returncode:
        return done.returncode
    return check_run(ctx, f"torchrun smoke run ({nproc} process(es))", run, 4, nproc, 0.95)


# ---------------------------------------------------------------------------------------------------------------
# 8. the summary


def _load(out: Path, name: str) -> dict | None:
    try:
        return json.loads((out / f"bench-{name}.json").read_text())
    except (OSError, ValueError):  # missing, or empty after a failed bench
        return None


def summary(ctx: Context) -> int:
    out = ctx.out
    rows = [json.loads(line) for line in ctx.checks.read_text().splitlines() if line.strip()]
    wrn, r50 = _load(out, "wrn-cifar100-95"), _load(out, "resnet50-imagenet-90")
    targets = []
    if (out / "mask_update.json").exists():
        masks = json.loads((out / "mask_update.json").read_text())
        targets.append((f"global mask over WRN-28-10's {masks['weights']:,} weights", f"{masks['median_ms']:.2f} ms",
                        "<= 10 ms", masks["median_ms"] <= 10))
    if wrn:
        targets += [
            ("WRN-28-10 training epoch (data + step + masks + metrics)", f"{wrn['acdc_epoch_img_per_s']:,.0f} img/s",
             ">= 9,000 img/s", wrn["acdc_epoch_img_per_s"] >= 9000),
            ("WRN-28-10 acdc step / reference step (as the reference trains)", f"{wrn['ratio']:.2f}x "
             f"({wrn['acdc_img_per_s']:,.0f} vs {wrn['reference_img_per_s']:,.0f} img/s; step path "
             f"{wrn['ratio_step_path']:.2f}x, precision/layout/compile {wrn['ratio_precision_layout_compile']:.2f}x)",
             ">= 2.8x", wrn["ratio"] >= 2.8),
            ("WRN-28-10 mask update in training (masks + apply + mask change)", f"{wrn['mask_update_ms']:.2f} ms",
             "<= 10 ms", wrn["mask_update_ms"] <= 10),
        ]
    if r50:
        targets += [
            ("ResNet-50 acdc step (compiled)", f"{r50['acdc_img_per_s']:,.0f} img/s "
             f"(reference {r50['reference_img_per_s']:,.0f}, {r50['ratio']:.2f}x)", ">= 5,500 img/s",
             r50["acdc_img_per_s"] >= 5500),
            ("ResNet-50 ImageFolder pipeline", f"{r50['pipeline_img_per_s']:,.0f} img/s ({r50['pipeline']})",
             "reported", True),
        ]
    by_check = {r["check"]: r for r in rows}
    fused = by_check.get("post-backward step ratio")
    if fused and "ratio" in fused:
        targets.append(("post-backward step: fused / previous path, WRN-28-10 size", f"{fused['ratio']:.2f}x "
                        f"({fused['acdc_ms']:.3f} vs {fused['previous_ms']:.3f} ms)", "> 1x", fused["ratio"] > 1))
    images = by_check.get("ImageFolder pipeline per core")
    if images and "ratio" in images:
        targets.append(("ImageFolder decode_jpeg / PIL, per core", f"{images['ratio']:.2f}x", ">= 1.4x",
                        images["ratio"] >= 1.4))
    if wrn and wrn.get("epoch_recompiles") is not None:
        targets.append(("WRN-28-10 compiled epoch + validation: graphs built in them", str(wrn["epoch_recompiles"]),
                        "0 (static shapes)", wrn["epoch_recompiles"] == 0))
    width = max([len(r["check"]) for r in rows] + [len(t[0]) for t in targets] + [10])
    print()
    if ctx.rehearsal:
        print("REHEARSAL on the CPU at toy sizes: it tested this script; no figure below means anything")
    print(f"acdc gpu_check, {datetime.now():%Y-%m-%d %H:%M}, {(wrn or r50 or {}).get('device', 'CUDA device')}, "
          f"torch {(wrn or r50 or {}).get('torch', '?')}; outputs in {out}")
    print(f"{'check':<{width}}  status   detail")
    for r in rows:
        print(f"{r['check']:<{width}}  {r['status']:<7}  {r['detail']}")
    if targets:
        print()
        print(f"{'target':<{width}}  {'met':<7}  measured (goal)")
        for name, measured, goal, met in targets:
            print(f"{name:<{width}}  {'yes' if met else 'NO':<7}  {measured} (goal {goal})")
    return 1 if any(r["status"] != "PASS" for r in rows) else 0


# ---------------------------------------------------------------------------------------------------------------
# the driver: each step in a child process of this script, under its time limit

STEPS = [  # (name, function, arguments, time limit in seconds)
    ("preflight", "preflight", (), 60),
    ("masks on CUDA", "masks_on_cuda", (), 100),
    ("fused step", "fused_step", (), 60),
    ("WRN-28-10 AC/DC run", "wrn_run", (), 80),
    ("bench wrn-cifar100-95", "bench", ("wrn-cifar100-95",), 150),
    ("bench resnet50-imagenet-90", "bench", ("resnet50-imagenet-90",), 150),
    ("ImageFolder pipeline and GPU tests", "pipeline", (), 90),
    ("torchrun smoke run", "torchrun_smoke", (), 60),
]


def _checks_count(ctx: Context) -> int:
    return len(ctx.checks.read_text().splitlines()) if ctx.checks.exists() else 0


def run_step(ctx: Context, name: str, function: str, args: tuple[str, ...], limit: int, budget: int,
             started: float) -> int:
    left = int(budget - (time.monotonic() - started))
    if left < 20:
        print(f"== {name}: skipped, the {budget}s budget is spent", flush=True)
        ctx.record(name, "SKIPPED", "time budget spent")
        return 1
    # the CPU rehearsal proves the steps work, not how fast: on a slow or busy machine only the budget limits it
    limit = left if limit > left or ctx.rehearsal else limit
    print(f"== {name} (limit {limit}s)", flush=True)
    t0, before = time.monotonic(), _checks_count(ctx)
    command = [sys.executable, __file__, "--step", function, *args, "--out", str(ctx.out), "--work", str(ctx.work)]
    if ctx.rehearsal:
        command.append("--rehearsal")
    child = subprocess.Popen(command, start_new_session=True)
    try:
        rc = child.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, 15)
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, 9)
            child.wait()
        ctx.record(name, "TIMEOUT", f"stopped after {limit}s")
        rc = 124
    else:
        if rc and _checks_count(ctx) == before:
            ctx.record(name, "FAIL", f"exit code {rc} (see gpu_check.log)")
    print(f"== {name}: exit {rc} after {int(time.monotonic() - t0)}s", flush=True)
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rehearsal", action="store_true", help="every step on the CPU at toy sizes")
    parser.add_argument("--steps", nargs="+", default=None, help="only these steps (and the preflight)")
    parser.add_argument("--deps", type=Path, help="a folder of acdc's Python dependencies (bench/gpu_deps.sh)")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("step_args", nargs="*", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.step:  # a child: one step
        ctx = Context(options.out, options.work, options.rehearsal)
        return globals()[options.step](ctx, *options.step_args)
    return drive(options)


def drive(options: argparse.Namespace) -> int:
    out = Path(os.environ.get("OUT") or ROOT / "runs" / f"gpu-check-{datetime.now():%Y%m%d-%H%M%S}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    paths = [str(ROOT / "src"), *([str(options.deps.resolve())] if options.deps else []),
             *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)
    os.environ["PYTEST_ADDOPTS"] = "-p no:cacheprovider"  # no .pytest_cache left in the repository
    # the children log to the same file: the log holds every step's output, as printed
    tee = subprocess.Popen(["tee", str(out / "gpu_check.log")], stdin=subprocess.PIPE)
    saved = os.dup(1), os.dup(2)
    os.dup2(tee.stdin.fileno(), 1)
    os.dup2(tee.stdin.fileno(), 2)
    try:
        return _steps(options, out)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        tee.stdin.close()
        tee.wait()


def _steps(options: argparse.Namespace, out: Path) -> int:
    (out / "checks.jsonl").write_text("")
    with tempfile.TemporaryDirectory() as work:
        ctx = Context(out, Path(work), options.rehearsal)
        budget, started = (REHEARSAL_BUDGET_S if options.rehearsal else BUDGET_S), time.monotonic()
        for name, function, args, limit in STEPS:
            if options.steps and function != "preflight" and function not in options.steps:
                print(f"== {name}: not in --steps")
                continue
            rc = run_step(ctx, name, function, args, limit, budget, started)
            if function == "preflight" and rc:
                print("preflight failed: nothing else can run")
                print(ctx.checks.read_text())
                return 1
        return summary(ctx)


if __name__ == "__main__":
    sys.exit(main())
