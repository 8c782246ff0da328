"""Shared fixtures. The quickstart run is made once per session and shared by every test that reads its files."""

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """In-process runs set torch's thread count (runtime.threads) and deterministic mode; put them back."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture
def one_thread():
    """One torch thread: on a machine shared with other test runs, spinning OpenMP threads of several processes
    slow each other down several-fold; small passes gain little from a second thread."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory) -> Path:
    """`acdc train --out DIR` exactly as the README's quickstart runs it; returns DIR."""
    from acdc_cli.cli import app

    run_dir = tmp_path_factory.mktemp("quickstart") / "run"
    result = CliRunner().invoke(app, ["train", "--out", str(run_dir)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return run_dir
