"""The CLI through Typer's runner: settings layers, dry runs, presets, one-line errors."""

import json
import math

import pytest
from typer.testing import CliRunner

from acdc_cli import __version__
from acdc_cli.cli import app


def invoke(*args, env=None):
    return CliRunner(env=env).invoke(app, list(args))


def test_env_then_set_precedence_in_dry_run():
    result = invoke("train", "--dry-run", "--json", env={"ACDC_OPTIM__LR": "0.0123"})
    assert result.exit_code == 0
    assert json.loads(result.stdout)["config"]["optim"]["lr"] == 0.0123
    result = invoke("train", "--dry-run", "--json", "--set", "optim.lr=0.02", env={"ACDC_OPTIM__LR": "0.0123"})
    assert json.loads(result.stdout)["config"]["optim"]["lr"] == 0.02


def test_unknown_key_is_one_line_error_without_traceback():
    result = invoke("train", "--dry-run", "--json", "--set", "optim.nope=1")
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope" in lines[0] and lines[0].startswith("error:")
    assert "Traceback" not in result.output


def test_debug_shows_the_traceback():
    result = invoke("--debug", "train", "--dry-run", "--set", "optim.nope=1")
    assert result.exit_code != 0 and result.exception is not None
    assert "nope" in str(result.exception)


def test_dry_run_json_shape():
    data = json.loads(invoke("train", "--dry-run", "--json").stdout)
    assert set(data) == {"config", "phases", "epochs"}
    assert data["config"]["preset"] == "quickstart"
    assert data["phases"][0] == {"start": 0, "end": 4, "kind": "dense", "sparsity": 0.0}
    assert data["phases"][-1] == {"start": 22, "end": 30, "kind": "sparse", "sparsity": 0.9}
    assert [e["epoch"] for e in data["epochs"]] == list(range(30))
    assert data["epochs"][7] == {"epoch": 7, "phase": "dense", "sparsity": 0.0, "lr": pytest.approx(0.05 * 0.5 * (
        1 + math.cos(math.pi * 7 / 30))), "reset_momentum": True}


def test_dry_run_table_and_flags():
    result = invoke("train", "--dry-run", "--seed", "5", "--device", "cpu")
    assert result.exit_code == 0
    assert "phase timeline" in result.stdout and "seed = 5" in result.stdout and 'device = "cpu"' in result.stdout


def test_unknown_preset_suggests_names():
    result = invoke("train", "--preset", "quikstart", "--dry-run")
    assert result.exit_code == 2 and "did you mean quickstart" in result.stderr


def test_presets_list_and_show():
    result = invoke("presets", "--json")
    assert result.exit_code == 0
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["quickstart"]["model"] == "digits-cnn" and rows["quickstart"]["sparsity"] == 0.9
    shown = json.loads(invoke("presets", "show", "quickstart", "--json").stdout)
    assert shown == json.loads(invoke("train", "--dry-run", "--json").stdout)
    assert "phase timeline" in invoke("presets", "show", "quickstart").stdout


def test_resume_of_a_non_run_folder(tmp_path):
    result = invoke("train", "--resume", str(tmp_path))
    assert result.exit_code == 2 and "not an acdc run dir" in result.stderr


def test_version_and_help():
    assert invoke("--version").stdout.strip() == f"acdc {__version__}"
    help_text = invoke("train", "--help").stdout
    for flag in ("--preset", "--set", "--resume", "--dry-run", "--json", "--out"):
        assert flag in help_text


def test_python_dash_m_entry_point():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "acdc_cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"acdc {__version__}"
