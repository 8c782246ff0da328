"""The paper's presets end to end on fixture datasets, shrunk with --set so that each finishes in seconds on a CPU."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_data import write_cifar10, write_cifar100, write_imagefolder
from typer.testing import CliRunner

from acdc_cli.checkpoint import load_checkpoint
from acdc_cli.cli import app
from acdc_cli.metrics import read_jsonl

# AC/DC in 5 epochs: dense 0, compressed 1, decompressed 2, final compressed 3-4
SHORT_ACDC = ["schedule.epochs=5", "schedule.warmup_epochs=1", "schedule.compressed_epochs=1",
              "schedule.decompressed_epochs=1", "schedule.final_decompressed_epochs=0",
              "schedule.final_compressed_epochs=2", "optim.milestones=[3, 4]"]


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """The runs below set runtime.threads; the rest of the suite keeps torch's default."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _train(*args: str, overrides: list[str]) -> dict:
    # one thread: these small models gain little from more, and on a busy machine spinning OpenMP threads of
    # several processes slow each other down several-fold
    command = ["train", *args, "--device", "cpu", "--json", "--set", "runtime.threads=1"]
    for item in overrides:
        command += ["--set", item]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads(result.stdout)


def _conv_linear_weights(path: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(path))
    # conv (4-D) and linear (2-D) weights; BatchNorm weights are 1-D
    return {k: v for k, v in tensors.items() if not k.startswith("mask.") and k.endswith(".weight") and v.dim() > 1}


def test_wrn_cifar100_95_runs_end_to_end_and_ends_at_95_percent(tmp_path):
    data = write_cifar100(tmp_path / "cifar")
    run = tmp_path / "run"
    summary = _train("--preset", "wrn-cifar100-95", "--data-dir", str(data), "--out", str(run),
                     overrides=["model.name=wrn-10-1", "data.val_size=50", "data.batch_size=64",
                                "log.tensorboard=false", *SHORT_ACDC])
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["phase"] for r in rows] == ["dense", "sparse", "dense", "sparse", "sparse"]
    assert rows[-1]["target_sparsity"] == 0.95 and rows[-1]["sparsity"] == pytest.approx(0.95, abs=1e-4)
    # zeros counted directly in the best sparse checkpoint, over every conv and linear weight of the WRN
    # (wrn-10-1: stem, 3 blocks of 2 convs, the 1x1 shortcuts of layer2.0 and layer3.0, the classifier)
    weights = _conv_linear_weights(run / "best_sparse.safetensors")
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())
    assert "linear.weight" in weights and "conv1.weight" in weights and len(weights) == 10
    assert zeros / total == pytest.approx(0.95, abs=1e-4)
    assert summary["final_sparsity"] == pytest.approx(0.95, abs=1e-4)
    assert summary["best_sparse"]["epoch"] in (1, 3, 4) and "test_top1" in summary["best_sparse"]
    config = (run / "config.toml").read_text()
    assert 'name = "cifar100"' in config and "lr = 0.08" in config


def test_resnet20_memorization_logs_memorized_accuracy_every_epoch(tmp_path):
    data = write_cifar10(tmp_path / "cifar")
    run = tmp_path / "run"
    _train("--preset", "resnet20-cifar10-memorization-90", "--data-dir", str(data), "--out", str(run),
           overrides=["data.random_labels=40", "data.val_size=50", "data.batch_size=64", "log.per_layer=false",
                      *SHORT_ACDC])
    rows = read_jsonl(run / "metrics.jsonl")
    assert len(rows) == 5 and rows[-1]["sparsity"] == pytest.approx(0.9, abs=1e-4)
    for row in rows:
        assert 0 <= row["memorized_top1"] <= 1 and 0 <= row["memorized_true_top1"] <= 1
        # 40 samples: every value is a whole number of them
        assert (row["memorized_top1"] * 40) == pytest.approx(round(row["memorized_top1"] * 40))
    events = b"".join(p.read_bytes() for p in (run / "tb").rglob("events.out.tfevents.*"))
    assert b"acdc/memorized_top1" in events and b"acdc/memorized_true_top1" in events


def test_2of4_preset_end_to_end_then_ftdense_continues_the_cosine(tmp_path):
    data = write_imagefolder(tmp_path / "imagenet", classes=3, train=8, val=2)
    shrink = ["model.name=tiny-test", "data.val_size=4", "data.batch_size=8", "data.eval_batch_size=16",
              "data.num_workers=0", "optim.lr_warmup_epochs=1", "log.tensorboard=false", "schedule.epochs=8"]
    # dense 0-1, compressed 2, decompressed 3, compressed 4, dense 5, final compressed 6-7
    acdc = shrink + ["schedule.warmup_epochs=2", "schedule.compressed_epochs=1", "schedule.decompressed_epochs=1",
                     "schedule.final_decompressed_epochs=1", "schedule.final_compressed_epochs=2"]
    source = tmp_path / "source"
    _train("--preset", "resnet50-imagenet-2of4", "--data-dir", str(data), "--out", str(source), overrides=acdc)
    rows = read_jsonl(source / "metrics.jsonl")
    assert [r["phase"] for r in rows] == ["dense"] * 2 + ["sparse", "dense", "sparse", "dense", "sparse", "sparse"]

    tensors = load_file(str(source / "best_sparse.safetensors"))
    masks = {k.removeprefix("mask."): v for k, v in tensors.items() if k.startswith("mask.")}
    # the conv with 8 input channels and the classifier are 2:4; the 3-channel stem is left dense by rule
    assert set(masks) == {"conv.weight", "fc.weight"}
    for name, mask in masks.items():
        groups = mask.permute(0, 2, 3, 1) if mask.dim() == 4 else mask
        assert torch.all(groups.reshape(*groups.shape[:-1], -1, 4).sum(-1) == 2), name
        assert torch.all(tensors[name][mask == 0] == 0), name
    assert torch.count_nonzero(tensors["stem.weight"]) == tensors["stem.weight"].numel()

    best_dense = load_checkpoint(source / "best_dense.safetensors")
    assert best_dense.phase == "dense" and not best_dense.masks
    follow = tmp_path / "ftdense"
    _train("--preset", "resnet50-imagenet-90-ftdense", "--from", str(source / "best_dense.safetensors"),
           "--data-dir", str(data), "--out", str(follow), overrides=shrink)
    continued = read_jsonl(follow / "metrics.jsonl")
    # it starts at the epoch after the checkpoint's, stays dense, and its LR is the source run's at the same epochs
    assert [r["epoch"] for r in continued] == list(range(best_dense.epoch, 8))
    assert {r["phase"] for r in continued} == {"dense"} and all(r["sparsity"] < 0.5 for r in continued)
    assert [r["lr"] for r in continued] == pytest.approx([r["lr"] for r in rows[best_dense.epoch:]])


def test_ftdense_without_from_is_a_one_line_error(tmp_path):
    data = write_imagefolder(tmp_path / "imagenet", classes=2, train=3, val=1)
    result = CliRunner().invoke(app, ["train", "--preset", "resnet50-imagenet-90-ftdense", "--data-dir", str(data),
                                      "--out", str(tmp_path / "run"), "--set", "model.name=tiny-test"])
    assert result.exit_code == 2
    assert "pass --from CHECKPOINT" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("preset, expected", [
    ("wrn-cifar100-95", "cifar-100-python"),
    ("resnet20-cifar10-memorization-50", "cifar-10-batches-py"),
    ("mobilenet-imagenet-75", "train"),
])
def test_paper_presets_without_data_are_one_line_errors(tmp_path, preset, expected):
    result = CliRunner().invoke(app, ["train", "--preset", preset, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "--data-dir" in result.output and "Traceback" not in result.output
    missing = tmp_path / "missing"
    result = CliRunner().invoke(app, ["train", "--preset", preset, "--data-dir", str(missing),
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and expected in result.output
    assert len(result.output.strip().splitlines()) == 1
