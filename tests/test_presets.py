"""Every preset against the reference (PAPER.md): prune/restore epochs, optimizer, LR, batch size, and the layers its
sparsity rules select on the real architecture."""

import json
import math
import re

import pytest
import torch
from typer.testing import CliRunner

from acdc_cli import models
from acdc_cli.cli import app
from acdc_cli.config import load_settings, preset_names, preset_path
from acdc_cli.sparsity.schedule import learning_rate
from acdc_cli.sparsity.sparsifier import Sparsifier
from cli_helpers import invoke_json

# ----------------------------------------------------------------------------------------------------------------
# the reference, from PAPER.md "Reference schedules" and "Reported accuracy"

IMAGENET_100 = (100, list(range(10, 71, 10)) + [85], list(range(15, 66, 10)) + [75])
IMAGENET_150 = (150, list(range(10, 121, 10)) + [135], list(range(15, 116, 10)) + [125])
IMAGENET_200 = (200, list(range(10, 171, 10)) + [185], list(range(15, 166, 10)) + [175])
CIFAR_200 = (200, [10, 50, 90, 130, 170], [30, 70, 110, 150])
DENSE13_225 = (225, [10, 43, 76, 109, 142, 175], [30, 63, 96, 129, 162])
# GMP: no restore; its "compressed starts" are the mask recomputations of the cubic ramp (epochs [1, 5, 40])
GMP_100 = (100, [1, 6, 11, 16, 21, 26, 31, 36, 40], [])


def _dense(epochs):
    return (epochs, [], [])


IMAGENET_OPTIM = {"lr": 0.256, "momentum": 0.875, "nesterov": False, "weight_decay": 3.0517578e-5,
                  "lr_schedule": "cosine", "lr_warmup_epochs": 5, "batch_size": 256}
WRN_OPTIM = {"lr": 0.08, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "lr_schedule": "step",
             "milestones": [75, 115, 155], "gamma": 0.1, "batch_size": 128}
MEMORIZATION_OPTIM = {"lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4, "lr_schedule": "step",
                      "milestones": [65, 125, 185], "gamma": 0.1, "batch_size": 128}

# name: (model, dataset, (epochs, P, R), optimizer, sparsity, paper top-1)
EXPECTED = {
    **{f"wrn-cifar100-{s}": ("wrn-28-10", "cifar100", CIFAR_200, WRN_OPTIM, s / 100, {95: 0.782}.get(s))
       for s in (50, 75, 90, 95)},
    "wrn-cifar100-95-dense13": ("wrn-28-10", "cifar100", DENSE13_225, WRN_OPTIM, 0.95, None),
    "wrn-cifar100-dense": ("wrn-28-10", "cifar100", _dense(200), WRN_OPTIM, 0.0, 0.79),
    **{f"resnet20-cifar10-memorization-{s}": ("resnet20", "cifar10", CIFAR_200, MEMORIZATION_OPTIM, s / 100, None)
       for s in (50, 75, 90, 95)},
    **{f"resnet50-imagenet-{s}": ("resnet50", "imagenet", IMAGENET_100, IMAGENET_OPTIM, s / 100, top1)
       for s, top1 in {80: 0.7645, 90: 0.7503, 95: 0.7314, 98: 0.6848}.items()},
    **{f"resnet50-imagenet-{s}-no-conv1-fc": ("resnet50", "imagenet", IMAGENET_100, IMAGENET_OPTIM, s / 100, None)
       for s in (80, 90, 95, 98)},
    "resnet50-imagenet-90-uniform": ("resnet50", "imagenet", IMAGENET_100, IMAGENET_OPTIM, 0.9, 0.7504),
    "resnet50-imagenet-95-uniform": ("resnet50", "imagenet", IMAGENET_100, IMAGENET_OPTIM, 0.95, 0.7328),
    "resnet50-imagenet-90-uniform-200ep": ("resnet50", "imagenet", IMAGENET_200, IMAGENET_OPTIM, 0.9, 0.7609),
    "resnet50-imagenet-95-uniform-200ep": ("resnet50", "imagenet", IMAGENET_200, IMAGENET_OPTIM, 0.95, 0.7429),
    "resnet50-imagenet-90-150ep": ("resnet50", "imagenet", IMAGENET_150, IMAGENET_OPTIM, 0.9, None),
    "resnet50-imagenet-2of4": ("resnet50", "imagenet", IMAGENET_100, IMAGENET_OPTIM, 0.5, None),
    "resnet50-imagenet-gmp-80": ("resnet50", "imagenet", GMP_100, IMAGENET_OPTIM, 0.8, None),
    "resnet50-imagenet-gmp-90": ("resnet50", "imagenet", GMP_100, IMAGENET_OPTIM, 0.9, None),
    "resnet50-imagenet-dense": ("resnet50", "imagenet", _dense(100), IMAGENET_OPTIM, 0.0, None),
    "resnet50-imagenet-90-ftdense": ("resnet50", "imagenet", _dense(100), IMAGENET_OPTIM, 0.0, None),
    "mobilenet-imagenet-75": ("mobilenet-v1", "imagenet", IMAGENET_100, IMAGENET_OPTIM, 0.75, 0.7041),
    "mobilenet-imagenet-90": ("mobilenet-v1", "imagenet", IMAGENET_100, IMAGENET_OPTIM, 0.9, 0.6624),
    "mobilenet-imagenet-75-no-conv1-dw": ("mobilenet-v1", "imagenet", IMAGENET_100, IMAGENET_OPTIM, 0.75, None),
    "mobilenet-imagenet-90-no-conv1-dw": ("mobilenet-v1", "imagenet", IMAGENET_100, IMAGENET_OPTIM, 0.9, None),
    "mobilenet-imagenet-dense": ("mobilenet-v1", "imagenet", _dense(100), IMAGENET_OPTIM, 0.0, None),
}


def _dry_run(name: str) -> dict:
    return invoke_json("train", "--preset", name, "--dry-run")


def test_every_preset_of_the_issue_exists_and_every_preset_has_a_reference():
    names = set(preset_names())
    assert set(EXPECTED) <= names
    # a new preset must come with its reference epochs here
    assert names - set(EXPECTED) == {"quickstart"}


def test_every_preset_matches_the_reference_schedule_optimizer_and_batch():
    for name, (model, dataset, (epochs, prune, restore), optim, sparsity, paper) in EXPECTED.items():
        resolved = _dry_run(name)
        config, phases = resolved["config"], resolved["phases"]
        compressed = [p["start"] for p in phases if p["kind"] == "sparse"]
        decompressed = [p["start"] for i, p in enumerate(phases) if p["kind"] == "dense" and i > 0]
        assert (compressed, decompressed) == (prune, restore), name
        assert phases[0]["start"] == 0 and phases[-1]["end"] == epochs == config["schedule"]["epochs"], name
        assert all(a["end"] == b["start"] for a, b in zip(phases, phases[1:])), name
        # the run ends in its final compressed phase at the target (dense runs: dense throughout)
        assert phases[-1]["sparsity"] == pytest.approx(sparsity), name
        assert config["model"]["name"] == model and config["data"]["name"] == dataset, name
        assert config["data"]["batch_size"] == optim["batch_size"], name
        for key, value in optim.items():
            if key != "batch_size":
                assert config["optim"][key] == pytest.approx(value), (name, key)
        assert config["optim"]["cosine_epochs"] is None and config["optim"]["label_smoothing"] == 0.0, name
        assert config["paper_top1"] == paper, name


def test_learning_rates_follow_the_reference():
    wrn = load_settings(preset="wrn-cifar100-95")
    # MultiStepLR semantics: epoch m is the first one at the lower rate
    assert [learning_rate(wrn, e) for e in (0, 74, 75, 114, 115, 155, 199)] == pytest.approx(
        [0.08, 0.08, 0.008, 0.008, 0.0008, 0.00008, 0.00008])
    memorization = load_settings(preset="resnet20-cifar10-memorization-90")
    assert [learning_rate(memorization, e) for e in (64, 65, 125, 185)] == pytest.approx([0.1, 0.01, 0.001, 0.0001])
    imagenet = load_settings(preset="resnet50-imagenet-90")
    # 5 linear warm-up epochs to 0.256, then a cosine that reaches 0 at epoch 100
    assert learning_rate(imagenet, 2.5) == pytest.approx(0.128)
    assert learning_rate(imagenet, 5) == pytest.approx(0.256)
    assert learning_rate(imagenet, 52.5) == pytest.approx(0.128)
    assert learning_rate(imagenet, 100) == pytest.approx(0.0, abs=1e-12)
    long = load_settings(preset="resnet50-imagenet-90-uniform-200ep")
    assert learning_rate(long, 102.5) == pytest.approx(0.128)


def test_gmp_presets_ramp_cubically_and_hold():
    for name, target in (("resnet50-imagenet-gmp-80", 0.8), ("resnet50-imagenet-gmp-90", 0.9)):
        phases = _dry_run(name)["phases"]
        assert phases[0] == {"start": 0, "end": 1, "kind": "dense", "sparsity": 0.0}
        ramp = {p["start"]: p["sparsity"] for p in phases if p["kind"] == "sparse"}
        for epoch, level in ramp.items():
            progress = min((epoch - 1) / 39, 1.0)
            assert level == pytest.approx(target + (0.05 - target) * (1 - progress) ** 3, abs=1e-6)
        assert ramp[1] == pytest.approx(0.05) and ramp[40] == pytest.approx(target)
        assert list(ramp.values()) == sorted(ramp.values())
        assert phases[-1] == {"start": 40, "end": 100, "kind": "sparse", "sparsity": target}
        config = load_settings(preset=name)
        assert config.schedule.method == "gmp" and config.schedule.prune_every == 5
        assert not config.schedule.reset_momentum


def test_ftdense_continues_from_the_checkpoint_epoch():
    config = load_settings(preset="resnet50-imagenet-90-ftdense")
    assert config.schedule.start_epoch == "checkpoint" and config.schedule.method == "dense"
    # the AC/DC run it continues uses the same cosine, so the LR carries on unchanged
    acdc = load_settings(preset="resnet50-imagenet-90")
    assert [learning_rate(config, e) for e in (85, 90.5, 99)] == [learning_rate(acdc, e) for e in (85, 90.5, 99)]


def test_preset_files_open_with_their_command_and_source():
    for name in preset_names():
        text = preset_path(name).read_text()
        lines = text.splitlines()
        assert re.match(rf"# acdc train( --preset {re.escape(name)}\b|\s)", lines[0]), name
        if name in EXPECTED:
            assert "--data-dir" in lines[0], name
            header = "\n".join(line for line in lines if line.startswith("#"))
            assert "IST-DASLab/ACDC" in header, name
            if EXPECTED[name][5] is not None:
                assert f"{100 * EXPECTED[name][5]:.2f}".rstrip("0") in header, name


def test_presets_command_lists_every_preset():
    result = CliRunner().invoke(app, ["presets", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert set(EXPECTED) <= set(rows)
    assert rows["resnet50-imagenet-2of4"]["structure"] == "2:4" and rows["resnet50-imagenet-2of4"]["sparsity"] == 0.5
    assert rows["resnet50-imagenet-90-uniform"]["scope"] == "uniform"
    assert rows["wrn-cifar100-dense"]["sparsity"] == 0.0 and rows["wrn-cifar100-dense"]["paper_top1"] == 0.79
    table = CliRunner().invoke(app, ["presets"], env={"COLUMNS": "160"})
    assert table.exit_code == 0 and "resnet50-imagenet-95-uniform-200ep" in table.stdout and "75.03 %" in table.stdout
    shown = CliRunner().invoke(app, ["presets", "show", "wrn-cifar100-95-dense13", "--json"])
    assert json.loads(shown.stdout) == _dry_run("wrn-cifar100-95-dense13")


# ----------------------------------------------------------------------------------------------------------------
# the layers each preset's rules select on the real architecture


pytestmark = pytest.mark.usefixtures("one_thread")


def _sparsifier(preset: str) -> Sparsifier:
    s = load_settings(preset=preset)
    model = models.create(s.model.name, num_classes=10)
    return Sparsifier(model, s.sparsity.include, s.sparsity.exclude, s.sparsity.scope, s.sparsity.structure)


def _selected(sparsifier: Sparsifier) -> set[str]:
    return {r.module for r in sparsifier.rules if r.selected}


def test_global_presets_prune_every_conv_and_linear():
    sparsifier = _sparsifier("resnet50-imagenet-90")
    assert _selected(sparsifier) == {r.module for r in sparsifier.rules} and len(sparsifier.rules) == 54
    assert {"conv1", "fc", "layer1.0.downsample.0"} <= _selected(sparsifier)


@pytest.mark.parametrize("preset", ["resnet50-imagenet-90-no-conv1-fc", "resnet50-imagenet-95-uniform-200ep"])
def test_conv1_and_fc_stay_dense(preset):
    sparsifier = _sparsifier(preset)
    reasons = {r.module: r.reason for r in sparsifier.rules}
    assert reasons["conv1"] == reasons["fc"] == "excluded"
    assert len(_selected(sparsifier)) == 52


def test_uniform_prunes_every_selected_layer_to_the_target():
    s = load_settings(preset="resnet50-imagenet-90-uniform")
    model = models.create("resnet20", num_classes=10)  # resnet20 has conv1 and fc too: the same rules apply
    sparsifier = Sparsifier(model, s.sparsity.include, s.sparsity.exclude, s.sparsity.scope, s.sparsity.structure)
    sparsifier.compress(s.sparsity.target)
    per_layer = sparsifier.stats()["per_layer"]
    assert set(per_layer) == {f"{m}.weight" for m in _selected(sparsifier)} and "conv1.weight" not in per_layer
    for name, level in per_layer.items():
        n = sparsifier.params[name].numel()
        assert level == pytest.approx(round(0.9 * n) / n), name


def test_mobilenet_no_conv1_dw_prunes_pointwise_and_fc_only():
    sparsifier = _sparsifier("mobilenet-imagenet-75-no-conv1-dw")
    assert _selected(sparsifier) == {f"model.{k}.3" for k in range(1, 14)} | {"fc"}
    reasons = {r.module: r.reason for r in sparsifier.rules}
    assert reasons["model.0.0"] == reasons["model.5.0"] == "not included"
    assert len(_selected(_sparsifier("mobilenet-imagenet-75"))) == 28


def test_2of4_preset_masks_on_resnet50():
    sparsifier = _sparsifier("resnet50-imagenet-2of4")
    reasons = {r.module: r.reason for r in sparsifier.rules}
    # the 3-channel stem cannot be 2:4: left dense by rule and reported as such
    assert reasons.pop("conv1") == "input channels not a multiple of 4"
    assert set(reasons.values()) == {"selected"} and len(reasons) == 53
    sparsifier.compress(0.5)
    for name, mask in sparsifier.masks.items():
        groups = mask.permute(0, 2, 3, 1) if mask.dim() == 4 else mask
        kept = groups.reshape(*groups.shape[:-1], -1, 4).sum(-1)
        assert torch.all(kept == 2), name
    assert math.isclose(sparsifier.stats()["sparsity"], 0.5, abs_tol=1e-6)
