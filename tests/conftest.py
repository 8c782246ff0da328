"""Shared fixtures. The quickstart run is made once per session and shared by every test that reads its files."""

from pathlib import Path

import pytest
from typer.testing import CliRunner


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory) -> Path:
    """`acdc train --out DIR` exactly as the README's quickstart runs it; returns DIR."""
    from acdc_cli.cli import app

    run_dir = tmp_path_factory.mktemp("quickstart") / "run"
    result = CliRunner().invoke(app, ["train", "--out", str(run_dir)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return run_dir
