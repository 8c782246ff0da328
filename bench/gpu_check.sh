#!/usr/bin/env bash
# bench/gpu_check.sh: acdc's CUDA correctness checks and speed figures on one machine, in under 8 minutes.
#
#   bash bench/gpu_check.sh                      # from anywhere; outputs under $OUT, else runs/gpu-check-<time>/
#   ACDC_GPU_DEPS=build/gpu-deps bash bench/gpu_check.sh   # with acdc's Python dependencies in a folder (see below)
#   ACDC_GPU_CHECK_STEPS="pipeline torchrun_smoke" bash bench/gpu_check.sh   # only these steps (and the preflight):
#                                                  # a second call for what the first one's budget left SKIPPED
#
# Needs a CUDA GPU and a python3 with torch and torchvision. acdc itself is not installed: it runs from src/ through
# PYTHONPATH. It also needs typer, rich, pydantic, pydantic-settings and safetensors; where python3 lacks them, make
# the folder with `bash bench/gpu_deps.sh 3.12` on a machine with pip (3.12: the GPU machine's Python), copy
# build/gpu-deps along and point ACDC_GPU_DEPS at it. Nothing is installed here.
#
# Outputs (at most 7 small files, so that a harness that copies a few files back gets them all): gpu_check.log,
# checks.jsonl, mask_update.json, bench-<preset>.json (2) and the two short runs' metrics as <run>-metrics.jsonl.
# The runs themselves (WRN-28-10 checkpoints are 146 MB each) live in a temporary folder removed at exit. The GPU
# tests run with the GPU machine's own pytest, hypothesis and scikit-learn (its image has them).
#
# ACDC_GPU_CHECK_REHEARSAL=1 runs every step on the CPU at toy sizes (WRN-16-4 / WRN-10-2, a few steps, no
# channels_last, no torch.compile, ResNet-20 for ResNet-50, 2 gloo processes for torchrun, the GPU tests collected
# but not run, no nvJPEG): it proves the script itself works before a GPU's minutes are spent on it
# (tests/test_bench.py runs it); its figures mean nothing, and its steps have no time limit but the overall budget.
#
# Steps (each with its own time limit, all inside an 8-minute budget, in order of what matters most should the
# budget run out; the table at the end says what passed):
#   1. preflight: GPU, python, torch, the modules acdc imports
#   2. masks on CUDA: the global mask over WRN-28-10's weights equals the CPU's, has the exact count, and its time;
#      pruned weights and their gradients stay exactly zero through bf16 autocast + channels_last + torch.compile
#      steps of acdc's own training step (unstructured 95 % and 2:4)
#   3. the fused post-backward step: `pytest -m gpu` of tests/test_fused_step.py (exact zeros and the previous
#      path's weights on CUDA; fp16 gets foreach) and tests/test_snapshots.py (pinned, non-blocking checkpoint
#      snapshots), then its time against the previous path at WRN-28-10 size (issue #14 measured 3.45x)
#   4. a short WRN-28-10 AC/DC run (dense, compressed, decompressed, compressed) on a generated CIFAR-100 folder
#   5. acdc bench for wrn-cifar100-95 and resnet50-imagenet-90, torch.compile on
#   6. the ImageFolder pipeline per core on generated ImageNet-sized JPEGs, data.decode = cpu (decode_jpeg), pil and
#      gpu (nvJPEG), interleaved; then `pytest -m gpu tests/test_imagefolder_pipeline.py` (nvJPEG batches against
#      the CPU path's) and `pytest -m gpu tests/test_bench_inference.py` (a 2:4 Linear on the semi-structured kernel)
#   7. a torchrun smoke run (one process per GPU, at most 2; SyncBatchNorm when there are 2)
#   8. the summary table, with the issues' targets
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT_DIR="${OUT:-$ROOT/runs/gpu-check-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT_DIR"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$ROOT/src${ACDC_GPU_DEPS:+:$(cd "$ACDC_GPU_DEPS" && pwd)}${PYTHONPATH:+:$PYTHONPATH}"
CHECKS="$OUT_DIR/checks.jsonl"
export OUT_DIR WORK CHECKS
: > "$CHECKS"
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1

BUDGET=470  # seconds for everything; each step gets at most what is left
export REHEARSAL="${ACDC_GPU_CHECK_REHEARSAL:-0}"
ONLY="${ACDC_GPU_CHECK_STEPS:-}"  # step functions to run (preflight always runs); empty: all
export PYTEST_ADDOPTS="-p no:cacheprovider"  # no .pytest_cache left in the repository
# acdc reads ACDC_* variables as settings and refuses unknown ones: this script's own must not reach it
unset ACDC_GPU_DEPS ACDC_GPU_CHECK_REHEARSAL ACDC_GPU_CHECK_STEPS
if [[ $REHEARSAL == 1 ]]; then  # sizes of the CPU rehearsal; the GPU sizes are the defaults in the steps below
    BUDGET=900
    RUN_ARGS=(--set model.name=wrn-10-2 --set data.batch_size=50 --set runtime.device=cpu)
    WRN_BENCH=(--set model.name=wrn-10-2 --batch-size 16 --steps 3 --warmup 1 --set runtime.compile=false)
    R50_BENCH=(--set model.name=resnet20 --batch-size 4 --steps 2 --warmup 1 --set runtime.compile=false
        --set data.num_workers=1)
else
    RUN_ARGS=()
    WRN_BENCH=()
    R50_BENCH=(--steps 30)
fi
STARTED=$SECONDS

record() {  # record NAME STATUS DETAIL
    python3 -c 'import json, sys; print(json.dumps(dict(zip(("check", "status", "detail"), sys.argv[1:]))))' \
        "$1" "$2" "$3" >> "$CHECKS"
}

step() {  # step NAME MAX_SECONDS FUNCTION ARGS...: run with a time limit; record FAIL/TIMEOUT if it recorded nothing
    local name=$1 max=$2
    shift 2
    if [[ -n $ONLY && $1 != preflight && " $ONLY " != *" $1 "* ]]; then
        echo "== $name: not in ACDC_GPU_CHECK_STEPS"
        return 0
    fi
    local left=$((BUDGET - (SECONDS - STARTED)))
    if ((left < 20)); then
        echo "== $name: skipped, the ${BUDGET}s budget is spent"
        record "$name" SKIPPED "time budget spent"
        return 1
    fi
    # the CPU rehearsal proves the steps work, not how fast: on a slow or busy machine only the budget limits it
    ((max > left || REHEARSAL == 1)) && max=$left
    echo "== $name (limit ${max}s)"
    local t0=$SECONDS rc=0 before
    before=$(wc -l < "$CHECKS")
    # the functions below are exported, so `timeout` can run them in a child bash
    timeout --signal=TERM --kill-after=10 "$max" bash -c '"$@"' "$name" "$@" || rc=$?
    if ((rc == 124 || rc == 137)); then
        record "$name" TIMEOUT "stopped after ${max}s"
    elif ((rc != 0)) && (($(wc -l < "$CHECKS") == before)); then
        record "$name" FAIL "exit code $rc (see gpu_check.log)"
    fi
    echo "== $name: exit $rc after $((SECONDS - t0))s"
    return $rc
}

# ------------------------------------------------------------------------------------------------------------------
# 1. preflight

preflight() {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    python3 - <<'PY'
import importlib, json, os, sys

problems = []
if sys.version_info < (3, 11):
    problems.append(f"python {sys.version.split()[0]}: acdc needs 3.11 or newer (tomllib)")
try:
    import torch, torchvision
except ImportError as exc:
    sys.exit(f"preflight: {exc}; this script needs a python3 with torch and torchvision")
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"CUDA {torch.version.cuda}")
if os.environ["REHEARSAL"] == "1":
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
        "  then copy build/gpu-deps here and run: ACDC_GPU_DEPS=build/gpu-deps bash bench/gpu_check.sh")
optional = [name for name in ("tensorboard", "sklearn") if importlib.util.find_spec(name) is None]
if optional:
    print(f"not installed (not needed by the runs, which turn TensorBoard off and use no digits; the GPU tests' "
          f"quickstart needs both): {optional}")
testing = [name for name in ("pytest", "hypothesis") if importlib.util.find_spec(name) is None]
if testing:
    print(f"not installed, so the GPU test steps will fail (the GPU machine's image has them): {testing}")
if not problems:
    import acdc_cli.cli  # noqa: F401  (everything the CLI imports at start)
    print(f"acdc {__import__('acdc_cli').__version__} imports from {os.path.dirname(acdc_cli.__file__)}")
with open(os.path.join(os.environ["OUT_DIR"], "checks.jsonl"), "a") as fh:
    fh.write(json.dumps({"check": "preflight", "status": "FAIL" if problems else "PASS",
                         "detail": "; ".join(problems) or f"torch {torch.__version__}"}) + "\n")
if problems:
    sys.exit("preflight:\n  " + "\n  ".join(problems))
PY
}

# ------------------------------------------------------------------------------------------------------------------
# 2. masks on CUDA

masks_on_cuda() {
    python3 - <<'PY'
import json, os, statistics, time

import torch

from acdc_cli import runtime
from acdc_cli.bench import RepeatedBatch
from acdc_cli.config import load_settings
from acdc_cli.distributed import DistInfo
from acdc_cli.models import create
from acdc_cli.engine import ACDC
from acdc_cli.sparsity import masks as M
from acdc_cli.sparsity.sparsifier import Sparsifier
from acdc_cli.train import build_optimizer, train_epoch

rehearsal = os.environ["REHEARSAL"] == "1"
dev = torch.device("cpu" if rehearsal else "cuda")
sync = (lambda: None) if rehearsal else torch.cuda.synchronize
out = []

def record(check, ok, detail):
    out.append({"check": check, "status": "PASS" if ok else "FAIL", "detail": detail})
    print(f"{check}: {'PASS' if ok else 'FAIL'} ({detail})", flush=True)

# the global threshold over WRN-28-10's weights: same mask as on the CPU, exact count, and its time
torch.manual_seed(0)
wrn = create("wrn-16-4" if rehearsal else "wrn-28-10", num_classes=100).to(dev)
weights = dict(Sparsifier(wrn, ["*"], [], "global", "unstructured").params)
n = sum(w.numel() for w in weights.values())
on_gpu = M.compute_masks(weights, 0.95)
on_cpu = M.compute_masks({k: v.detach().cpu() for k, v in weights.items()}, 0.95)
same = all(torch.equal(on_gpu[k].cpu(), on_cpu[k]) for k in on_gpu)
pruned = sum(int((~m).sum()) for m in on_gpu.values())
times = []
for _ in range(11):
    sync()
    t0 = time.perf_counter()
    M.compute_masks(weights, 0.95)
    sync()
    times.append(1000 * (time.perf_counter() - t0))
ms = statistics.median(times[1:])
record("global mask = CPU mask, exact count", same and pruned == round(0.95 * n),
       f"{n:,} weights, {pruned:,} pruned (want {round(0.95 * n):,}), GPU == CPU: {same}")
record("global mask time (target <= 10 ms)", True, f"{ms:.2f} ms median of 10 over {n:,} weights")
with open(os.path.join(os.environ["OUT_DIR"], "mask_update.json"), "w") as fh:
    json.dump({"weights": n, "median_ms": ms, "all_ms": times[1:]}, fh)
del wrn, weights, on_gpu

# acdc's own step (train_epoch, prepare_model) under bf16 autocast + channels_last + torch.compile
for structure, sparsity in (("unstructured", 0.95), ("2:4", 0.5)):
    settings = load_settings(preset="wrn-cifar100-95", overrides=[
        "model.name=wrn-10-2", f"runtime.compile={str(not rehearsal).lower()}", "runtime.amp=true",
        "runtime.channels_last=true",
        f"sparsity.structure='{structure}'", f"sparsity.target={sparsity}"])
    torch.manual_seed(0)
    model = create("wrn-10-2", num_classes=100).to(dev)
    net = runtime.prepare_model(model, settings, DistInfo(0, 1, 0, dev))
    optimizer = build_optimizer(model, settings)
    sparsifier = ACDC.from_settings(settings, model, optimizer).sparsifier  # its step hooks apply these masks
    batch, steps = (16, 3) if rehearsal else (128, 20)
    x = torch.randn(batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 100, (batch,), device=dev)
    train_epoch(net, RepeatedBatch(x, y, 3), optimizer, settings, 0, dev, None)  # dense, compiles
    sparsifier.compress(sparsity)
    masks = {k: v.clone() for k, v in sparsifier.masks.items()}
    stats = train_epoch(net, RepeatedBatch(x, y, steps), optimizer, settings, 0, dev, None)
    params = dict(model.named_parameters())
    weights_zero = all(int(torch.count_nonzero(params[k].detach()[~m])) == 0 for k, m in masks.items())
    grads_zero = all(int(torch.count_nonzero(params[k].grad[~m])) == 0 for k, m in masks.items())
    kept_moving = sum(int(torch.count_nonzero(params[k].detach()[m])) for k, m in masks.items())
    total = sum(m.numel() for m in masks.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    nm_ok = all(M.nm_valid(params[k].detach(), 2, 4) for k in masks) if structure == "2:4" else True
    channels_last = rehearsal or all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)
    names_clean = not any(k.startswith(("_orig_mod.", "module.")) for k in model.state_dict())
    exact = structure != "unstructured" or pruned == round(sparsity * total)
    record(f"masks exact under bf16 + channels_last + compile ({structure})",
           weights_zero and grads_zero and nm_ok and exact and channels_last and names_clean and kept_moving > 0,
           f"pruned weights zero: {weights_zero}, their grads zero: {grads_zero}, N:M valid: {nm_ok}, "
           f"{pruned:,}/{total:,} pruned, channels_last: {channels_last}, plain state-dict names: {names_clean}, "
           f"loss {stats['train_loss']:.3f}")
with open(os.path.join(os.environ["OUT_DIR"], "checks.jsonl"), "a") as fh:
    for row in out:
        fh.write(json.dumps(row) + "\n")
raise SystemExit(0 if all(r["status"] == "PASS" for r in out) else 1)
PY
}

# ------------------------------------------------------------------------------------------------------------------
# GPU tests of the suite: pytest -m gpu (in the rehearsal, their collection only: without CUDA they would skip)

gpu_tests() {  # gpu_tests NAME TEST_FILES...
    local name=$1 out="$WORK/pytest-$RANDOM.txt" rc=0
    shift
    if ((REHEARSAL == 1)); then
        python3 -m pytest -q --collect-only -m gpu "$@" > "$out" 2>&1 || rc=$?
        local collected
        collected=$(grep -c '::' "$out")
        cat "$out"
        if ((rc == 0 && collected > 0)); then
            record "$name" PASS "rehearsal: $collected GPU test(s) collected, not run (no CUDA)"
        else
            record "$name" FAIL "collection failed (exit $rc, $collected collected)"
        fi
        return $rc
    fi
    python3 -m pytest -q -rA -m gpu "$@" > "$out" 2>&1 || rc=$?
    cat "$out"
    local passed skipped
    passed=$(grep -c '^PASSED ' "$out")
    skipped=$(grep -c '^SKIPPED ' "$out")
    # on a GPU machine nothing here may skip: a skipped test is a check that did not run
    if ((rc == 0 && passed > 0 && skipped == 0)); then
        record "$name" PASS "$passed GPU test(s) passed: $(grep '^PASSED ' "$out" | sed 's/^PASSED //' | tr '\n' ' ')"
    else
        record "$name" FAIL "pytest exit $rc, $passed passed, $skipped skipped (see gpu_check.log)"
        return 1
    fi
}

# ------------------------------------------------------------------------------------------------------------------
# 3. the fused post-backward step

fused_step() {
    gpu_tests "fused step and pinned snapshots (pytest -m gpu)" tests/test_fused_step.py tests/test_snapshots.py
    local tests_rc=$?
    python3 - <<'PY' || return 1
import json, os

import torch

from acdc_cli.bench import post_backward_ms
from acdc_cli.config import load_settings

rehearsal = os.environ["REHEARSAL"] == "1"
settings = load_settings(preset="wrn-cifar100-95", overrides=["model.name=wrn-10-2"] if rehearsal else [])
dev = torch.device("cpu" if rehearsal else "cuda")
acdc_ms, previous_ms, kernel = post_backward_ms(settings, dev)
ratio = previous_ms / acdc_ms
detail = (f"{settings.model.name}: gradient mask + {kernel} SGD {acdc_ms:.3f} ms, gradient mask + foreach SGD + "
          f"weight mask {previous_ms:.3f} ms: {ratio:.2f}x")
print(f"post-backward step: {detail}")
with open(os.environ["CHECKS"], "a") as fh:
    fh.write(json.dumps({"check": "post-backward step ratio", "status": "PASS" if kernel == "fused" else "FAIL",
                         "detail": detail, "ratio": ratio, "acdc_ms": acdc_ms, "previous_ms": previous_ms}) + "\n")
raise SystemExit(0 if kernel == "fused" else 1)
PY
    return $tests_rc
}

# ------------------------------------------------------------------------------------------------------------------
# 4. a short WRN-28-10 AC/DC run on a generated CIFAR-100 folder

make_cifar() {
    python3 - <<'PY'
import os, pickle

import numpy as np

root = os.path.join(os.environ["WORK"], "cifar", "cifar-100-python")
os.makedirs(root, exist_ok=True)
rng = np.random.default_rng(0)
sizes = (600, 100) if os.environ["REHEARSAL"] == "1" else (10_000, 2_000)
for name, count in zip(("train", "test"), sizes):
    batch = {b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
             b"fine_labels": rng.integers(0, 100, count).tolist()}
    with open(os.path.join(root, name), "wb") as fh:
        pickle.dump(batch, fh, protocol=2)  # the layout (and protocol) of the original CIFAR-100 python files
print(f"CIFAR-100-format folder with {sizes[0]:,} train / {sizes[1]:,} test random images at {root}")
PY
}

short_acdc() {  # the settings of the short runs: dense, compressed, decompressed, compressed; one epoch each
    echo --set schedule.epochs=4 --set schedule.warmup_epochs=1 --set schedule.compressed_epochs=1 \
        --set schedule.decompressed_epochs=1 --set schedule.final_compressed_epochs=1 --set "optim.milestones=[]" \
        --set optim.lr=0.02 --set data.val_size="$((REHEARSAL == 1 ? 100 : 1000))" --set log.tensorboard=false --set log.progress=false
}

check_run() {  # check_run NAME RUN_DIR EPOCHS RANKS TARGET: metrics and files of a finished run
    python3 - "$@" <<'PY'
import json, os, sys

import torch
from safetensors.torch import load_file

name, run_dir, epochs, ranks, target = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
tensors = load_file(os.path.join(run_dir, "last.safetensors"))
masks = {k[5:]: v.bool() for k, v in tensors.items() if k.startswith("mask.")}
pruned = sum(int((~m).sum()) for m in masks.values())
total = sum(m.numel() for m in masks.values())
zeros_ok = all(int(torch.count_nonzero(tensors[k][~m])) == 0 for k, m in masks.items())
checks = [c for r in rows for c in ([r["mask_checksums"]] if r.get("mask_checksums") else [])]
agree = bool(checks) and all(len(c) == ranks and len(set(c)) == 1 for c in checks)
clean = not any(k.startswith(("_orig_mod.", "module.")) for k in tensors)
ok = (len(rows) == epochs and rows[-1]["phase"] == "sparse" and pruned == round(target * total) and zeros_ok
      and agree and clean)
rates = [r["img_per_s"] for r in rows[1:]] or [rows[0]["img_per_s"]]
detail = (f"{len(rows)} epochs, phases {[r['phase'] for r in rows]}, {pruned:,}/{total:,} pruned, masked weights zero: "
          f"{zeros_ok}, masks agree on {ranks} rank(s): {agree}, plain names: {clean}, "
          f"epoch img/s {max(rates):,.0f}")
print(f"{name}: {'PASS' if ok else 'FAIL'} ({detail})")
copy_name = os.path.basename(run_dir.rstrip("/")) + "-metrics.jsonl"
with open(os.path.join(run_dir, "metrics.jsonl")) as src, open(os.path.join(os.environ["OUT_DIR"], copy_name), "w") as dst:
    dst.write(src.read())
with open(os.path.join(os.environ["OUT_DIR"], "checks.jsonl"), "a") as fh:
    fh.write(json.dumps({"check": name, "status": "PASS" if ok else "FAIL", "detail": detail,
                         "img_per_s": max(rates)}) + "\n")
raise SystemExit(0 if ok else 1)
PY
}

wrn_run() {
    make_cifar || return 1
    python3 -m acdc_cli train --preset wrn-cifar100-95 --data-dir "$WORK/cifar" --out "$WORK/wrn-run" --force \
        $(short_acdc) "$@" --json > "$WORK/wrn-run.json" || return 1
    check_run "WRN-28-10 AC/DC run (generated CIFAR-100)" "$WORK/wrn-run" 4 1 0.95
}

# ------------------------------------------------------------------------------------------------------------------
# 7. torchrun smoke run

torchrun_smoke() {
    local gpus nproc extra=()
    gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
    nproc=$((gpus >= 2 ? 2 : 1))
    ((nproc == 2)) && extra=(--set runtime.sync_batchnorm=true)
    ((REHEARSAL == 1)) && nproc=2 && extra=(--set runtime.threads=1)  # two gloo processes on the CPU
    [[ -d "$WORK/cifar" ]] || make_cifar || return 1
    python3 -m torch.distributed.run --standalone --nproc-per-node "$nproc" -m acdc_cli train \
        --preset wrn-cifar100-95 --set model.name=wrn-10-2 --data-dir "$WORK/cifar" --out "$WORK/torchrun-run" \
        --force $(short_acdc) "${extra[@]}" "$@" --json > "$WORK/torchrun-run.json" || return 1
    check_run "torchrun smoke run ($nproc process(es))" "$WORK/torchrun-run" 4 "$nproc" 0.95
}

# ------------------------------------------------------------------------------------------------------------------
# 5. acdc bench

bench() {  # bench PRESET EXTRA...
    local preset=$1
    shift
    python3 -m acdc_cli bench --preset "$preset" --set runtime.compile=true "$@" --json \
        > "$OUT_DIR/bench-$preset.json" || return 1
    python3 -c 'import json, sys; print(json.dumps(json.load(open(sys.argv[1])), indent=1))' "$OUT_DIR/bench-$preset.json"
    record "acdc bench $preset" PASS "see bench-$preset.json"
}

# ------------------------------------------------------------------------------------------------------------------
# 6. the ImageFolder pipeline: decode_jpeg, PIL and nvJPEG per core; the GPU tests of the pipeline and of 2:4 inference

pipeline() {
    python3 - <<'PY' || return 1
import json, os
from pathlib import Path

import torch

from acdc_cli import bench
from acdc_cli.config import load_settings

rehearsal = os.environ["REHEARSAL"] == "1"
dev = torch.device("cpu" if rehearsal else "cuda")
settings = load_settings(preset="resnet50-imagenet-90")
batch, batches = (4, 2) if rehearsal else (128, 2)
root = Path(os.environ["WORK"]) / "jpegs"
bench.write_jpeg_tree(root, train_images=batch * batches + bench.IMAGEFOLDER_VAL_IMAGES, test_images=4)
decoders = ["cpu", "pil"] if rehearsal else ["cpu", "pil", "gpu"]  # nvJPEG needs CUDA
loaders = [bench._imagefolder_loader(settings, batch, dev, root, decode)[0] for decode in decoders]
rates = dict(zip(decoders, bench.per_core_rates(loaders, dev)))
ratio = rates["cpu"] / rates["pil"]
detail = ", ".join(f"data.decode={d} {r:,.0f} img/s" for d, r in rates.items()) + f"; decode_jpeg / PIL {ratio:.2f}x"
print(f"ImageFolder pipeline per core ({batch * batches} JPEGs of 500x375): {detail}")
with open(os.environ["CHECKS"], "a") as fh:
    fh.write(json.dumps({"check": "ImageFolder pipeline per core", "status": "PASS", "detail": detail,
                         "img_per_s": rates, "ratio": ratio}) + "\n")
PY
    local rc=0
    gpu_tests "nvJPEG pipeline = CPU pipeline (pytest -m gpu)" tests/test_imagefolder_pipeline.py || rc=1
    gpu_tests "2:4 inference kernel (pytest -m gpu)" tests/test_bench_inference.py || rc=1
    return $rc
}

# ------------------------------------------------------------------------------------------------------------------

export -f record gpu_tests preflight masks_on_cuda fused_step make_cifar short_acdc check_run wrn_run torchrun_smoke \
    bench pipeline
step preflight 60 preflight || { echo "preflight failed: nothing else can run"; cat "$CHECKS"; exit 1; }
step "masks on CUDA" 100 masks_on_cuda
step "fused step" 60 fused_step
step "WRN-28-10 AC/DC run" 80 wrn_run "${RUN_ARGS[@]}"
step "bench wrn-cifar100-95" 150 bench wrn-cifar100-95 "${WRN_BENCH[@]}"
step "bench resnet50-imagenet-90" 150 bench resnet50-imagenet-90 "${R50_BENCH[@]}"
step "ImageFolder pipeline and GPU tests" 90 pipeline
step "torchrun smoke run" 60 torchrun_smoke "${RUN_ARGS[@]}"

# 8. the summary, last
python3 - <<'PY'
import json, os
from datetime import datetime

out = os.environ["OUT_DIR"]
rows = [json.loads(line) for line in open(os.path.join(out, "checks.jsonl")) if line.strip()]

def load(name):
    path = os.path.join(out, f"bench-{name}.json")
    try:
        return json.load(open(path))
    except (OSError, ValueError):  # missing, or empty after a failed bench
        return None

wrn, r50 = load("wrn-cifar100-95"), load("resnet50-imagenet-90")
targets = []
mask_path = os.path.join(out, "mask_update.json")
if os.path.exists(mask_path):
    masks = json.load(open(mask_path))
    targets.append((f"global mask over WRN-28-10's {masks['weights']:,} weights", f"{masks['median_ms']:.2f} ms",
                    "<= 10 ms", masks["median_ms"] <= 10))
if wrn:
    targets += [
        ("WRN-28-10 training epoch (data + step + masks + metrics)", f"{wrn['acdc_epoch_img_per_s']:,.0f} img/s",
         ">= 9,000 img/s", wrn["acdc_epoch_img_per_s"] >= 9000),
        ("WRN-28-10 acdc step / reference-style step", f"{wrn['ratio']:.2f}x "
         f"({wrn['acdc_img_per_s']:,.0f} vs {wrn['reference_img_per_s']:,.0f} img/s)", ">= 2.8x", wrn["ratio"] >= 2.8),
        ("WRN-28-10 mask update in training (masks + apply + mask change)", f"{wrn['mask_update_ms']:.2f} ms",
         "<= 10 ms", wrn["mask_update_ms"] <= 10),
    ]
if r50:
    targets += [
        ("ResNet-50 acdc step (compiled)", f"{r50['acdc_img_per_s']:,.0f} img/s "
         f"(reference-style {r50['reference_img_per_s']:,.0f}, {r50['ratio']:.2f}x)", ">= 5,500 img/s",
         r50["acdc_img_per_s"] >= 5500),
        ("ResNet-50 ImageFolder pipeline", f"{r50['pipeline_img_per_s']:,.0f} img/s ({r50['pipeline']})", "reported",
         True),
    ]
by_check = {r["check"]: r for r in rows}
fused = by_check.get("post-backward step ratio")
if fused and "ratio" in fused:
    targets.append(("post-backward step: fused / previous path, WRN-28-10 size", f"{fused['ratio']:.2f}x "
                    f"({fused['acdc_ms']:.3f} vs {fused['previous_ms']:.3f} ms)", "> 1x (issue #14: 3.45x)",
                    fused["ratio"] > 1))
images = by_check.get("ImageFolder pipeline per core")
if images and "ratio" in images:
    targets.append(("ImageFolder decode_jpeg / PIL, per core", f"{images['ratio']:.2f}x", ">= 1.4x",
                    images["ratio"] >= 1.4))
if wrn and wrn.get("epoch_recompiles") is not None:
    targets.append(("WRN-28-10 compiled epoch + validation: graphs built in them", str(wrn["epoch_recompiles"]),
                    "0 (static shapes)", wrn["epoch_recompiles"] == 0))
width = max([len(r["check"]) for r in rows] + [len(t[0]) for t in targets] + [10])
print()
if os.environ["REHEARSAL"] == "1":
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
failed = [r for r in rows if r["status"] != "PASS"]
raise SystemExit(1 if failed else 0)
PY
