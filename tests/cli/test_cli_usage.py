"""What a new user meets at the command line beyond acdc's own errors: Click's usage errors, flags that do not go
together, a closed output pipe, a finished run resumed, a model that cannot take the data, --help text."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from cli_helpers import PINNED, QUIET, fails, invoke, sets

from acdc_cli.files.jsonio import read_jsonl

DENSE3 = [*PINNED, *QUIET, *sets("schedule.method=dense", "schedule.epochs=3")]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("usage") / "run"
    result = invoke("train", "--out", run_dir, *DENSE3)
    assert result.exit_code == 0, result.output
    return run_dir


def _acdc(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """The installed entry point's code path (``python -m acdc_cli`` calls the same ``main``)."""
    return subprocess.run([sys.executable, "-m", "acdc_cli", *args], capture_output=True, text=True, timeout=600,
                          **kwargs)


@pytest.mark.parametrize("args, message", [
    (["export", "x.safetensors", "--layout", "bitmask"], "error: No such option: --layout"),
    (["eval"], "error: Missing argument 'checkpoint'."),
    (["train", "--dry-run", "true"], "error: Got unexpected extra argument(s) (true)"),
    (["frobnicate"], "error: No such command 'frobnicate'."),
])
def test_usage_errors_are_one_line_with_exit_2(args, message):
    proc = _acdc(*args)
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith(message), proc.stderr
    assert "╭" not in proc.stderr and "Traceback" not in proc.stderr and proc.stdout == ""


def test_no_command_prints_the_help():
    proc = _acdc()
    assert "Usage: acdc" in proc.stdout and "train" in proc.stdout and proc.returncode == 2


def test_resume_refuses_out_and_force_and_changes_nothing(finished, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in finished.iterdir()}
    other = tmp_path / "other"
    for extra in (["--out", other], ["--force"]):
        line = fails(["train", "--resume", finished, *extra])
        assert line.startswith(f"error: --resume continues the run in {finished} in place; drop --out/--force"), line
    assert not other.exists()
    assert {p.name: p.stat().st_mtime_ns for p in finished.iterdir()} == before


def test_resuming_a_finished_run_says_there_is_nothing_to_train(finished, tmp_path):
    run_dir = Path(shutil.copytree(finished, tmp_path / "run"))
    rows = (run_dir / "metrics.jsonl").read_bytes()
    result = invoke("train", "--resume", run_dir)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"note: {run_dir} has trained all 3 epochs of its plan; nothing to train")
    assert (run_dir / "metrics.jsonl").read_bytes() == rows


@pytest.mark.slow  # a long end-to-end run: the slow pass, which CI runs
def test_a_closed_output_pipe_does_not_stop_training(tmp_path):
    """`acdc train | head` used to die with exit 1 and nothing on stderr at the first row after head quit: the
    run goes on, writes every file, and says once on stderr that its output is gone."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first row is written
    try:
        proc = subprocess.run([sys.executable, "-m", "acdc_cli", "train", "--out", str(tmp_path / "run"), *DENSE3],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=600)
    finally:
        os.close(write_end)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["warning: standard output was closed; the run goes on without printing "
                                        "(its rows are in RUN_DIR/metrics.jsonl)"]
    assert [row["epoch"] for row in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [0, 1, 2]
    assert (tmp_path / "run" / "last.safetensors").is_file()


def test_a_torchvision_model_on_one_channel_digits_is_refused_by_the_dry_run():
    line = fails(["train", "--dry-run", "--set", "model.name=torchvision:resnet18"])
    assert line == ("error: torchvision:resnet18 takes 3-channel images and data.name = 'digits' has 1; use cifar10, "
                    "cifar100, imagenet or synthetic (--set data.name=...)")
    assert invoke("train", "--dry-run", *sets("model.name=torchvision:resnet18", "data.name=synthetic")).exit_code == 0


def test_presets_show_names_every_key_even_unset_ones():
    result = invoke("presets", "show", "wrn-cifar100-95")
    assert result.exit_code == 0
    text = result.stdout
    for section, key in (("data", "dir"), ("data", "num_workers"), ("model", "weights"), ("runtime", "threads"),
                         ("optim", "cosine_epochs")):
        table = text[text.index(f"[{section}]"):]
        assert f"\n# {key} = (not set)\n" in table.split("\n[", 1)[0] + "\n", (section, key)
        assert key not in tomllib.loads(text)[section]  # a comment: TOML has no null


def test_eval_of_a_missing_file_says_so_before_anything_else(tmp_path):
    for name in ("model.onnx", "model.safetensors"):
        assert fails(["eval", tmp_path / name]) == f"error: no such file: {tmp_path / name}"


def test_help_paragraphs_are_reflowed_not_broken_at_the_docstring_lines():
    result = invoke("export", "--help", env={"COLUMNS": "1000"})  # wide enough for the paragraph on one line
    lines = [line for line in result.stdout.splitlines() if "follow compressed-tensors" in line]
    assert len(lines) == 1 and "which torchvision loads. Prints the mask statistics and the size against a dense " \
                               "export." in lines[0], result.stdout


def test_help_shows_flags_as_flags_and_repeatable_options_as_repeatable():
    prune_help = " ".join(invoke("prune", "--help", env={"COLUMNS": "200"}).stdout.split())
    train_help = " ".join(invoke("train", "--help", env={"COLUMNS": "200"}).stdout.split())
    report_help = " ".join(invoke("report", "--help", env={"COLUMNS": "200"}).stdout.split())
    assert "<bool>" not in prune_help + train_help
    assert "<list[" not in prune_help + train_help + report_help and "run_dirs... <Path> ..." in report_help
    assert "--force Overwrite OUT" in prune_help and "--dry-run Print the resolved" in train_help
    assert "--set -s KEY=VALUE ... Override one setting" in train_help
    assert "--include <str> ... Glob over module names" in prune_help


def test_shell_completion_offers_presets_export_formats_and_splits():
    from typer.testing import CliRunner

    from acdc_cli.cli import files
    from acdc_cli.cli.app import app
    from acdc_cli.cli.common import complete_preset
    from acdc_cli.config import preset_names
    from acdc_cli.files.export import FORMATS
    from acdc_cli.sparsity.formats import CONV_LAYOUTS

    assert complete_preset("") == preset_names() and "quickstart" in complete_preset("quick")
    assert all(name.startswith("wrn-cifar100") for name in complete_preset("wrn-cifar100"))
    assert set(files.EXPORT_FORMATS) == {*FORMATS, "onnx"}
    assert set(files.CONV_LAYOUTS) == set(CONV_LAYOUTS)
    # what bash completion prints for the words typed so far
    for words, offered in (("acdc export x --format sparse", ["sparse-24-bitmask", "sparse-bitmask"]),
                           ("acdc eval x --split ", ["val", "test"]),
                           ("acdc export x --conv-layout ", ["native", "rows"]),
                           ("acdc presets show quick", ["quickstart"])):
        env = {"_ACDC_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split(" ")) - 1)}
        result = CliRunner(env=env).invoke(app, [], prog_name="acdc")
        assert result.stdout.split() == offered, (words, result.stdout)
