"""Every size a setting or a file can ask for is bounded before anything is allocated, so a typo
or a crafted file is one line on stderr instead of gigabytes of memory or minutes of work."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import fails
from faults_helpers import raw_safetensors, tiny_checkpoint

from acdc_cli.config import load_settings
from acdc_cli.errors import AcdcError
from acdc_cli.files.checkpoint import load_checkpoint
from acdc_cli.models import create
from acdc_cli.models.registry import MAX_NAME_INTEGER, MAX_PARAMETERS
from acdc_cli.sections import MAX_EPOCHS
from acdc_cli.sparsity.schedule import plan

HUGE = 10**18


# ----------------------------------------------------------------------------------------------------------------
# settings


@pytest.mark.parametrize("key", [
    "schedule.epochs", "schedule.warmup_epochs", "schedule.compressed_epochs", "schedule.decompressed_epochs",
    "schedule.final_decompressed_epochs", "schedule.final_compressed_epochs", "schedule.gmp_start_epoch",
    "schedule.gmp_end_epoch", "schedule.prune_every", "schedule.start_epoch", "optim.cosine_epochs",
    "optim.lr_warmup_epochs", "data.batch_size", "data.eval_batch_size", "data.num_workers", "data.synthetic_size",
    "runtime.threads",
])
def test_a_huge_count_is_refused_before_anything_is_planned(key):
    """`--dry-run --set schedule.epochs=1e18` used to build a phase plan of 3e17 entries until the memory ran out."""
    line = fails(["train", "--dry-run", "--set", f"{key}={HUGE}"])
    assert key in line


def test_huge_milestones_are_refused():
    assert "optim.milestones" in fails(["train", "--dry-run", "--set", f"optim.milestones=[{HUGE}]"])
    many = "[" + ", ".join("1" for _ in range(MAX_EPOCHS + 1)) + "]"
    assert "optim.milestones" in fails(["train", "--dry-run", "--set", f"optim.milestones={many}"])


def test_the_epoch_bound_itself_plans_quickly():
    """The longest schedule allowed, alternating every epoch, is planned (10,000 phases) without trouble."""
    settings = load_settings(overrides=[f"schedule.epochs={MAX_EPOCHS}", "schedule.compressed_epochs=1",
                                        "schedule.decompressed_epochs=1"])
    phases = plan(settings)
    assert phases[-1].end == MAX_EPOCHS and len(phases) == MAX_EPOCHS - 4 - 8 + 2


@pytest.mark.slow  # a long end-to-end run: the slow pass, which CI runs
def test_a_dry_run_with_huge_epochs_stays_small(tmp_path):
    """From the outside: the dry run exits 2 at once, its peak memory no more than a plain dry run's."""
    plain = _peak_rss_kib(["train", "--dry-run"], tmp_path)
    bomb = _peak_rss_kib(["train", "--dry-run", "--set", f"schedule.epochs={HUGE}"], tmp_path, code=2)
    assert bomb < plain + 100 * 1024, (plain, bomb)


def _peak_rss_kib(args: list[str], cwd: Path, code: int = 0) -> int:
    """Peak resident memory (KiB) of `python -m acdc_cli ARGS`, measured by a parent of its own."""
    probe = ("import resource, subprocess, sys; "
             f"rc = subprocess.run([sys.executable, '-m', 'acdc_cli', *{args!r}], capture_output=True).returncode; "
             "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=cwd, timeout=600)
    rc, peak = out.stdout.split()
    assert int(rc) == code, out.stderr
    return int(peak)


# ----------------------------------------------------------------------------------------------------------------
# model sizes: one guard in models.create, which every model construction goes through


def test_a_deep_pattern_name_is_refused_before_building():
    started = time.monotonic()
    with pytest.raises(AcdcError, match=f"depth 1000000 is above the {MAX_NAME_INTEGER}"):
        create("wrn-1000000-1", num_classes=10)
    assert time.monotonic() - started < 60  # a safety net only: it used to build for minutes


def test_a_model_above_the_parameter_bound_is_refused_by_its_meta_build():
    # WRN-10-2000: 128,000-channel convs, 3e11 parameters (1.2 TB); counted on the meta device, never allocated
    with pytest.raises(AcdcError, match="295,944,864,529 parameters") as info:
        create("wrn-10-2000", num_classes=10)
    assert f"{MAX_PARAMETERS:,}" in str(info.value)


def test_models_within_the_bounds_build_for_real_and_on_meta():
    model = create("wrn-10-2", num_classes=10)
    assert all(p.device.type == "cpu" for p in model.parameters())
    with torch.device("meta"):
        meta = create("wrn-10-2", num_classes=10)
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert [p.shape for p in meta.parameters()] == [p.shape for p in model.parameters()]


def test_train_with_a_huge_model_name_is_one_line(tmp_path):
    line = fails(["train", "--out", str(tmp_path / "r"), "--set", "model.name=wrn-1000000-1",
                  "--set", "data.name=synthetic"])
    assert "wrn-1000000-1" in line
    assert not (tmp_path / "r" / "config.toml").exists()


@pytest.mark.parametrize("arch", ["wrn-100000-1", "wrn-10-2000"])
def test_a_checkpoint_whose_arch_is_huge_is_refused_by_every_reader_that_builds_it(tmp_path, arch):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    good = tiny_checkpoint(tmp_path / "good.safetensors")
    with safe_open(str(good), framework="pt") as fh:
        meta = fh.metadata()
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(good), bad, metadata={**meta, "arch": arch})
    assert arch in fails(["eval", str(bad)])
    assert arch in fails(["train", "--from", str(bad), "--set", f"model.name={arch}", "--out", str(tmp_path / "r")])


# ----------------------------------------------------------------------------------------------------------------
# synthetic data


def test_synthetic_images_beyond_the_memory_bound_are_refused(tmp_path):
    # 100,000 ResNet-50-sized images (3x224x224) and their val/test quarters are 22 GiB
    line = fails(["train", "--out", str(tmp_path / "r"), "--set", "data.name=synthetic", "--set",
                  "model.name=resnet50", "--set", "data.synthetic_size=100000", "--set", "log.tensorboard=false"])
    assert "data.synthetic_size 100000" in line and "4 GiB" in line


# ----------------------------------------------------------------------------------------------------------------
# files: tensor bytes must lie in the file, shapes are bounded before a tensor is read


@pytest.mark.slow  # a long end-to-end run: the slow pass, which CI runs
def test_a_small_file_declaring_a_huge_tensor_is_refused_and_stays_small(tmp_path):
    """A 4 KB file whose header declares a 2 GiB tensor: `inspect` refuses it from the header, without reading it."""
    small = tiny_checkpoint(tmp_path / "small.safetensors")
    bombs = {
        "beyond the file": {"w.weight": {"dtype": "F32", "shape": [2**29], "data_offsets": [0, 2**31]}},
        "shape and offsets disagree": {"w.weight": {"dtype": "F32", "shape": [2**29], "data_offsets": [0, 4000]}},
    }
    plain = _peak_rss_kib(["inspect", str(small)], tmp_path)
    for name, header in bombs.items():
        bomb = tmp_path / "bomb.safetensors"
        bomb.write_bytes(raw_safetensors(header, bytes(4000)))
        assert bomb.stat().st_size < 4200
        assert "not a readable safetensors file" in fails(["inspect", str(bomb)]), name
        assert _peak_rss_kib(["inspect", str(bomb)], tmp_path, code=2) < plain + 100 * 1024, name


@pytest.mark.parametrize("command", ["inspect", "export", "eval"])
def test_a_zero_size_tensor_declaring_a_huge_dimension_is_one_line(tmp_path, command):
    """[0, 2**40] holds no bytes, so safetensors accepts it; inspect raised RuntimeError, export ZeroDivisionError."""
    path = tmp_path / "zero.safetensors"
    meta = {"format": "acdc-checkpoint", "arch": "tiny-test", "model_kwargs": '{"num_classes": 10}'}
    path.write_bytes(raw_safetensors({"__metadata__": meta,
                                      "w.weight": {"dtype": "F32", "shape": [0, 2**40], "data_offsets": [0, 0]}}))
    args = {"inspect": ["inspect", str(path)], "eval": ["eval", str(path)],
            "export": ["export", str(path), "-f", "dense", "-o", str(tmp_path / "out.safetensors")]}[command]
    assert "declares shape [0, 1099511627776]" in fails(args)


def test_zero_size_layers_within_the_bounds_are_read(tmp_path):
    """A layer of no weights is a legal (if odd) tensor: inspect reports it instead of failing; export, which rebuilds
    the model the file names, refuses in one line a file whose layers that model lacks."""
    weights = {"conv.weight": torch.zeros(0, 16), "fc.weight": torch.ones(4, 8)}
    path = tiny_checkpoint(tmp_path / "empty.safetensors", weights=weights)
    from typer.testing import CliRunner

    from acdc_cli.cli.app import app
    from acdc_cli.commands.export import export_checkpoint

    result = CliRunner().invoke(app, ["inspect", "--json", "--layers", str(path)])
    assert result.exit_code == 0, result.output
    layers = {layer["name"]: layer for layer in json.loads(result.stdout)["layers"]}
    assert layers["conv.weight"]["numel"] == 0 and layers["conv.weight"]["nm_valid"] is None
    with pytest.raises(AcdcError, match="does not fit this model"):
        export_checkpoint(path, tmp_path / "e.safetensors", "sparse-bitmask")
    assert not (tmp_path / "e.safetensors").exists()
    assert torch.equal(load_checkpoint(path).weights["fc.weight"], torch.ones(4, 8))


# ----------------------------------------------------------------------------------------------------------------
# bench arguments


@pytest.mark.parametrize("args,expected", [
    (["--batch-size", "0"], "--batch-size must be in [1, 65536], got 0"),
    (["--batch-size", "-3"], "--batch-size must be in"),
    (["--batch-size", "100000"], "--batch-size must be in"),
    (["--steps", "1000000"], "--steps must be in [1, 100000]"),
    (["--steps", "100000", "--batch-size", "60000"], "exceed the 8 GiB"),
])
def test_bench_refuses_sizes_it_cannot_measure(args, expected):
    """`bench --batch-size 0` used to run at the preset's batch size (0 read as "not given")."""
    assert expected in fails(["bench", *args])


def test_the_largest_seed_draws_random_labels():
    """runtime.seed allows up to 2**62 - 1, but seed * 1,000,003 overflowed torch's manual_seed (ValueError)."""
    from acdc_cli.data.random_labels import select_random_labels

    positions, labels = select_random_labels(torch.arange(100), 10, 10, seed=2**62 - 1)
    assert positions.tolist() == sorted(set(positions.tolist())) and len(positions) == 10
    assert ((0 <= labels) & (labels < 10)).all()
