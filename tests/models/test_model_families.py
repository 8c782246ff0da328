"""Models by name from other libraries (``torchvision:<name>``, ``timm:<name>``) through every command: a short AC/DC
run on a CIFAR-format folder, interrupted and resumed, then eval, export (the dense file loads into the library's own
constructor with strict=True) and inspect; local pretrained weights; plain state dicts for prune and export."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from cli_helpers import fails, invoke_json
from data_helpers import write_cifar10
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from acdc_cli.cli.app import app
from acdc_cli.errors import AcdcError
from acdc_cli.files.jsonio import read_jsonl
from acdc_cli.files.open import load_pretrained
from acdc_cli.models import create
from acdc_cli.training.checkpoints import RunDir

HAS_TIMM = importlib.util.find_spec("timm") is not None
NO_TIMM = "timm is not installed (pip install -e '.[timm]')"

# dense 0, compressed 1, decompressed 2, final compressed 3
SHORT = ["schedule.epochs=4", "schedule.warmup_epochs=1", "schedule.compressed_epochs=1",
         "schedule.decompressed_epochs=1", "schedule.final_decompressed_epochs=0", "schedule.final_compressed_epochs=1",
         "data.name=cifar10", "data.val_size=50", "data.batch_size=50", "data.eval_batch_size=100",
         "log.tensorboard=false", "runtime.threads=1", "sparsity.target=0.9"]


def _constructor(name: str, num_classes: int) -> torch.nn.Module:
    """The model as its own library builds it."""
    library, model = name.split(":", 1)
    if library == "timm":
        import timm

        return timm.create_model(model, pretrained=False, num_classes=num_classes)
    import torchvision

    return torchvision.models.get_model(model, weights=None, num_classes=num_classes)


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("name", [
    pytest.param("torchvision:resnet18", marks=pytest.mark.slow),  # 11.7 M weights: the slow suite
    "torchvision:mobilenet_v3_small",
    pytest.param("timm:test_resnet", marks=pytest.mark.skipif(not HAS_TIMM, reason=NO_TIMM)),
])
def test_family_trains_resumes_and_every_command_reads_its_files(tmp_path, monkeypatch, name):
    data = write_cifar10(tmp_path / "cifar", train=250, test=50)
    run = tmp_path / "run"
    args = ["train", "--out", str(run), "--data-dir", str(data), "--device", "cpu", "--set", f"model.name={name}"]
    for item in SHORT:
        args += ["--set", item]
    real_write = RunDir.write_epoch

    def write_then_crash(store, files):
        real_write(store, files)
        if files is not None and files.epoch == 1:
            raise Interrupted

    with monkeypatch.context() as m:
        m.setattr(RunDir, "write_epoch", write_then_crash)
        first = CliRunner().invoke(app, args)
    assert isinstance(first.exception, Interrupted), first.output
    summary = invoke_json("train", "--resume", str(run))
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["phase"] for r in rows] == ["dense", "sparse", "dense", "sparse"]
    for row in rows[1::2]:
        assert row["sparsity"] == pytest.approx(0.9, abs=1e-5)
    assert summary["final_sparsity"] == pytest.approx(0.9, abs=1e-5)

    best = run / "best_sparse.safetensors"
    evaluated = invoke_json("eval", str(best), "--split", "test")
    assert evaluated["arch"] == name and evaluated["images"] == 50
    assert evaluated["sparsity"] == pytest.approx(0.9, abs=1e-5)

    dense = tmp_path / "dense.safetensors"
    invoke_json("export", str(best), "--format", "dense", "--out", str(dense))
    model = _constructor(name, 10)
    model.load_state_dict(load_file(str(dense)), strict=True)
    masks = {k.removeprefix("mask."): v for k, v in load_file(str(best)).items() if k.startswith("mask.")}
    params = dict(model.named_parameters())
    zeros = sum(int((params[n] == 0).sum()) for n in masks)
    assert zeros / sum(m.numel() for m in masks.values()) == pytest.approx(0.9, abs=1e-5)

    info = invoke_json("inspect", str(best))
    assert info["kind"] == "checkpoint" and info["metadata"]["arch"] == name
    assert info["sparsity"] == pytest.approx(0.9, abs=1e-5)


def test_unknown_names_list_the_closest_and_timm_names_the_extra(monkeypatch):
    line = fails(["train", "--dry-run", "--set", "model.name=resnet18"])
    assert "unknown model 'resnet18'" in line and "torchvision:resnet18" in line
    line = fails(["train", "--dry-run", "--set", "model.name=torchvision:mobilenet_v3_smal"])
    assert "torchvision:mobilenet_v3_small" in line
    line = fails(["train", "--dry-run", "--set", "model.name=torchvision:fasterrcnn_resnet50_fpn"])
    assert "no classification model" in line  # detection models are not classifiers
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    line = fails(["train", "--dry-run", "--set", "model.name=timm:resnet18"])
    assert "pip install 'acdc-cli[timm]'" in line
    result = CliRunner().invoke(app, ["train", "--dry-run", "--set", "model.name=torchvision:resnet18",
                                      "--set", "data.name=cifar10"])
    assert result.exit_code == 0, result.output


@pytest.mark.skipif(not HAS_TIMM, reason=NO_TIMM)
def test_unknown_timm_name_lists_the_closest():
    assert "timm:test_resnet" in fails(["train", "--dry-run", "--set", "model.name=timm:test_resnt"])


def test_pretrained_weights_load_with_prefixes_stripped_and_skips(tmp_path):
    torch.manual_seed(1)
    source = create("torchvision:mobilenet_v3_small", num_classes=100)
    wrapped = {f"module._orig_mod.{k}": v for k, v in source.state_dict().items()}
    torch.save({"state_dict": wrapped}, tmp_path / "pretrained.pt")
    torch.manual_seed(2)
    model = create("torchvision:mobilenet_v3_small", num_classes=10)
    head = model.classifier[3].weight.detach().clone()
    with pytest.raises(AcdcError, match=r"classifier\.3\.weight is \(100, 1024\) in the file, \(10, 1024\)"):
        load_pretrained(model, tmp_path / "pretrained.pt", [], "torchvision:mobilenet_v3_small")
    skipped = load_pretrained(model, tmp_path / "pretrained.pt", ["classifier.3.*"], "torchvision:mobilenet_v3_small")
    assert skipped == ["classifier.3.weight", "classifier.3.bias"]
    for key, value in model.state_dict().items():
        if not key.startswith("classifier.3."):
            assert torch.equal(value, source.state_dict()[key]), key
    assert torch.equal(model.classifier[3].weight, head)  # left as initialised
    with pytest.raises(AcdcError, match="matches no key"):
        load_pretrained(model, tmp_path / "pretrained.pt", ["head.*"], "torchvision:mobilenet_v3_small")


def test_train_from_local_weights_and_its_one_line_errors(tmp_path):
    torch.manual_seed(1)
    source = create("tiny-test", num_classes=7)
    save_file({f"_orig_mod.{k}": v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "w.safetensors")
    common = ["train", "--device", "cpu", "--set", "model.name=tiny-test", "--set", "data.name=synthetic",
              "--set", "data.synthetic_size=32", "--set", "data.batch_size=16", "--set", "data.val_size=8",
              "--set", "schedule.method=dense", "--set", "schedule.epochs=1", "--set", "log.tensorboard=false",
              "--set", f"model.weights={tmp_path / 'w.safetensors'}"]
    line = fails([*common, "--out", str(tmp_path / "bad")])
    assert "fc.weight is (7, 32) in the file, (10, 32) in the model" in line and 'weights_skip = ["fc.*"]' in line
    result = CliRunner().invoke(app, [*common, "--set", 'model.weights_skip=["fc.*"]', "--out", str(tmp_path / "ok")])
    assert result.exit_code == 0, result.output
    assert "left as initialised: fc.weight, fc.bias" in result.output
    # its checkpoints carry on with --from: their own weights are the start, not model.weights again
    carried = CliRunner().invoke(app, ["train", "--from", str(tmp_path / "ok" / "last.safetensors"),
                                       "--out", str(tmp_path / "carried")])
    assert carried.exit_code == 0, carried.output
    assert "model.weights" not in carried.output
    assert "no such file" in fails(["train", "--dry-run", "--set", f"model.weights={tmp_path / 'missing.pt'}"])
    weights = str(tmp_path / "w.safetensors")
    both = ["train", "--preset", "quickstart", "--from", weights, "--set", f"model.weights={weights}"]
    assert "keep one" in fails(both)


def test_prune_and_export_take_a_plain_state_dict_with_model_and_classes(tmp_path):
    torch.manual_seed(0)
    source = create("torchvision:mobilenet_v3_small", num_classes=10)
    torch.save(source.state_dict(), tmp_path / "plain.pt")
    base = ["--model", "torchvision:mobilenet_v3_small", "--num-classes", "10"]
    pruned = invoke_json("prune", str(tmp_path / "plain.pt"), *base, "--sparsity", "0.5",
                  "--out", str(tmp_path / "pruned.safetensors"))
    assert pruned["sparsity"] == pytest.approx(0.5, abs=1e-6)
    dense = tmp_path / "dense.safetensors"
    invoke_json("export", str(tmp_path / "plain.pt"), *base, "--format", "dense", "--out", str(dense))
    model = _constructor("torchvision:mobilenet_v3_small", 10)
    model.load_state_dict(load_file(str(dense)), strict=True)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    # the pruned checkpoint is an acdc checkpoint now: export reads it without --model
    sparse = invoke_json("export", str(tmp_path / "pruned.safetensors"), "--format", "sparse-bitmask",
                  "--out", str(tmp_path / "sparse.safetensors"))
    assert sparse["sparsity"] == pytest.approx(0.5, abs=1e-6)

    plain = str(tmp_path / "plain.pt")
    assert "--model NAME --num-classes N" in fails(["export", plain, "--format", "dense", "--out",
                                                    str(tmp_path / "x.safetensors")])
    assert "both --model NAME and --num-classes N" in fails(
        ["prune", plain, "--model", "torchvision:mobilenet_v3_small", "--sparsity", "0.5", "--out",
         str(tmp_path / "y.safetensors")])
    assert "does not fit" in fails(["prune", plain, "--model", "torchvision:mobilenet_v3_small", "--num-classes", "5",
                                    "--sparsity", "0.5", "--out", str(tmp_path / "z.safetensors")])
    assert "records its own model" in fails(["export", str(tmp_path / "pruned.safetensors"), *base, "--format",
                                             "dense", "--out", str(tmp_path / "w.safetensors")])
