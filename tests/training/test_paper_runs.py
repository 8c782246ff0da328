"""The paper's presets end to end on fixture datasets, shrunk with --set so that each finishes in seconds on a CPU."""

from pathlib import Path

import pytest
import torch
from cli_helpers import PINNED, fails, invoke_json, sets
from data_helpers import write_cifar10, write_cifar100, write_imagefolder
from safetensors.torch import load_file

from acdc_cli.files.checkpoint import build_model, load_checkpoint
from acdc_cli.files.jsonio import read_jsonl

# AC/DC in 5 epochs: dense 0, compressed 1, decompressed 2, final compressed 3-4
SHORT_ACDC = ["schedule.epochs=5", "schedule.warmup_epochs=1", "schedule.compressed_epochs=1",
              "schedule.decompressed_epochs=1", "schedule.final_decompressed_epochs=0",
              "schedule.final_compressed_epochs=2", "optim.milestones=[3, 4]"]


def _train(*args: str, overrides: list[str]) -> dict:
    # pinned: CPU, deterministic, one thread (these small models gain little from more, and on a busy machine
    # spinning OpenMP threads of several processes slow each other down several-fold)
    return invoke_json("train", *args, *PINNED, *sets(*overrides))


def _conv_linear_weights(path: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(path))
    # conv (4-D) and linear (2-D) weights; BatchNorm weights are 1-D
    return {k: v for k, v in tensors.items() if not k.startswith("mask.") and k.endswith(".weight") and v.dim() > 1}


@pytest.mark.slow  # an end-to-end preset run: the slow pass (CI runs it)
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
    # best_sparse: the compressed epoch at 95 % with the highest val top-1 (the first of equals)
    best = max((r for r in rows if r["phase"] == "sparse"), key=lambda r: r["val_top1"])
    assert summary["best_sparse"]["epoch"] == best["epoch"] and summary["best_sparse"]["val_top1"] == best["val_top1"]
    assert load_checkpoint(run / "best_sparse.safetensors").metrics == best
    assert 0 <= summary["best_sparse"]["test_top1"] <= 1
    config = (run / "config.toml").read_text()
    assert 'name = "cifar100"' in config and "lr = 0.08" in config


@pytest.mark.slow  # an end-to-end preset run: the slow pass (CI runs it)
def test_resnet20_memorization_logs_memorized_accuracy_every_epoch(tmp_path):
    data = write_cifar10(tmp_path / "cifar")
    run = tmp_path / "run"
    _train("--preset", "resnet20-cifar10-memorization-90", "--data-dir", str(data), "--out", str(run),
           overrides=["data.random_labels=40", "data.batch_size=50", "log.per_layer=false", *SHORT_ACDC])
    rows = read_jsonl(run / "metrics.jsonl")
    assert len(rows) == 5 and rows[-1]["sparsity"] == pytest.approx(0.9, abs=1e-4)
    # the preset's protocol is the reference's: all 250 training images train, the test split is measured
    assert all("test_top1" in row and "val_top1" not in row for row in rows)
    assert rows[0]["train_flops"] == 3 * rows[0]["inference_flops"] * 250
    for row in rows:
        # 40 samples: every value is a whole number of them
        assert (row["memorized_top1"] * 40) == pytest.approx(round(row["memorized_top1"] * 40))
    # the last epoch's figures, recomputed from the final weights and labels drawn here, independently of the run's
    # loaders: the same seeded split and random labels, predictions of the saved model on those 40 images
    from acdc_cli.config import load_settings
    from acdc_cli.data import build, cifar
    from acdc_cli.data.bundle import split_val
    from acdc_cli.data.random_labels import select_random_labels

    settings = load_settings(config=run / "config.toml")
    _, labels = cifar.load("cifar10", data)["train"]
    train_i, _ = split_val(len(labels), settings.data.val_size, settings.runtime.seed)
    assert settings.data.val_size == 0 and torch.equal(train_i, torch.arange(250))  # picked among all 250
    positions, random_labels = select_random_labels(train_i, 40, 10, settings.runtime.seed)
    true_labels = labels[train_i[positions]]
    assert (random_labels != true_labels).sum() >= 30  # the two label sets really differ
    model = build_model(load_checkpoint(run / "last.safetensors")).eval()
    with torch.no_grad():
        images = torch.cat([x for x, *_ in build(settings, torch.device("cpu")).memorized])
        predicted = model(images).argmax(1)
    memorized, true = int((predicted == random_labels).sum()) / 40, int((predicted == true_labels).sum()) / 40
    assert (rows[-1]["memorized_top1"], rows[-1]["memorized_true_top1"]) == (memorized, true)
    assert memorized != true  # so swapping the two label sets would fail the line above
    events = b"".join(p.read_bytes() for p in (run / "tb").rglob("events.out.tfevents.*"))
    assert b"memorized/top1" in events and b"memorized/true_top1" in events


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
    assert "pass --from CHECKPOINT" in fails(["train", "--preset", "resnet50-imagenet-90-ftdense", "--data-dir",
                                              data, "--out", tmp_path / "run", "--set", "model.name=tiny-test"])


@pytest.mark.parametrize("preset, expected", [
    ("wrn-cifar100-95", "cifar-100-python"),
    ("resnet20-cifar10-memorization-50", "cifar-10-batches-py"),
    ("mobilenet-imagenet-75", "train"),
])
def test_paper_presets_without_data_are_one_line_errors(tmp_path, preset, expected):
    assert "--data-dir" in fails(["train", "--preset", preset, "--out", tmp_path / "run"])
    missing = tmp_path / "missing"
    assert expected in fails(["train", "--preset", preset, "--data-dir", missing, "--out", tmp_path / "run"])
