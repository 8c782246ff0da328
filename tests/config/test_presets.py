"""Every preset against the reference it reproduces (IST-DASLab/ACDC HEAD ac53210, configs/neurips/*.yaml and the
run_*.sh scripts that use them): prune/restore epochs, LR of every epoch, momentum resets, optimizer, batch size,
and the layers its sparsity rules select on the real architecture. Expected values are the reference's, read from the
files named beside them."""

import functools
import json
import math
import re

import pytest
import torch
from cli_helpers import invoke_json
from typer.testing import CliRunner

from acdc_cli import models
from acdc_cli.cli.app import app
from acdc_cli.config import load_settings, preset_names, preset_path
from acdc_cli.sparsity.schedule import learning_rate
from acdc_cli.sparsity.sparsifier import Sparsifier

# ----------------------------------------------------------------------------------------------------------------
# prune / restore epochs: each YAML's pruner and recycler `epochs: [start, freq, end]`, expanded as the reference's
# policies/manager.py (schedule_prunes_and_recycles) expands them: range(start, end, freq), and an epoch that already
# prunes does not also restore.


def _expand(pruners: list[list[int]], recyclers: list[list[int]]) -> tuple[list[int], list[int]]:
    prune = sorted({e for start, freq, end in pruners for e in range(start, end, freq)})
    restore = sorted({e for start, freq, end in recyclers for e in range(start, end, freq)} - set(prune))
    return prune, restore


# iht_imagenet_resnet50_insta_cosinelr_s{50,80,90,95,98}_ep100(_no_conv1_fc,_unif).yaml,
# iht_imagenet_resnet50_cosinelr_sp_2_4_ep100.yaml, iht_imagenet_mobilenet_insta_cosinelr_s{75,90}_ep100(_no_conv1_dw)
IMAGENET_100 = (100, *_expand([[10, 10, 71], [85, 20, 100]], [[15, 10, 66], [75, 20, 86]]))
# iht_imagenet_resnet50_insta_cosinelr_s90_ep150.yaml
IMAGENET_150 = (150, *_expand([[10, 10, 121], [135, 20, 150]], [[15, 10, 116], [125, 20, 134]]))
# iht_imagenet_resnet50_insta_cosinelr_s{90,95}_ep200_unif.yaml
IMAGENET_200 = (200, *_expand([[10, 10, 171], [185, 20, 200]], [[15, 10, 166], [175, 20, 186]]))
# iht_cifar100_wideresnet_steplr_freq20_s{50,75,90,95}.yaml
WRN_200 = (200, *_expand([[10, 40, 171]], [[30, 40, 161]]))
# iht_cifar100_wideresnet_steplr_dense13_s{50,75,90,95}.yaml (run for 225 epochs)
DENSE13_225 = (225, *_expand([[10, 33, 180]], [[30, 33, 170]]))
# iht_cifar10_resnet20_unstructured_insta_prune_freq20_{50,75,90,95}_constant.yaml
RESNET20_200 = (200, *_expand([[10, 40, 171]], [[30, 40, 151]]))
# imagenet_resnet50_gmp_sp{80,90}.yaml: mask steps range(1, 40, 5); acdc adds the step at 40 that reaches the target
GMP_100 = (100, *_expand([[1, 5, 40]], []))


def _dense(epochs):
    return (epochs, [], [])


def test_the_reference_epochs_expand_as_paper_md_states():
    assert IMAGENET_100[1:] == ([10, 20, 30, 40, 50, 60, 70, 85], [15, 25, 35, 45, 55, 65, 75])
    assert WRN_200[1:] == RESNET20_200[1:] == ([10, 50, 90, 130, 170], [30, 70, 110, 150])
    assert DENSE13_225[1:] == ([10, 43, 76, 109, 142, 175], [30, 63, 96, 129, 162])
    assert GMP_100[1] == [1, 6, 11, 16, 21, 26, 31, 36]


# ----------------------------------------------------------------------------------------------------------------
# the LR each epoch trains with in the reference: its schedulers (torch's ExponentialLR, optimization/lr_schedulers.py
# CosineLR) stepped as policies/trainers.py TrainingPolicy.on_epoch_end steps them, run once and read off

# ExponentialLR(gamma 0.1), lr_scheduler.epochs [75, 40, 170]: stepped at the end of epochs 75, 115, 155
WRN_LR_FROM = {0: 0.08, 76: 0.008, 116: 0.0008, 156: 0.00008}
# ExponentialLR(gamma 0.1), lr_scheduler.epochs [65, 60, 200]: stepped at the end of epochs 65, 125, 185
RESNET20_LR_FROM = {0: 0.1, 66: 0.01, 126: 0.001, 186: 0.0001}
# CosineLR(warmup_length 5, end_epoch T), lr 0.256, stepped at the end of every epoch
_WARMUP = {0: 0.0512, 1: 0.1024, 2: 0.1536, 3: 0.2048, 4: 0.256, 5: 0.256}
COSINE_LR = {
    100: {**_WARMUP, 6: 0.2559300169396385, 50: 0.13857015622045857, 75: 0.04130795883190517,
          84: 0.01750317043743054, 85: 0.015427359845569413, 99: 6.998306036146573e-05},
    150: {**_WARMUP, 6: 0.255969958146366, 50: 0.19983194436638496, 75: 0.13492978029893346,
          85: 0.10729190444124612, 135: 0.0067003940886013, 149: 3.004185363403167e-05},
    200: {**_WARMUP, 6: 0.255983388796336, 50: 0.22380937576590093, 99: 0.13521378354632158,
          185: 0.0037194473694653427, 199: 1.661120366404134e-05},
}


def _steps(points: dict[int, float], epochs: int) -> list[float]:
    return [points[max(k for k in points if k <= e)] for e in range(epochs)]


IMAGENET_OPTIM = {"lr": 0.256, "momentum": 0.875, "nesterov": False, "weight_decay": 3.051757813e-5,
                  "lr_schedule": "cosine", "lr_warmup_epochs": 5, "batch_size": 256}
WRN_OPTIM = {"lr": 0.08, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "lr_schedule": "step",
             "milestones": [76, 116, 156], "gamma": 0.1, "batch_size": 128}
RESNET20_OPTIM = {"lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4, "lr_schedule": "step",
                  "milestones": [66, 126, 186], "gamma": 0.1, "batch_size": 128}

# ----------------------------------------------------------------------------------------------------------------
# the layers each YAML lists (its pruners' `modules`), written compactly and counted as the YAML counts them

RESNET50_CONVS = (
    [f"layer{s}.{b}.conv{c}" for s, blocks in ((1, 3), (2, 4), (3, 6), (4, 3)) for b in range(blocks)
     for c in (1, 2, 3)] + [f"layer{s}.0.downsample.0" for s in (1, 2, 3, 4)])
RESNET50_ALL = {"conv1", "fc", *RESNET50_CONVS}  # the 54 modules of the global / 2:4 / GMP configs
RESNET50_NO_CONV1_FC = set(RESNET50_CONVS)  # the 52 of the _no_conv1_fc and _unif configs
WRN_ALL = ({"conv1", "linear"} | {f"layer{s}.{b}.conv{c}" for s in (1, 2, 3) for b in range(4) for c in (1, 2)}
           | {f"layer{s}.0.shortcut.0" for s in (1, 2, 3)})  # the 29 of every WRN config
RESNET20_20 = {"conv1", "fc"} | {f"layer{s}.{b}.conv{c}" for s in (1, 2, 3) for b in range(3) for c in (1, 2)}
RESNET20_22 = RESNET20_20 | {"layer2.0.downsample.0", "layer3.0.downsample.0"}  # only the 50 % config
MOBILENET_ALL = {"model.0.0", "fc"} | {f"model.{k}.{i}" for k in range(1, 14) for i in (0, 3)}  # 28
MOBILENET_POINTWISE = {"fc"} | {f"model.{k}.3" for k in range(1, 14)}  # the 14 of the _no_conv1_dw configs


def test_layer_lists_have_the_yaml_counts():
    counts = [len(s) for s in (RESNET50_ALL, RESNET50_NO_CONV1_FC, WRN_ALL, RESNET20_20, RESNET20_22,
                               MOBILENET_ALL, MOBILENET_POINTWISE)]
    assert counts == [54, 52, 29, 20, 22, 28, 14]


# ----------------------------------------------------------------------------------------------------------------
# every preset: model, dataset, (epochs, P, R), optimizer, LR per epoch, target sparsity, layers, paper top-1, source

RESNET50_PAPER = {80: 0.7645, 90: 0.7503, 95: 0.7314, 98: 0.6848}  # the reference README's ResNet-50 table
EXPECTED = {
    **{f"wrn-cifar100-{s}": ("wrn-28-10", "cifar100", WRN_200, WRN_OPTIM, _steps(WRN_LR_FROM, 200), s / 100, WRN_ALL,
                             {95: 0.782}.get(s), f"iht_cifar100_wideresnet_steplr_freq20_s{s}.yaml")
       for s in (50, 75, 90, 95)},
    **{f"wrn-cifar100-{s}-dense13": ("wrn-28-10", "cifar100", DENSE13_225, WRN_OPTIM, _steps(WRN_LR_FROM, 225),
                                     s / 100, WRN_ALL, None, f"iht_cifar100_wideresnet_steplr_dense13_s{s}.yaml")
       for s in (50, 75, 90, 95)},
    "wrn-cifar100-dense": ("wrn-28-10", "cifar100", _dense(200), WRN_OPTIM, _steps(WRN_LR_FROM, 200), 0.0, None, 0.79,
                           "iht_cifar100_wideresnet_steplr_freq20_s95.yaml"),
    **{f"resnet20-cifar10-memorization-{s}": (
        "resnet20", "cifar10", RESNET20_200, RESNET20_OPTIM, _steps(RESNET20_LR_FROM, 200), s / 100,
        RESNET20_22 if s == 50 else RESNET20_20, None,
        f"iht_cifar10_resnet20_unstructured_insta_prune_freq20_{s}_constant.yaml") for s in (50, 75, 90, 95)},
    **{f"resnet50-imagenet-{s}": ("resnet50", "imagenet", IMAGENET_100, IMAGENET_OPTIM, COSINE_LR[100], s / 100,
                                  RESNET50_ALL, RESNET50_PAPER.get(s),
                                  f"iht_imagenet_resnet50_insta_cosinelr_s{s}_ep100.yaml")
       for s in (50, 80, 90, 95, 98)},
    **{f"resnet50-imagenet-{s}-no-conv1-fc": (
        "resnet50", "imagenet", IMAGENET_100, IMAGENET_OPTIM, COSINE_LR[100], s / 100, RESNET50_NO_CONV1_FC, None,
        f"iht_imagenet_resnet50_insta_cosinelr_s{s}_ep100_no_conv1_fc.yaml") for s in (80, 90, 95, 98)},
    **{f"resnet50-imagenet-{s}-uniform": ("resnet50", "imagenet", IMAGENET_100, IMAGENET_OPTIM, COSINE_LR[100],
                                          s / 100, RESNET50_NO_CONV1_FC, top1,
                                          f"iht_imagenet_resnet50_insta_cosinelr_s{s}_ep100_unif.yaml")
       for s, top1 in ((90, 0.7504), (95, 0.7328))},
    **{f"resnet50-imagenet-{s}-uniform-200ep": ("resnet50", "imagenet", IMAGENET_200, IMAGENET_OPTIM, COSINE_LR[200],
                                                s / 100, RESNET50_NO_CONV1_FC, top1,
                                                f"iht_imagenet_resnet50_insta_cosinelr_s{s}_ep200_unif.yaml")
       for s, top1 in ((90, 0.7609), (95, 0.7429))},
    "resnet50-imagenet-90-150ep": ("resnet50", "imagenet", IMAGENET_150, IMAGENET_OPTIM, COSINE_LR[150], 0.9,
                                   RESNET50_ALL, None, "iht_imagenet_resnet50_insta_cosinelr_s90_ep150.yaml"),
    # the 3-channel stem is left dense by rule (its input channels are not a multiple of 4)
    "resnet50-imagenet-2of4": ("resnet50", "imagenet", IMAGENET_100, IMAGENET_OPTIM, COSINE_LR[100], 0.5,
                               RESNET50_ALL - {"conv1"}, None, "iht_imagenet_resnet50_cosinelr_sp_2_4_ep100.yaml"),
    # the optimizer and LR are NOT the GMP YAML's (lr 0.005, momentum 0.9, wd 1e-4, ExponentialLR gamma 0.6): the
    # presets keep the AC/DC runs' cosine schedule on purpose, as their header states; only the mask steps are the
    # YAML's
    **{f"resnet50-imagenet-gmp-{s}": ("resnet50", "imagenet", (100, GMP_100[1] + [40], []), IMAGENET_OPTIM,
                                      COSINE_LR[100], s / 100, RESNET50_ALL, None,
                                      f"imagenet_resnet50_gmp_sp{s}.yaml") for s in (80, 90)},
    "resnet50-imagenet-dense": ("resnet50", "imagenet", _dense(100), IMAGENET_OPTIM, COSINE_LR[100], 0.0, None, None,
                                "imagenet_resnet50_best_dense.yaml"),
    **{f"resnet50-imagenet-{s}-ftdense": ("resnet50", "imagenet", _dense(100), IMAGENET_OPTIM, COSINE_LR[100], 0.0,
                                          None, None, "iht_imagenet_resnet50_insta_cosinelr_ep100_ftdense.yaml")
       for s in (80, 90)},
    "resnet50-imagenet-90-150ep-ftdense": ("resnet50", "imagenet", _dense(150), IMAGENET_OPTIM, COSINE_LR[150], 0.0,
                                           None, None, "iht_imagenet_resnet50_insta_cosinelr_s90_ep150_ftdense.yaml"),
    "resnet50-imagenet-90-uniform-200ep-ftdense": (
        "resnet50", "imagenet", _dense(200), IMAGENET_OPTIM, COSINE_LR[200], 0.0, None, None,
        "iht_imagenet_resnet50_insta_cosinelr_s90_ep200_ftdense.yaml"),
    **{f"mobilenet-imagenet-{s}": ("mobilenet-v1", "imagenet", IMAGENET_100, IMAGENET_OPTIM, COSINE_LR[100], s / 100,
                                   MOBILENET_ALL, top1, f"iht_imagenet_mobilenet_insta_cosinelr_s{s}_ep100.yaml")
       for s, top1 in ((75, 0.7041), (90, 0.6624))},
    **{f"mobilenet-imagenet-{s}-no-conv1-dw": (
        "mobilenet-v1", "imagenet", IMAGENET_100, IMAGENET_OPTIM, COSINE_LR[100], s / 100, MOBILENET_POINTWISE, None,
        f"iht_imagenet_mobilenet_insta_cosinelr_s{s}_ep100_no_conv1_dw.yaml") for s in (75, 90)},
    **{f"mobilenet-imagenet-{s}-ftdense": ("mobilenet-v1", "imagenet", _dense(100), IMAGENET_OPTIM, COSINE_LR[100],
                                           0.0, None, None, "iht_imagenet_mobilenet_insta_cosinelr_ep100_ftdense.yaml")
       for s in ("75", "90", "90-no-conv1-dw")},
    "mobilenet-imagenet-dense": ("mobilenet-v1", "imagenet", _dense(100), IMAGENET_OPTIM, COSINE_LR[100], 0.0, None,
                                 None, "imagenet_mobilenet_cosinelr_ep100_dense.yaml"),
}

# the 39 files of configs/neurips at ac53210: each is the source of at least one preset
REFERENCE_CONFIGS = (
    [f"iht_cifar100_wideresnet_steplr_{k}_s{s}.yaml" for k in ("dense13", "freq20") for s in (50, 75, 90, 95)]
    + [f"iht_cifar10_resnet20_unstructured_insta_prune_freq20_{s}_constant.yaml" for s in (50, 75, 90, 95)]
    + ["iht_imagenet_mobilenet_insta_cosinelr_ep100_ftdense.yaml"]
    + [f"iht_imagenet_mobilenet_insta_cosinelr_s{s}_ep100{v}.yaml" for s in (75, 90) for v in ("", "_no_conv1_dw")]
    + ["iht_imagenet_resnet50_cosinelr_sp_2_4_ep100.yaml", "iht_imagenet_resnet50_insta_cosinelr_ep100_ftdense.yaml",
       "iht_imagenet_resnet50_insta_cosinelr_s50_ep100.yaml"]
    + [f"iht_imagenet_resnet50_insta_cosinelr_s{s}_ep100{v}.yaml" for s in (80, 90, 95, 98)
       for v in ("", "_no_conv1_fc")]
    + [f"iht_imagenet_resnet50_insta_cosinelr_s{s}_ep100_unif.yaml" for s in (90, 95)]
    + ["iht_imagenet_resnet50_insta_cosinelr_s90_ep150.yaml",
       "iht_imagenet_resnet50_insta_cosinelr_s90_ep150_ftdense.yaml",
       "iht_imagenet_resnet50_insta_cosinelr_s90_ep200_ftdense.yaml"]
    + [f"iht_imagenet_resnet50_insta_cosinelr_s{s}_ep200_unif.yaml" for s in (90, 95)]
    + ["imagenet_mobilenet_cosinelr_ep100_dense.yaml", "imagenet_resnet50_best_dense.yaml"]
    + [f"imagenet_resnet50_gmp_sp{s}.yaml" for s in (80, 90)]
)


@functools.cache
def _dry_run(name: str) -> dict:
    return invoke_json("train", "--preset", name, "--dry-run")


def test_every_preset_has_a_reference_and_every_reference_config_a_preset():
    names = set(preset_names())
    assert set(EXPECTED) <= names
    # a new preset must come with its reference values here
    assert names - set(EXPECTED) == {"quickstart"}
    assert len(REFERENCE_CONFIGS) == 39
    assert set(REFERENCE_CONFIGS) == {source for *_, source in EXPECTED.values()}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_plan_is_the_references_epoch_by_epoch(name):
    model, dataset, (epochs, prune, restore), optim, lrs, sparsity, _, paper, _ = EXPECTED[name]
    resolved = _dry_run(name)
    config, phases, plan = resolved["config"], resolved["phases"], resolved["epochs"]
    assert [e["epoch"] for e in plan] == list(range(epochs)) and config["schedule"]["epochs"] == epochs
    starts = [e["epoch"] for e in plan if e["epoch"] == 0 or e["phase"] != plan[e["epoch"] - 1]["phase"]
              or e["sparsity"] != plan[e["epoch"] - 1]["sparsity"]]
    assert [e for e in starts if plan[e]["phase"] == "sparse"] == prune
    assert [e for e in starts if e > 0 and plan[e]["phase"] == "dense"] == restore
    # momentum is zeroed exactly where the reference restores (--reset_momentum_after_recycling in every run script)
    assert [e["epoch"] for e in plan if e["reset_momentum"]] == restore
    # the LR every epoch starts with
    expected_lr = lrs if isinstance(lrs, list) else None
    if expected_lr is not None:
        assert [e["lr"] for e in plan] == pytest.approx(expected_lr, rel=1e-12)
    else:
        for epoch, value in lrs.items():
            assert plan[epoch]["lr"] == pytest.approx(value, rel=1e-12), epoch
    # the phase table agrees, and the run ends in its final compressed phase at the target (dense runs: dense)
    assert phases[0]["start"] == 0 and phases[-1]["end"] == epochs
    assert all(a["end"] == b["start"] for a, b in zip(phases, phases[1:]))
    assert phases[-1]["sparsity"] == pytest.approx(sparsity) == plan[-1]["sparsity"]
    assert config["model"]["name"] == model and config["data"]["name"] == dataset
    assert config["data"]["batch_size"] == optim["batch_size"]
    for key, value in optim.items():
        if key != "batch_size":
            assert config["optim"][key] == pytest.approx(value), key
    assert config["optim"]["lr_per_step"] is False and config["schedule"]["reset_momentum"] == "restore"
    assert config["optim"]["cosine_epochs"] is None and config["optim"]["label_smoothing"] == 0.0
    assert config["paper_top1"] == paper


def test_lr_between_epoch_starts_is_the_epochs():
    """Set once per epoch: a fractional epoch (the training loop's epoch + step / steps) gets its epoch's LR."""
    imagenet = load_settings(preset="resnet50-imagenet-90")
    assert [learning_rate(imagenet, e) for e in (0.0, 0.5, 0.999)] == [0.0512] * 3
    assert learning_rate(imagenet, 75.6) == pytest.approx(COSINE_LR[100][75], rel=1e-12)
    wrn = load_settings(preset="wrn-cifar100-95")
    assert learning_rate(wrn, 75.99) == pytest.approx(0.08) and learning_rate(wrn, 76) == pytest.approx(0.008)
    per_step = load_settings(preset="resnet50-imagenet-90", overrides=["optim.lr_per_step=true"])
    assert learning_rate(per_step, 0.5) == pytest.approx(0.0256) and learning_rate(per_step, 5) == pytest.approx(0.256)


def test_gmp_presets_ramp_cubically_and_hold():
    for name, target in (("resnet50-imagenet-gmp-80", 0.8), ("resnet50-imagenet-gmp-90", 0.9)):
        phases = _dry_run(name)["phases"]
        assert phases[0] == {"start": 0, "end": 1, "kind": "dense", "sparsity": 0.0}
        ramp = {p["start"]: p["sparsity"] for p in phases if p["kind"] == "sparse"}
        # GradualPruner._polynomial_schedule (policies/pruners.py): degree 3 between epochs 1 and 40
        for epoch, level in ramp.items():
            progress = min((epoch - 1) / 39, 1.0)
            assert level == pytest.approx(target + (0.05 - target) * (1 - progress) ** 3, abs=1e-6)
        assert ramp[1] == pytest.approx(0.05) and ramp[40] == pytest.approx(target)
        assert list(ramp.values()) == sorted(ramp.values())
        assert phases[-1] == {"start": 40, "end": 100, "kind": "sparse", "sparsity": target}
        assert load_settings(preset=name).schedule.prune_every == 5


@pytest.mark.parametrize("ftdense, source", [
    ("resnet50-imagenet-80-ftdense", "resnet50-imagenet-80"),
    ("resnet50-imagenet-90-ftdense", "resnet50-imagenet-90"),
    ("resnet50-imagenet-90-150ep-ftdense", "resnet50-imagenet-90-150ep"),
    ("resnet50-imagenet-90-uniform-200ep-ftdense", "resnet50-imagenet-90-uniform-200ep"),
    ("mobilenet-imagenet-75-ftdense", "mobilenet-imagenet-75"),
    ("mobilenet-imagenet-90-ftdense", "mobilenet-imagenet-90"),
    ("mobilenet-imagenet-90-no-conv1-dw-ftdense", "mobilenet-imagenet-90-no-conv1-dw"),
])
def test_ftdense_continues_its_source_run(ftdense, source):
    config, run = load_settings(preset=ftdense), load_settings(preset=source)
    assert config.schedule.start_epoch == "checkpoint" and config.schedule.method == "dense"
    assert config.model.name == run.model.name and config.schedule.epochs == run.schedule.epochs
    # the reference resumes the scheduler's state: the LR carries on as in the source run
    epochs = range(run.schedule.epochs - 20, run.schedule.epochs)
    assert [learning_rate(config, e) for e in epochs] == [learning_rate(run, e) for e in epochs]
    assert "--from RUN/best_dense.safetensors" in preset_path(ftdense).read_text().splitlines()[0]


def test_preset_files_open_with_their_command_source_and_differences():
    for name in preset_names():
        lines = preset_path(name).read_text().splitlines()
        assert re.match(rf"# acdc train( --preset {re.escape(name)}\b|\s)", lines[0]), name
        if name not in EXPECTED:
            continue
        assert "--data-dir" in lines[0], name
        header = " ".join(line.lstrip("# ") for line in lines if line.startswith("#"))
        assert "IST-DASLab/ACDC" in header and f"configs/neurips/{EXPECTED[name][-1]}" in header, name
        assert "Differences from the reference kept on purpose:" in header, name
        paper = EXPECTED[name][7]
        if paper is not None:
            assert f"{100 * paper:.2f}".rstrip("0") in header, name


def test_wrn_dropout_and_memorization_data_are_the_references():
    """models/__init__.py builds Wide_ResNet(28, 10, 0.3, 100): dropout 0.3 in every WRN preset.
    run_cifar10_randomlabels_iht_no_da.sh passes --num_random_labels=1000, and policies/manager.py turns data
    augmentation off whenever num_random_labels > 0: the memorization presets give 1000 images random labels and do
    not augment; no other preset does either."""
    for name in EXPECTED:
        settings = load_settings(preset=name)
        if settings.model.name == "wrn-28-10":
            assert settings.model.dropout == 0.3, name
        memorization = "memorization" in name
        assert settings.data.random_labels == (1000 if memorization else 0), name
        assert settings.data.augment is not memorization, name


def test_paper_presets_train_on_every_image_and_pin_no_worker_count():
    """The reference trains on the whole training set and measures the test split every epoch
    (policies/manager.py), so data.val_size = 0 is no difference to keep and no header lists one; the loader workers
    are the machine's business (the reference's run_imagenet_*.sh pass --workers=20 for their machine), so no preset
    pins data.num_workers."""
    for name in EXPECTED:
        settings = load_settings(preset=name)
        assert settings.data.val_size == 0 and settings.data.num_workers is None, name
        header = [line for line in preset_path(name).read_text().splitlines() if line.startswith("#")]
        assert not [line for line in header if line.startswith("# - data:")], name


def test_presets_command_lists_every_preset():
    result = CliRunner().invoke(app, ["presets", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)["presets"]}
    assert set(EXPECTED) <= set(rows)
    assert rows["resnet50-imagenet-2of4"]["structure"] == "2:4" and rows["resnet50-imagenet-2of4"]["sparsity"] == 0.5
    assert rows["resnet50-imagenet-90-uniform"]["scope"] == "uniform"
    assert rows["wrn-cifar100-dense"]["sparsity"] == 0.0 and rows["wrn-cifar100-dense"]["paper_top1"] == 0.79
    table = CliRunner().invoke(app, ["presets"], env={"COLUMNS": "160"})
    assert table.exit_code == 0 and "resnet50-imagenet-95-uniform-200ep" in table.stdout and "75.03 %" in table.stdout
    shown = CliRunner().invoke(app, ["presets", "show", "wrn-cifar100-95-dense13", "--json"])
    assert json.loads(shown.stdout) == _dry_run("wrn-cifar100-95-dense13")
    text = CliRunner().invoke(app, ["presets", "show", "wrn-cifar100-95"], env={"COLUMNS": "200"})
    assert "momentum zeroed at the start of epochs: 30, 70, 110, 150 (schedule.reset_momentum = restore)" in text.stdout
    assert "LR set once per epoch; at the start of epochs 0: 0.08, 1: 0.08, 2: 0.08, ..., 199: 8e-05" in text.stdout


# ----------------------------------------------------------------------------------------------------------------
# the layers each preset's rules select on the real architecture


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def _model(name: str) -> torch.nn.Module:
    return models.create(name, num_classes=10)


def _sparsifier(preset: str) -> Sparsifier:
    s = load_settings(preset=preset)
    return Sparsifier(_model(s.model.name), s.sparsity.include, s.sparsity.exclude, s.sparsity.scope,
                      s.sparsity.structure)


def _selected(sparsifier: Sparsifier) -> set[str]:
    return {r.module for r in sparsifier.rules if r.selected}


@pytest.mark.parametrize("name", sorted(n for n, e in EXPECTED.items() if e[6] is not None))
def test_preset_prunes_exactly_the_layers_of_its_yaml(name):
    assert _selected(_sparsifier(name)) == EXPECTED[name][6]


def test_layers_kept_dense_say_why():
    reasons = {r.module: r.reason for r in _sparsifier("resnet50-imagenet-90-no-conv1-fc").rules}
    assert reasons["conv1"] == reasons["fc"] == "excluded"
    reasons = {r.module: r.reason for r in _sparsifier("resnet20-cifar10-memorization-90").rules}
    assert reasons["layer2.0.downsample.0"] == reasons["layer3.0.downsample.0"] == "excluded"
    reasons = {r.module: r.reason for r in _sparsifier("mobilenet-imagenet-75-no-conv1-dw").rules}
    assert reasons["model.0.0"] == reasons["model.5.0"] == "not included"


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
