"""The CLI through Typer's runner: settings layers, dry runs, presets, one-line errors."""

import math

import pytest
from cli_helpers import fails, invoke, invoke_json, shows

from acdc_cli import __version__


def test_env_then_set_precedence_in_dry_run():
    env = {"ACDC_OPTIM__LR": "0.0123"}
    assert invoke_json("train", "--dry-run", env=env)["config"]["optim"]["lr"] == 0.0123
    assert invoke_json("train", "--dry-run", "--set", "optim.lr=0.02", env=env)["config"]["optim"]["lr"] == 0.02


def test_unknown_key_is_one_line_error_without_traceback():
    result = invoke("train", "--dry-run", "--json", "--set", "optim.nope=1")
    assert result.stdout == ""
    assert "nope" in fails(["train", "--dry-run", "--json", "--set", "optim.nope=1"])


def test_debug_shows_the_traceback():
    """--debug lets the error propagate with its traceback (the runner keeps it in exc_info) instead of one line."""
    import traceback

    from acdc_cli.errors import AcdcError

    result = invoke("--debug", "train", "--dry-run", "--set", "optim.nope=1")
    assert result.exit_code != 0 and isinstance(result.exception, AcdcError)
    assert "nope" in str(result.exception)
    frames = traceback.extract_tb(result.exc_info[2])
    assert any(frame.filename.endswith("config.py") for frame in frames)  # raised where the settings are read
    assert not result.stderr.startswith("error:")


def test_dry_run_json_shape():
    data = invoke_json("train", "--dry-run")
    assert set(data) == {"schema", "config", "phases", "epochs"} and data["schema"] == "acdc.resolved/1"
    assert data["config"]["preset"] == "quickstart"
    assert data["phases"][0] == {"start": 0, "end": 4, "kind": "dense", "sparsity": 0.0}
    assert data["phases"][-1] == {"start": 22, "end": 30, "kind": "sparse", "sparsity": 0.9}
    assert [e["epoch"] for e in data["epochs"]] == list(range(30))
    assert data["epochs"][7] == {"epoch": 7, "phase": "dense", "sparsity": 0.0, "lr": pytest.approx(0.05 * 0.5 * (
        1 + math.cos(math.pi * 7 / 30))), "reset_momentum": True}


def test_dry_run_table_and_flags():
    result = invoke("train", "--dry-run", "--seed", "5", "--device", "cpu")
    assert result.exit_code == 0
    for text in ("phase timeline", "seed = 5", 'device = "cpu"'):
        assert shows(text, result.stdout), text


def test_unknown_preset_suggests_names():
    assert "did you mean quickstart" in fails(["train", "--preset", "quikstart", "--dry-run"])


def test_presets_list_and_show():
    listed = invoke_json("presets")
    assert listed["schema"] == "acdc.presets/1"
    rows = {r["name"]: r for r in listed["presets"]}
    assert rows["quickstart"]["model"] == "digits-cnn" and rows["quickstart"]["sparsity"] == 0.9
    assert invoke_json("presets", "show", "quickstart") == invoke_json("train", "--dry-run")
    assert shows("phase timeline", invoke("presets", "show", "quickstart").stdout)


def test_resume_of_a_non_run_folder(tmp_path):
    assert "not an acdc run dir" in fails(["train", "--resume", tmp_path])


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
