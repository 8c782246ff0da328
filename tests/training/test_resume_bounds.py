"""A resume state's previous masks (kept through a dense phase to measure the next mask change) are checked whole
before the first step: a partial table used to fail one phase later with a KeyError, masks of 2 or floats to record a
wrong mask_change. Each is one line, exit 2, and the run dir is left as it was."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import fails, short_schedule
from safetensors import safe_open


@pytest.fixture(scope="module")
def stopped_in_dense(tmp_path_factory) -> Path:
    """An AC/DC run stopped mid-epoch in its decompressed phase (epoch 2), so its state holds previous masks."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    args = ["train", "--out", run_dir, *short_schedule(4, 1, 1, 1, 1, 0, "data.batch_size=64",
                                                       "runtime.checkpoint_every_steps=8")]
    assert "No space left" in fails(args, env={"_ACDC_TEST_FAULT": "fail@write:8:last.safetensors"})
    return run_dir


def _masks_of(run_dir: Path) -> list[str]:
    with safe_open(str(run_dir / "last.safetensors"), framework="pt") as fh:
        return [k for k in fh.keys() if k.startswith("mask.")]


@pytest.mark.parametrize("damage,expected", [
    (lambda p: {k: p[k] for k in list(p)[:1]}, "engine.previous_masks has no mask for {second} (one per selected "
                                               "weight)"),
    (lambda p: {k: torch.full(v.shape, 2, dtype=torch.uint8) for k, v in p.items()},
     "engine.previous_masks[{first}] holds values other than 0 and 1"),
    (lambda p: {k: v.float() for k, v in p.items()}, "engine.previous_masks[{first}] is float32, expected bool or 0/1 "
                                                     "uint8"),
], ids=["partial", "all-2", "float"])
def test_malformed_previous_masks_are_one_line_before_any_step(stopped_in_dense, tmp_path, damage, expected):
    from acdc_cli.files.torchfile import load_state, save_state
    from acdc_cli.training.checkpoints import state_path

    run_dir = Path(shutil.copytree(stopped_in_dense, tmp_path / "run"))
    assert _masks_of(run_dir) == []  # stopped in a dense phase
    path = state_path(run_dir)
    state = load_state(path)
    previous = state["engine"]["previous_masks"]
    assert isinstance(previous, dict) and len(previous) >= 2
    first, second = sorted(previous)[:2]
    state["engine"]["previous_masks"] = damage(dict(sorted(previous.items())))
    save_state(path, state)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    line = fails(["train", "--resume", run_dir])
    assert line == f"error: {path}: malformed resume state: " + expected.format(first=first, second=second)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
