"""Rank variables count only inside a torchrun launch. A stray RANK=1 in the shell used to make
`acdc train` train, write nothing, print nothing and exit 0 (and turn every error into a silent exit 2); RANK=abc
was a traceback."""

import os
import subprocess
import sys

import pytest
from cli_helpers import fails

from acdc_cli.errors import AcdcError
from acdc_cli.training.distributed import launch_env

ONE_EPOCH = ["--set", "schedule.method=dense", "--set", "schedule.epochs=1", "--set", "log.tensorboard=false",
             "--set", "log.progress=false"]
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def acdc(args: list[str], env: dict[str, str], cwd) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    return subprocess.run([sys.executable, "-m", "acdc_cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**clean, **env}, timeout=600)


def warning_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning: ignoring")]


@pytest.mark.parametrize("value", ["1", pytest.param("abc", marks=pytest.mark.slow)])
def test_a_stray_rank_is_ignored_with_one_warning_and_the_run_is_written(tmp_path, value):
    proc = acdc(["train", "--out", str(tmp_path / "r"), *ONE_EPOCH], {"RANK": value}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert warning_lines(proc.stderr) == [
        f"warning: ignoring RANK={value}: no torchrun launch (that needs WORLD_SIZE > 1 and MASTER_ADDR or "
        "TORCHELASTIC_* variables); running as one process, rank 0"]
    assert (tmp_path / "r" / "last.safetensors").is_file() and "acdc run finished" in proc.stdout


def test_errors_under_a_stray_rank_are_printed(tmp_path):
    proc = acdc(["train", "--set", "optim.nope=1"], {"RANK": "3", "WORLD_SIZE": "1"}, tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(warning_lines(proc.stderr)) == 1 and len(lines) == 2 and lines[1].startswith("error: unknown setting")


def test_a_launch_is_trusted(launch):
    launch(WORLD_SIZE="4", MASTER_ADDR="127.0.0.1", RANK="3", LOCAL_RANK="1")
    assert launch_env() == (3, 4, 1)


def test_an_elastic_launch_without_master_addr_is_trusted(launch):
    launch(WORLD_SIZE="2", TORCHELASTIC_RUN_ID="abc", RANK="1", LOCAL_RANK="1")
    assert launch_env() == (1, 2, 1)


@pytest.mark.parametrize("env", [
    {"RANK": "1"},
    {"RANK": "1", "WORLD_SIZE": "2"},  # no rendezvous variables: not a launch
    {"RANK": "1", "MASTER_ADDR": "127.0.0.1"},  # WORLD_SIZE 1: alone
    {"RANK": "abc", "WORLD_SIZE": "abc", "MASTER_ADDR": "127.0.0.1"},
    {"LOCAL_RANK": "5"},
])
def test_outside_a_launch_the_process_is_rank_0_alone(launch, env):
    launch(**env)
    assert launch_env() == (0, 1, 0)


@pytest.mark.parametrize("rank,local", [("abc", "0"), ("4", "0"), ("-1", "0"), ("1", "x")])
def test_invalid_ranks_inside_a_launch_are_one_line(launch, rank, local):
    launch(WORLD_SIZE="4", MASTER_ADDR="127.0.0.1", RANK=rank, LOCAL_RANK=local)
    with pytest.raises(AcdcError, match="each must be a number below WORLD_SIZE"):
        launch_env()


def test_train_inside_a_launch_with_an_invalid_rank_is_one_line(launch, tmp_path):
    launch(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", RANK="abc")
    line = fails(["train", "--out", str(tmp_path / "r"), *ONE_EPOCH])
    assert "launched with WORLD_SIZE=2 but RANK='abc'" in line
