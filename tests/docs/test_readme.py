"""Promises of the README that cut across commands: `acdc eval --data-dir` on CIFAR and ImageFolder checkpoints
whose data moved, the paper presets' protocol and the held-out split one --set away, and `--download` never used
unless asked for."""

import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import fails, invoke_json
from data_helpers import write_cifar10, write_cifar100, write_imagefolder

from acdc_cli.config import load_settings, preset_names
from acdc_cli.data import build, cifar
from acdc_cli.files.checkpoint import Checkpoint, save_checkpoint
from acdc_cli.models import create

CPU = torch.device("cpu")


def _checkpoint(path: Path, preset: str, data_dir: Path, num_classes: int, *overrides: str) -> Path:
    """A checkpoint of the preset's data with a tiny model in its place (eval rebuilds both from the metadata)."""
    settings = load_settings(preset=preset, overrides=[f"data.dir='{data_dir}'", "model.name=tiny-test",
                                                       "runtime.device=cpu", *overrides])
    torch.manual_seed(0)
    model = create("tiny-test", num_classes=num_classes, in_channels=3)
    save_checkpoint(path, Checkpoint(weights=model.state_dict(), masks={}, arch="tiny-test",
                                     model_kwargs={"num_classes": num_classes, "in_channels": 3},
                                     config=settings.model_dump(mode="json"), epoch=1, phase="dense"))
    return path


@pytest.mark.parametrize("kind", ["cifar10", "imagefolder"])
def test_eval_data_dir_finds_data_that_moved(tmp_path, kind):
    """A checkpoint stores data.dir as an absolute path. After the data moves, `acdc eval` names the place it looked
    and `--data-dir NEW` evaluates exactly as at the old place, on both splits."""
    old, new = tmp_path / "old", tmp_path / "new"
    if kind == "cifar10":
        write_cifar10(old, train=100, test=30)
        ckpt = _checkpoint(tmp_path / "c.safetensors", "resnet20-cifar10-memorization-90", old, 10, "data.val_size=20",
                            "data.random_labels=0")
        sizes, missing = {"val": 20, "test": 30}, str(old / "cifar-10-batches-py")
    else:
        write_imagefolder(old, classes=3, train=6, val=2)
        ckpt = _checkpoint(tmp_path / "i.safetensors", "resnet50-imagenet-90", old, 3, "data.val_size=4",
                           "data.num_workers=0", "data.eval_batch_size=5")
        sizes, missing = {"val": 4, "test": 6}, str(old / "train")
    before = {split: invoke_json("eval", ckpt, "--split", split) for split in sizes}
    assert {split: r["images"] for split, r in before.items()} == sizes
    shutil.move(old, new)
    assert missing in fails(["eval", ckpt, "--split", "test"])
    for split in sizes:
        assert invoke_json("eval", ckpt, "--split", split, "--data-dir", new) == before[split]


def test_paper_presets_use_the_references_protocol_and_the_quickstart_holds_out_val():
    """data.val_size = 0 in every paper preset (train on every training image, measure and select on the test
    split); the quickstart keeps its held-out validation split."""
    for name in preset_names():
        settings = load_settings(preset=name)
        assert settings.data.val_size == (270 if name == "quickstart" else 0), name


def test_set_val_size_5000_holds_out_5000_training_images(tmp_path):
    """README, Reproducing the paper: `--set data.val_size=5000` for an honest held-out protocol."""
    write_cifar100(tmp_path, train=5250, test=10)
    bundle = build(load_settings(preset="wrn-cifar100-95", overrides=[f"data.dir='{tmp_path}'",
                                                                      "data.val_size=5000"]), CPU)
    assert (len(bundle.val.labels), len(bundle.train.labels), len(bundle.test.labels)) == (5000, 250, 10)
    everything = build(load_settings(preset="wrn-cifar100-95", overrides=[f"data.dir='{tmp_path}'"]), CPU)
    assert everything.val is None and len(everything.train.labels) == 5250


def test_download_is_never_used_unless_asked_for(tmp_path, monkeypatch):
    """No preset downloads; a missing CIFAR folder is a one-line error that suggests data.download and fetches
    nothing; with --download the fetch is attempted (here it fails as it would offline)."""
    assert load_settings().data.download is False
    assert all(load_settings(preset=name).data.download is False for name in preset_names())
    calls = []

    def offline(root, fmt):
        calls.append(Path(root))
        from acdc_cli.errors import AcdcError

        raise AcdcError(f"{fmt.title}: download into {root} failed (no network)")

    monkeypatch.setattr(cifar, "_download", offline)
    empty = tmp_path / "data"
    empty.mkdir()
    args = ["train", "--preset", "wrn-cifar100-95", "--data-dir", empty, "--out", tmp_path / "run"]
    assert "point --data-dir / data.dir at the folder that holds it, or set data.download=true" in fails(args)
    assert calls == [] and not any(empty.iterdir()) and not (tmp_path / "run" / "config.toml").exists()
    assert "failed (no network)" in fails([*args, "--download"])
    assert calls == [empty]
