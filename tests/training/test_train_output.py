"""Watching a real run: a WRN-10-2 on a CIFAR-format folder, its output piped to a file as in a batch job, and its
TensorBoard events read back the way TensorBoard reads them."""

import os
import re
import subprocess
import sys
import tomllib

import pytest
from cli_helpers import sets
from data_helpers import write_cifar10
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from acdc_cli.config import load_settings
from acdc_cli.files.jsonio import read_jsonl
from acdc_cli.models import create
from acdc_cli.sparsity.rules import prunable_modules
from acdc_cli.sparsity.schedule import epoch_plan

# 250 training images less 50 held out: 3 steps of 64 per epoch (the partial batch is dropped)
STEPS = 3
# 4 epochs: dense 0, compressed 1 at 80 %, decompressed 2, compressed 3 (its masks against epoch 1's: a mask change)
EPOCHS = 4
SETTINGS = ["data.name=cifar10", "model.name=wrn-10-2", "data.val_size=50", "data.batch_size=64",
            "sparsity.target=0.8", f"schedule.epochs={EPOCHS}", "schedule.warmup_epochs=1",
            "schedule.compressed_epochs=1", "schedule.decompressed_epochs=1", "schedule.final_compressed_epochs=1",
            "runtime.deterministic=true", "runtime.threads=1",
            "log.progress_interval_s=0", "log.every_steps=1"]


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory):
    """`acdc train ... > log 2>&1` of a WRN-10-2 on a CIFAR-10 folder; returns (run dir, the log's text)."""
    root = tmp_path_factory.mktemp("piped")
    data = write_cifar10(root / "cifar")
    run, log = root / "run", root / "train.log"
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-m", "acdc_cli", "train", "--out", str(run), "--data-dir", str(data),
                               "--device", "cpu", *sets(*SETTINGS)], stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "COLUMNS": "80"}, timeout=600, check=False)
    text = log.read_text()
    assert done.returncode == 0, text
    return run, text


def test_a_piped_run_prints_progress_lines_inside_every_epoch(piped_run):
    run, text = piped_run
    assert "\x1b" not in text and "\r" not in text  # no colour, no cursor movement: a plain log
    lines = text.splitlines()
    rows = [i for i, line in enumerate(lines) if re.match(r"^\s+\d+ +(dense|sparse) ", line)]
    assert len(rows) == EPOCHS
    starts = [0, *[i + 1 for i in rows[:-1]]]
    for epoch, (start, end) in enumerate(zip(starts, rows)):
        progress = [line for line in lines[start:end] if line.startswith(f"epoch {epoch}  step ")]
        # progress_interval_s = 0: one line after every step, each with img/s, the loss so far and the time left
        assert [int(re.search(r"step (\d+)/3 ", line).group(1)) for line in progress] == [1, 2, 3], lines[start:end]
        for line in progress:
            assert re.fullmatch(rf"epoch {epoch}  step \d/3  \d+ img/s  loss \d+\.\d{{4}}  eta \d+:\d\d:\d\d", line)
    # the last line of an epoch shows the epoch's mean loss, which its row shows too
    metrics = read_jsonl(run / "metrics.jsonl")
    for epoch, row_at in enumerate(rows):
        last = lines[row_at - 1] if epoch else [x for x in lines[:row_at] if x.startswith("epoch 0  step 3/3")][0]
        assert f"loss {metrics[epoch]['train_loss']:.4f}" in last


def _events(run):
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    return acc


def test_tensorboard_has_grouped_tags_per_step_loss_and_lr(piped_run):
    run, _ = piped_run
    acc = _events(run)
    tags = set(acc.Tags()["scalars"])
    grouped = {"train/loss", "train/top1", "train/lr", "val/loss", "val/top1", "val/top5", "sparsity/overall",
               "sparsity/target", "sparsity/mask_change", "perf/img_per_s"}
    assert grouped <= tags
    layers = {f"sparsity/layer/{name}.weight" for name, _ in prunable_modules(create("wrn-10-2", num_classes=10))}
    assert {t for t in tags if t.startswith("sparsity/layer/")} == layers
    assert not [t for t in tags if t.startswith("acdc/")]
    rows = read_jsonl(run / "metrics.jsonl")
    # epoch rows at the step that ends the epoch
    assert [(e.step, e.value) for e in acc.Scalars("val/top1")] == [
        (STEPS * (r["epoch"] + 1), pytest.approx(r["val_top1"])) for r in rows]
    # the FLOPs of each row under flops/, by name
    for key, tag in (("inference_flops", "flops/inference"), ("inference_flops_ratio", "flops/inference_ratio"),
                     ("train_flops", "flops/train"), ("train_flops_ratio", "flops/train_ratio")):
        assert [e.value for e in acc.Scalars(tag)] == pytest.approx([r[key] for r in rows], rel=1e-6), tag
    assert [e.value for e in acc.Scalars("sparsity/target")] == pytest.approx([0.0, 0.8, 0.0, 0.8])  # float32
    assert [(e.step, e.value) for e in acc.Scalars("sparsity/mask_change")] == [
        (STEPS * EPOCHS, pytest.approx(rows[3]["mask_change"]))]
    assert rows[1]["mask_change"] is None  # the first compressed phase has no masks before it to compare with
    # log.every_steps = 1: a train/loss point per step, and the steps of an epoch average to its row's train_loss
    # (every batch holds 64 images)
    points = acc.Scalars("train/loss")
    assert [e.step for e in points] == list(range(1, EPOCHS * STEPS + 1))
    for r in rows:
        epoch_points = [e.value for e in points if r["epoch"] * STEPS < e.step <= (r["epoch"] + 1) * STEPS]
        assert sum(epoch_points) / STEPS == pytest.approx(r["train_loss"], rel=1e-5)
    # the LR each step ran at: the planned LR of its epoch (set once per epoch)
    settings = load_settings(config=run / "config.toml")
    planned = {e.epoch: e.lr for e in epoch_plan(settings)}
    assert [(e.step, e.value) for e in acc.Scalars("train/lr")] == [
        (s, pytest.approx(planned[(s - 1) // STEPS])) for s in range(1, EPOCHS * STEPS + 1)]


def test_tensorboard_holds_the_config_and_the_hparams_of_the_run(piped_run):
    run, _ = piped_run
    acc = _events(run)
    config = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    # a Markdown code block (4 spaces in) of config.toml, which reads back as the run's settings
    assert tomllib.loads("\n".join(line[4:] for line in config.splitlines())) == \
        tomllib.loads((run / "config.toml").read_text())
    content = acc.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert [h.name for h in experiment.hparam_infos] == ["preset", "model", "dataset", "method", "sparsity",
                                                         "structure", "epochs", "lr"]
    metrics = [m.name.tag for m in experiment.metric_infos]
    assert metrics == ["hparams/best_sparse_top1", "hparams/best_dense_top1"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    values = {k: v.string_value or v.number_value for k, v in start.hparams.items()}
    # a wrn-10-2 on CIFAR-10 that started from the quickstart is not labelled "quickstart"
    assert values == {"preset": "- (started from quickstart)", "model": "wrn-10-2", "dataset": "cifar10",
                      "method": "acdc", "sparsity": 0.8, "structure": "unstructured", "epochs": EPOCHS, "lr": 0.05}
    # the metrics the HParams tab shows: the latest value of each, the best sparse and dense val top-1 of the run
    rows = read_jsonl(run / "metrics.jsonl")
    best_sparse = max((r for r in rows if r["phase"] == "sparse"), key=lambda r: r["val_top1"])["val_top1"]
    best_dense = max((r for r in rows if r["phase"] == "dense"), key=lambda r: r["val_top1"])["val_top1"]
    assert acc.Scalars(metrics[0])[-1].value == pytest.approx(best_sparse)
    assert acc.Scalars(metrics[1])[-1].value == pytest.approx(best_dense)
