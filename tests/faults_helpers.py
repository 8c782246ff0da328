"""Small files for the fault tests: a tiny checkpoint on synthetic data, and raw safetensors blobs; a
training process killed at a fault point."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import torch

from acdc_cli import testing_hooks
from acdc_cli.config import load_settings
from acdc_cli.files.checkpoint import Checkpoint, save_checkpoint
from acdc_cli.models import create

# synthetic data, so `eval` of these checkpoints needs no dataset on disk
TINY_SETTINGS = ["data.name=synthetic", "data.synthetic_size=64", "data.eval_batch_size=64", "model.name=tiny-test",
                 'sparsity.include=["conv", "fc"]', "runtime.device=cpu"]


def tiny_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = create("tiny-test", num_classes=10, in_channels=3)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def tiny_checkpoint(path: Path, weights: dict[str, torch.Tensor] | None = None,
                    masks: dict[str, torch.Tensor] | None = None, **extra) -> Path:
    """A tiny-test checkpoint with these weights (default: a fresh model) and masks, written as acdc writes one."""
    config = load_settings(overrides=TINY_SETTINGS).model_dump(mode="json")
    save_checkpoint(path, Checkpoint(weights=weights if weights is not None else tiny_weights(), masks=masks or {},
                                     arch="tiny-test", model_kwargs={"num_classes": 10, "in_channels": 3},
                                     config=config, epoch=1, phase="sparse" if masks else "dense", **extra))
    return path


def raw_safetensors(header: dict, data: bytes = b"") -> bytes:
    """A safetensors file from a header dict (tensor entries and ``__metadata__``) and the bytes that follow it."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def killed_at(fault: str, *args) -> None:
    """Run ``acdc train ARGS`` in a subprocess that SIGKILLs itself at ``fault`` (``_ACDC_TEST_FAULT`` syntax)."""
    done = subprocess.run([sys.executable, "-m", "acdc_cli", "train", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, testing_hooks.FAULT_ENV: fault}, timeout=900)
    assert done.returncode == -9, (done.returncode, done.stderr[-3000:])
