"""Checks made before a run dir exists: the launch environment a process group would read (MASTER_ADDR /
MASTER_PORT, WORLD_SIZE), and the model against the data's image size on the meta device (a dry run too). Each is one
line, exit 2, and nothing written."""

from __future__ import annotations

import pytest
from cli_helpers import QUIET, fails, invoke
from data_helpers import write_imagefolder


@pytest.mark.parametrize("env,expected", [
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost"},
     "error: launched with WORLD_SIZE=2 but without MASTER_PORT: start the processes with torchrun, which sets them, "
     "or set both for your launcher"),
    ({"RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "job"},
     "error: launched with WORLD_SIZE=2 but without MASTER_ADDR and MASTER_PORT: start the processes with torchrun, "
     "which sets them, or set both for your launcher"),
    ({"RANK": "0", "WORLD_SIZE": "12345678901234567890", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"},
     "error: launched with WORLD_SIZE=12345678901234567890, above the 1,048,576 processes acdc joins"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "99999"},
     "error: MASTER_PORT='99999' is not a TCP port (1 to 65535)"),
], ids=["no-port", "elastic-no-addr", "20-digit-world", "bad-port"])
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "train"])
def test_a_broken_launch_environment_is_one_line_before_the_run_dir(launch, tmp_path, env, expected, dry_run):
    launch(**env)
    out = tmp_path / "run"
    args = ["train", "--out", out, "--device", "cpu", *QUIET, *(["--dry-run"] if dry_run else [])]
    assert fails(args) == expected
    assert not out.exists()


@pytest.mark.parametrize("model,expected", [
    ("wrn-0-1", "error: cannot build model 'wrn-0-1': WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, ...), got 0"),
    ("wrn-4-1", "error: cannot build model 'wrn-4-1': WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, ...), got 4"),
    ("wrn-28-0", "error: cannot build model 'wrn-28-0': WRN width must be at least 1, got 0"),
])
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "train"])
def test_a_model_name_the_build_refuses_is_refused_by_a_dry_run_too(tmp_path, model, expected, dry_run):
    out = tmp_path / "run"
    args = ["train", "--out", out, "--device", "cpu", *QUIET, "--set", f"model.name={model}",
            *(["--dry-run"] if dry_run else [])]
    assert fails(args) == expected
    assert not out.exists()


def test_a_model_too_deep_for_the_images_is_refused_before_training(tmp_path):
    """inception_v3 needs at least 75 pixels; on 32-pixel CIFAR images it used to fail inside epoch 0."""
    out = tmp_path / "run"
    line = fails(["train", "--out", out, "--device", "cpu", *QUIET, "--set", "model.name=torchvision:inception_v3",
                  "--set", "data.name=cifar10", "--data-dir", tmp_path / "no-cifar-needed"])
    assert line.startswith("error: torchvision:inception_v3 does not take the 32x32 images of data.name = 'cifar10' "
                           "(Calculated padded input size per channel")
    assert not out.exists()


def test_the_check_uses_the_folders_image_size(tmp_path):
    """A dry run checks the model at data.image_size, the size the run trains at, not the folder default (224)."""
    data = write_imagefolder(tmp_path / "imgs", classes=2, train=4, val=2)
    args = ["train", "--dry-run", "--device", "cpu", "--data-dir", data, "--set", "data.name=imagefolder",
            "--set", "model.name=torchvision:alexnet", "--set", "data.val_size=0"]
    line = fails([*args, "--set", "data.image_size=16"])
    assert line.startswith("error: torchvision:alexnet does not take the 16x16 images of data.name = 'imagefolder'")
    assert invoke(*args, "--set", "data.image_size=64").exit_code == 0
