"""data.name = "imagefolder": a folder of your own images, at the image size you choose, normalized with the mean/std
measured on its training split (or given), with a held-out split sized for the folder; the README's three commands."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import torch
from cli_helpers import fails, invoke, invoke_json, short_schedule
from data_helpers import write_imagefolder

from acdc_cli.config import load_settings
from acdc_cli.data import build
from acdc_cli.errors import AcdcError
from acdc_cli.files.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def readme_own_folder_commands() -> list[str]:
    """The shell block of the README's section on training on your own folder of images."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Train AC/DC on your folder of images with your model"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_the_readme_trains_evaluates_and_exports_a_folder_of_your_own(tmp_path, monkeypatch):
    """The README's three commands on a folder of 3 classes x 8 training images (the model swapped for the tests'
    tiny one, the schedule shortened): the run crops 64 pixels, holds out a tenth of the folder, records the mean/std
    it measured, and eval and the ONNX export read them back."""
    monkeypatch.chdir(tmp_path)
    write_imagefolder(tmp_path / "my_images", classes=3, train=8, val=2)
    train, evaluate, export = (shlex.split(line) for line in readme_own_folder_commands())
    assert train[:2] == ["acdc", "train"] and "model.name=torchvision:resnet18" in train
    train = [("model.name=tiny-test" if arg == "model.name=torchvision:resnet18" else arg) for arg in train[1:]]
    result = invoke(*train, *short_schedule(4), "--set", "data.batch_size=8", "--set", "data.num_workers=0")
    assert result.exit_code == 0, result.output

    config = tomllib.loads((tmp_path / "runs/mine/config.toml").read_text())["data"]
    assert config["name"] == "imagefolder" and config["image_size"] == 64 and "val_size" not in config
    # the generated pixels are uniform in [60c, 60c + 80) for class c = 0, 1, 2: a mean near (40 + 60) / 255
    assert len(config["mean"]) == len(config["std"]) == 3
    assert config["mean"] == pytest.approx([100 / 255] * 3, abs=0.03)
    assert config["std"] == pytest.approx([config["std"][0]] * 3, abs=0.01) and 0.1 < config["std"][0] < 0.3
    best = load_checkpoint(tmp_path / "runs/mine/best_sparse.safetensors")
    assert best.config["data"]["mean"] == config["mean"] and best.config["data"]["std"] == config["std"]

    measured = invoke_json(*evaluate[1:])
    assert measured["images"] == 6 and measured["split"] == "test"
    assert invoke_json("eval", "runs/mine/best_sparse.safetensors", "--split", "val")["images"] == 2  # 24 // 10
    out = invoke_json(*export[1:])
    assert Path(out["path"]).name == "mine.onnx"
    onnx_eval = invoke_json("eval", "mine.onnx", "--split", "test")
    assert onnx_eval["images"] == 6 and onnx_eval["top1"] == measured["top1"]
    assert onnx_eval["loss"] == pytest.approx(measured["loss"], abs=1e-4)


def test_the_held_out_split_fits_the_folder_and_the_quickstarts_does_not_carry_over(tmp_path):
    write_imagefolder(tmp_path, classes=3, train=24, val=2)  # 72 training images: the quickstart's 270 would not fit
    settings = load_settings(overrides=["data.name='imagefolder'", f"data.dir='{tmp_path}'", "data.num_workers=0",
                                        "data.image_size=32", "runtime.device='cpu'", "model.name='tiny-test'"])
    assert settings.data.val_size is None and settings.preset == "quickstart"
    bundle = build(settings, CPU)
    assert (len(bundle.train.dataset), len(bundle.val.dataset), len(bundle.test.dataset)) == (65, 7, 6)
    assert bundle.image_size == 32 and next(iter(bundle.test))[0].shape == (6, 3, 32, 32)
    # what was measured is in the settings now, and normalizes: the training split's pixels come out near 0 +- 1
    assert settings.data.mean is not None and len(settings.data.std) == 3
    pixels = torch.cat([images for images, _ in bundle.train.iterate()])
    assert float(pixels.mean()) == pytest.approx(0.0, abs=0.15) and float(pixels.std()) == pytest.approx(1, abs=0.2)
    # a stated val_size still wins, and is refused in one line when the folder is smaller
    fixed = load_settings(overrides=["data.name='imagefolder'", f"data.dir='{tmp_path}'", "data.val_size=10",
                                     "data.num_workers=0", "model.name='tiny-test'"])
    assert len(build(fixed, CPU).val.dataset) == 10
    too_many = fixed.model_copy(update={"data": fixed.data.model_copy(update={"val_size": 270})})
    with pytest.raises(AcdcError, match=r"data.val_size \(270\) must be smaller than the training split \(72 images\)"):
        build(too_many, CPU)


def test_given_mean_and_std_are_used_as_they_are(tmp_path):
    write_imagefolder(tmp_path, classes=2, train=5, val=2)
    settings = load_settings(overrides=["data.name='imagefolder'", f"data.dir='{tmp_path}'", "data.num_workers=0",
                                        "data.image_size=16", "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.25, 0.5, 1.0]",
                                        "data.augment=false"])
    bundle = build(settings, CPU)
    assert settings.data.mean == [0.5, 0.5, 0.5] and settings.data.std == [0.25, 0.5, 1.0]
    raw = next(bundle.test.iterate(normalized=False))[0].float() / 255
    normalized = next(bundle.test.iterate())[0]
    expected = (raw - 0.5) / torch.tensor([0.25, 0.5, 1.0]).view(1, 3, 1, 1)
    assert torch.allclose(normalized, expected, atol=1e-5)
    assert "data.mean and data.std go together" in fails(["train", "--dry-run", "--set", "data.mean=[0.5]"])
    assert "data.std must be positive" in fails(["train", "--dry-run", "--set", "data.mean=[0.5]",
                                                 "--set", "data.std=[0]"])


def test_a_resume_from_the_same_command_line_takes_the_measured_mean_and_std(tmp_path):
    """The mean/std a run measured are in its recorded settings; the same command line again (which gives none) is
    not a change, another mean is."""
    from acdc_cli.training.resume import check_resume_settings

    base = ["data.name='imagefolder'", f"data.dir='{tmp_path}'"]
    recorded = load_settings(overrides=[*base, "data.mean=[0.4, 0.4, 0.4]", "data.std=[0.2, 0.2, 0.2]"])
    check_resume_settings(recorded, load_settings(overrides=base), tmp_path)
    with pytest.raises(AcdcError, match="cannot change data.mean"):
        check_resume_settings(recorded, load_settings(overrides=[*base, "data.mean=[0.5, 0.4, 0.4]",
                                                                 "data.std=[0.2, 0.2, 0.2]"]), tmp_path)
