"""Under an address-space limit (``ulimit -v``, common on clusters): more torch threads than the limit leaves room
for, and a 50 GB (sparse) safetensors file that cannot be mapped, are one line and exit 2 (libgomp used to abort
the process, safe_open to raise a MemoryError traceback)."""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")

LIMIT = 16 * 10**9  # bytes of address space: room for python, torch and acdc, not for 1024 thread stacks


def _limited(args: list, cwd: Path) -> subprocess.CompletedProcess:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))

    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACDC_", "_ACDC_"))}
    return subprocess.run([sys.executable, "-m", "acdc_cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, preexec_fn=limit, timeout=600)


def _sparse_safetensors(path: Path, gib: int = 50) -> Path:
    """A safetensors file of one ``gib`` GiB float32 tensor, all holes: no disk space is used."""
    elements = gib * 2**30 // 4
    header = {"__metadata__": {"format": "pt"},
              "w": {"dtype": "F32", "shape": [elements // 2**20, 2**20], "data_offsets": [0, elements * 4]}}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text)
        fh.truncate(8 + len(text) + elements * 4)
    return path


def _one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.slow  # a long end-to-end run: the slow pass, which CI runs
def test_more_threads_than_the_address_space_allows_are_refused_before_the_run_dir(tmp_path):
    out = tmp_path / "run"
    line = _one_line(_limited(["train", "--out", out, "--set", "runtime.threads=1024", "--set", "log.progress=false"],
                              tmp_path))
    assert line.startswith("error: runtime.threads=1024 needs about 16.0 GiB of address space for its threads and ")
    assert line.endswith(f"GiB are left under this process's limit (ulimit -v {LIMIT // 1024}); set fewer threads")
    assert not out.exists()


@pytest.mark.slow  # a long end-to-end run: the slow pass, which CI runs
def test_a_50_gb_file_that_cannot_be_mapped_is_one_line(tmp_path):
    big = _sparse_safetensors(tmp_path / "big.safetensors")
    expected = (f"error: {big} (50.0 GiB) cannot be mapped into memory: the process's address space is limited "
                "(ulimit -v) or exhausted")
    assert _one_line(_limited(["inspect", big], tmp_path)) == expected
    out = tmp_path / "run"
    line = _one_line(_limited(["train", "--out", out, "--set", f"model.weights={big}", "--set", "log.progress=false",
                               "--set", "log.tensorboard=false"], tmp_path))
    assert line == expected
