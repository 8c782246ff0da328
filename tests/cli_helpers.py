"""Helpers shared by the tests: running the CLI, short training schedules, one-line-error and same-run assertions,
and width-independent comparison of console text."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from acdc_cli.cli.app import app
from acdc_cli.files.jsonio import read_jsonl

# every in-process training run of the suite: on the CPU (also on a CUDA machine), deterministic, one thread, so
# exact comparisons mean the same everywhere and accuracy thresholds ride on a fixed computation
PINNED = ["--device", "cpu", "--set", "runtime.deterministic=true", "--set", "runtime.threads=1"]
QUIET = ["--set", "log.tensorboard=false", "--set", "log.progress=false"]


def sets(*items: str) -> list[str]:
    """``--set`` arguments: sets("a.b=1", "c.d=2") == ["--set", "a.b=1", "--set", "c.d=2"]."""
    return [arg for item in items for arg in ("--set", item)]


def short_schedule(epochs: int, warmup: int = 1, compressed: int = 1, decompressed: int = 1,
                   final_compressed: int = 1, final_decompressed: int = 0, *more: str) -> list[str]:
    """Arguments of a short AC/DC run, pinned (:data:`PINNED`) and quiet (:data:`QUIET`), plus ``more`` settings."""
    return [*PINNED, *QUIET, *sets(
        f"schedule.epochs={epochs}", f"schedule.warmup_epochs={warmup}", f"schedule.compressed_epochs={compressed}",
        f"schedule.decompressed_epochs={decompressed}", f"schedule.final_compressed_epochs={final_compressed}",
        f"schedule.final_decompressed_epochs={final_decompressed}", *more)]


# wide enough that no table cell folds, even around a 120-character --basetemp; console text is never hard-wrapped
# on a pipe (cli._console), and squash() makes comparisons independent of where a terminal would wrap
WIDE_COLUMNS = "400"


def invoke(*args, env: dict[str, str] | None = None):
    """``acdc ARGS`` in this process (arguments may be paths or numbers), its console WIDE_COLUMNS wide; returns
    Typer's result."""
    return CliRunner(env={"COLUMNS": WIDE_COLUMNS, **(env or {})}).invoke(app, [str(a) for a in args])


def invoke_json(*args, env: dict[str, str] | None = None) -> dict | list:
    """``acdc ARGS --json``: asserts exit 0 and returns the parsed stdout."""
    result = invoke(*args, "--json", env=env)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads(result.stdout)


def fails(args: list, code: int = 2, env: dict[str, str] | None = None) -> str:
    """Run the CLI; assert a one-line error, exit ``code`` and no traceback. Returns the line."""
    result = invoke(*args, env=env)
    assert result.exit_code == code, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def squash(text: str) -> str:
    """``text`` with every run of whitespace made one space: where a console would wrap no longer matters."""
    return " ".join(text.split())


def shows(fragment: str, text: str) -> bool:
    """Whether console ``text`` shows ``fragment``, whatever the line breaks and padding around or inside it."""
    return squash(fragment) in squash(text)


def _bits(path: Path) -> dict[str, tuple[torch.dtype, bytes]]:
    return {k: (v.dtype, v.numpy().tobytes()) for k, v in load_file(path).items()}


_TIMINGS = ("img_per_s", "checkpoint_wait_s")  # measured, so never the same twice
RUN_FILES = ("last.safetensors", "best_sparse.safetensors", "best_dense.safetensors")


def assert_same_run(expected: Path, actual: Path, files: tuple[str, ...] = RUN_FILES,
                    approx: frozenset[str] | set[str] = frozenset()) -> None:
    """Two run dirs hold the same run: checkpoint tensors equal bit for bit (so -0.0 != +0.0) and every metrics
    row equal except the timings (img_per_s, checkpoint_wait_s); the metrics named in ``approx`` to a relative 1e-6."""
    for name in files:
        a, b = _bits(expected / name), _bits(actual / name)
        assert a.keys() == b.keys(), name
        for key in a:
            assert a[key] == b[key], f"{name}:{key}"
    rows_a, rows_b = read_jsonl(expected / "metrics.jsonl"), read_jsonl(actual / "metrics.jsonl")
    assert [r["epoch"] for r in rows_b] == [r["epoch"] for r in rows_a]
    for a, b in zip(rows_a, rows_b):
        exact = lambda row: {k: v for k, v in row.items() if k not in _TIMINGS and k not in approx}  # noqa: E731
        assert exact(b) == exact(a), a["epoch"]
        for key in approx:
            assert b[key] == pytest.approx(a[key], rel=1e-6), (a["epoch"], key)


@contextlib.contextmanager
def torch_state_kept():
    """For runs made by session- or module-scoped fixtures: they set torch's thread count and deterministic mode,
    which the per-test restore in conftest does not see."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def trained(tmp_path_factory, name: str, *args, folder: str = "run") -> Path:
    """A finished ``acdc train ARGS`` run in a new folder (``<tmp>/<name>N/<folder>``), for module-scoped fixtures:
    made in this process (the same bits as ``python -m acdc_cli``), torch's process state kept; asserts exit 0."""
    run_dir = tmp_path_factory.mktemp(name) / folder
    with torch_state_kept():
        result = invoke("train", "--out", run_dir, *args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return run_dir


def _cpp_compiler() -> str | None:
    return next(filter(None, (shutil.which(name) for name in (os.environ.get("CXX", "g++"), "c++", "clang++"))), None)


# torch.compile's inductor backend on the CPU builds C++: tests of compiled runs need a compiler
needs_cpp_compiler = pytest.mark.skipif(_cpp_compiler() is None,
                                        reason="torch.compile (inductor) on the CPU needs a C++ compiler")
