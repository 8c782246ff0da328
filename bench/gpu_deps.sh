#!/usr/bin/env bash
# bench/gpu_deps.sh: put acdc's Python dependencies (besides torch, torchvision, numpy and pillow, which a CUDA
# machine's python already has) in build/gpu-deps, for a GPU machine that cannot reach a package index.
#
#   bash bench/gpu_deps.sh [PYTHON_VERSION]      # on a machine with pip; PYTHON_VERSION of the GPU machine (3.12)
#   python bench/gpu_check.py --deps build/gpu-deps      # then on the GPU machine, with build/gpu-deps copied
#
# The versions are the ones installed in the python that runs this script (acdc's tested set) where it has them;
# the folder holds platform wheels for x86-64 Linux, unpacked, so PYTHONPATH can point at it. build/ is git-ignored.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VERSION="${1:-3.12}"
TARGET="$ROOT/build/gpu-deps"
PYTHON="${PYTHON:-python3}"
[[ -x "$ROOT/.venv/bin/python" ]] && PYTHON="$ROOT/.venv/bin/python"

# pinned to what this environment runs; unpinned where it lacks a package
mapfile -t SPECS < <("$PYTHON" - <<'PY'
from importlib import metadata

for name in ("typer", "rich", "pydantic", "pydantic-settings", "safetensors"):
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(name)
PY
)
rm -rf "$TARGET"
"$PYTHON" -m pip install --quiet --target "$TARGET" --python-version "$VERSION" --implementation cp \
    --only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 "${SPECS[@]}"
echo "build/gpu-deps for Python $VERSION: ${SPECS[*]} (and what they need), $(du -sh "$TARGET" | cut -f1)"
