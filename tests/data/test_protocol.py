"""``data.val_size = 0``: the reference's data protocol. IST-DASLab/ACDC (``policies/manager.py``) trains on the whole
training set, evaluates the test loader after every epoch and keeps its best sparse / dense checkpoints by that test
accuracy; its memorization runs draw the random-label images with ``np.random.permutation(len(self.data_train))``,
among every training image. Here: every training image trains, the per-epoch metrics are ``test_*``, best_* say
they were chosen on the test split, and ``acdc eval`` of such a checkpoint knows it."""

import re

import pytest
import torch
from cli_helpers import fails, invoke, invoke_json, sets, short_schedule, squash
from data_helpers import write_cifar10, write_imagefolder

from acdc_cli.config import load_settings
from acdc_cli.data import build, cifar
from acdc_cli.data.bundle import selection_split, split_val
from acdc_cli.data.random_labels import select_random_labels
from acdc_cli.errors import AcdcError
from acdc_cli.files.checkpoint import load_checkpoint
from acdc_cli.files.jsonio import read_jsonl

CPU = torch.device("cpu")
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


def _cifar_settings(data, *extra: str):
    return load_settings(overrides=["data.name=cifar10", f"data.dir='{data}'", *extra])


def test_val_size_0_trains_every_cifar_image_and_reports_test_metrics(tmp_path):
    data = write_cifar10(tmp_path / "cifar", train=250, test=50)
    run = tmp_path / "run"
    # dense 0, compressed 1, decompressed 2, final compressed 3; 250 images in 5 whole batches of 50
    result = invoke("train", "--out", run, *short_schedule(4), *sets(
        "data.name=cifar10", f"data.dir='{data}'", "data.val_size=0", "model.name=tiny-test", "data.batch_size=50",
        "data.eval_batch_size=100", "sparsity.target=0.5"))
    assert result.exit_code == 0, result.output

    # every one of the 250 training images trains, in every epoch
    settings = load_settings(config=run / "config.toml")
    bundle = build(settings, CPU)
    images, _ = cifar.load("cifar10", data)["train"]
    assert bundle.val is None and selection_split(settings) == "test"
    assert torch.equal(bundle.train.images, images) and bundle.train.num_samples == 250
    rows = read_jsonl(run / "metrics.jsonl")
    dense = invoke_json("inspect", run / "best_dense.safetensors")["flops"]["dense"]
    assert rows[0]["phase"] == "dense" and rows[0]["train_flops"] == 3 * dense * 250

    # the per-epoch metrics are the test split's, named so, and never val
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    for row in rows:
        assert {"test_loss", "test_top1", "test_top5"} <= set(row) and not [k for k in row if k.startswith("val")]
        assert (row["test_top1"] * 50) == pytest.approx(round(row["test_top1"] * 50))  # 50 test images
    last = invoke_json("eval", run / "last.safetensors")  # the split the run measured: test
    assert (last["split"], last["images"], last["selection_split"]) == ("test", 50, "test")
    assert last["top1"] == rows[-1]["test_top1"] == last["recorded_test_top1"]
    assert last["recorded_val_top1"] is None and last["loss"] == pytest.approx(rows[-1]["test_loss"], rel=1e-9)

    # best_* are chosen by test top-1 and say so: in the checkpoint, the resume state and the summary panel
    sparse = [r for r in rows if r["phase"] == "sparse" and r["target_sparsity"] == 0.5]
    best = max(sparse, key=lambda r: r["test_top1"])
    ckpt = load_checkpoint(run / "best_sparse.safetensors")
    assert ckpt.metrics == best and ckpt.extra["selection_split"] == "test"
    printed = squash(result.stdout)
    found = re.search(r"best sparse ?: test top-1 ([0-9.]+) \(epoch (\d+); chosen on the test split\)", printed)
    assert found and float(found.group(1)) == pytest.approx(best["test_top1"], abs=5e-5)
    assert int(found.group(2)) == best["epoch"] and "val top-1" not in printed
    assert f"test_top1 {best['test_top1']:.4g}" in squash(invoke("inspect", run / "best_sparse.safetensors").stdout)

    # there is no val split to evaluate on, and eval says why in one line
    assert "data.val_size = 0" in fails(["eval", run / "last.safetensors", "--split", "val"])


def test_a_held_out_run_still_selects_on_val_and_eval_defaults_to_it(quickstart_run):
    ckpt = load_checkpoint(quickstart_run / "best_sparse.safetensors")
    assert ckpt.extra["selection_split"] == "val" and "val_top1" in ckpt.metrics and "test_top1" not in ckpt.metrics
    result = invoke_json("eval", quickstart_run / "best_sparse.safetensors")
    assert (result["split"], result["selection_split"], result["images"]) == ("val", "val", 270)
    assert result["recorded_val_top1"] == result["top1"] and result["recorded_test_top1"] is None


def test_val_size_0_memorization_picks_among_every_training_image(tmp_path):
    """As the reference: every training image can get a random label (all 250 here), none is kept back."""
    data = write_cifar10(tmp_path, train=250, test=10)
    images, labels = cifar.load("cifar10", data)["train"]
    everything = build(_cifar_settings(data, "data.val_size=0", "data.random_labels=250", "runtime.seed=4"), CPU)
    positions, random = select_random_labels(torch.arange(250), 250, 10, 4)
    assert torch.equal(positions, torch.arange(250)) and torch.equal(everything.train.labels, random)
    assert torch.equal(everything.memorized.images, images)
    with pytest.raises(AcdcError, match="exceeds the 249 images that train"):
        build(_cifar_settings(data, "data.val_size=1", "data.random_labels=250"), CPU)

    some = build(_cifar_settings(data, "data.val_size=0", "data.random_labels=60", "runtime.seed=4"), CPU)
    positions, random = select_random_labels(torch.arange(250), 60, 10, 4)
    assert torch.equal(some.memorized.images, images[positions]) and torch.equal(some.train.labels[positions], random)
    assert torch.equal(some.memorized.extra, labels[positions])
    # drawn from all 250, not from a 200-image pool that a held-out split would leave
    assert positions.max() >= 200


def test_val_size_0_on_every_dataset(tmp_path):
    assert split_val(5, 0, seed=3)[0].tolist() == [0, 1, 2, 3, 4] and split_val(5, 0, seed=3)[1].numel() == 0
    write_imagefolder(tmp_path, classes=3, train=8, val=2)
    folder = build(load_settings(overrides=["data.name=imagenet", f"data.dir='{tmp_path}'", "data.val_size=0",
                                            "data.num_workers=0", "data.batch_size=4"]), CPU)
    assert folder.val is None and len(folder.train.dataset) == 24 and len(folder.test.dataset) == 6
    assert all("/train/" in folder.train.dataset.path(i) for i in range(24))

    digits = build(load_settings(overrides=["data.val_size=0"]), CPU)
    assert digits.val is None and len(digits.train.labels) == 1797 - 270 and len(digits.test.labels) == 270

    synthetic = ["data.name=synthetic", "model.name=tiny-test", "data.synthetic_size=40"]
    held, whole = (build(load_settings(overrides=[*synthetic, f"data.val_size={n}"]), CPU) for n in (5, 0))
    assert whole.val is None and len(held.val.labels) == 10
    # the same test images either way
    assert torch.equal(whole.test.images, held.test.images) and torch.equal(whole.train.images, held.train.images)


def test_val_size_bounds():
    assert load_settings(overrides=["data.val_size=0"]).data.val_size == 0
    assert "data.val_size" in fails(["train", "--dry-run", "--set", "data.val_size=-1"])
