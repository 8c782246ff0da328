"""``acdc bench --inference`` bounds what it is asked to allocate and time before it starts: batch sizes, steps,
the device name, the bytes of one input batch. Each is one line, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_helpers import fails

from acdc_cli import ACDC
from acdc_cli.commands import bench_inference
from acdc_cli.errors import AcdcError
from acdc_cli.models import create


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = create("tiny-test", num_classes=10, in_channels=1)
    acdc = ACDC(model, torch.optim.SGD(model.parameters(), lr=0.1), epochs=1, sparsity=0.5, warmup_epochs=0,
                compressed_epochs=1, decompressed_epochs=1, final_compressed_epochs=1)
    acdc.start_epoch(0)
    return acdc.save(tmp_path_factory.mktemp("bench") / "m.safetensors", arch="tiny-test", data="digits")


@pytest.mark.parametrize("args,expected", [
    (["--batch-size", "0"], "error: --batch-size 0: expected a whole number 1 to 65,536"),
    (["--batch-size", "100000000"], "error: --batch-size 100000000: expected a whole number 1 to 65,536"),
    (["--steps", "1000000000"], "error: --steps must be at least 1 and --warmup at least 0, both at most 100,000"),
    (["--steps", "0"], "error: --steps must be at least 1 and --warmup at least 0, both at most 100,000"),
    (["--warmup", "1000000000"], "error: --steps must be at least 1 and --warmup at least 0, both at most 100,000"),
    (["--device", "junk"], "error: unknown device 'junk' (auto, cpu, cuda, cuda:N, mps)"),
])
def test_bench_inference_bounds_are_one_line(checkpoint, args, expected):
    assert fails(["bench", "--inference", checkpoint, *args]) == expected


def test_bench_inference_bounds_the_bytes_of_one_input_batch(checkpoint, monkeypatch):
    # tiny-test's 1x8x8 images never reach 1 GiB at a batch the flags allow; a lower bound shows the same check
    monkeypatch.setattr(bench_inference, "MAX_INPUT_ELEMENTS", 64 * 64 - 1)
    with pytest.raises(AcdcError, match=r"a batch of 64 images of 1x8x8 is 4,096 values, above the 4,095 "):
        bench_inference.run_inference_bench(checkpoint, "cpu", 1, 0, (1, 64))
    assert bench_inference.run_inference_bench(checkpoint, "cpu", 1, 0, (1, 63))["results"][1]["batch_size"] == 63
