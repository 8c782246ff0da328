"""acdc eval: the model and data rebuilt from a checkpoint's own metadata reproduce what training measured."""

import pytest

from acdc_cli.checkpoint import load_checkpoint, save_checkpoint
from acdc_cli.evaluate import eval_checkpoint
from acdc_cli.metrics import read_jsonl
from acdc_cli.prune import prune_checkpoint
from cli_helpers import fails, invoke, invoke_json, shows


def eval_json(*args) -> dict:
    return invoke_json("eval", *args)


def test_best_sparse_on_val_reproduces_metrics_jsonl(quickstart_run):
    path = quickstart_run / "best_sparse.safetensors"
    epoch = load_checkpoint(path).metrics["epoch"]
    row = next(r for r in read_jsonl(quickstart_run / "metrics.jsonl") if r["epoch"] == epoch)
    data = eval_json(path)
    assert data["split"] == "val" and data["images"] == 270
    assert data["top1"] == row["val_top1"]  # exactly: same weights, same held-out images, fp32 on the CPU
    assert data["top5"] == row["val_top5"]
    assert data["loss"] == pytest.approx(row["val_loss"], rel=1e-9)
    assert data["sparsity"] == pytest.approx(row["sparsity"], abs=1e-12)
    assert abs(data["sparsity"] - 0.9) < 1e-3
    assert data["paper_top1"] is None  # the quickstart has no paper number
    for key in ("top1", "top5", "sparsity"):
        assert 0.0 <= data[key] <= 1.0


def test_test_split_is_its_own_number(quickstart_run):
    path = quickstart_run / "best_sparse.safetensors"
    val, test = eval_json(path), eval_json(path, "--split", "test", "--batch-size", "64")
    assert test["split"] == "test" and test["images"] == 270
    assert test["loss"] != val["loss"]  # different images
    assert 0.9 <= test["top1"] <= 1.0


def test_dense_checkpoint_and_table_output(quickstart_run):
    path = quickstart_run / "best_dense.safetensors"
    epoch = load_checkpoint(path).metrics["epoch"]
    row = next(r for r in read_jsonl(quickstart_run / "metrics.jsonl") if r["epoch"] == epoch)
    data = eval_json(path)
    assert data["top1"] == row["val_top1"] and data["phase"] == "dense" and data["sparsity"] < 0.5
    result = invoke("eval", path)
    assert result.exit_code == 0
    for text in ("top-1", "270 images", "recorded in training"):
        assert shows(text, result.stdout), text


def test_paper_number_and_difference(quickstart_run, tmp_path):
    ckpt = load_checkpoint(quickstart_run / "best_sparse.safetensors")
    ckpt.extra["paper_top1"] = 0.95
    path = tmp_path / "with-paper.safetensors"
    save_checkpoint(path, ckpt)
    data = eval_json(path)
    assert data["paper_top1"] == 0.95 and data["paper_diff"] == pytest.approx(data["top1"] - 0.95)
    result = invoke("eval", path)
    for text in ("paper top-1", "95.00 %", "points"):
        assert shows(text, result.stdout), text


def test_eval_of_a_pruned_checkpoint_reports_its_sparsity(quickstart_run, tmp_path):
    """The sparsity eval reports is the zeros counted in the file's conv and linear weights (not prune's figure)."""
    out = tmp_path / "pruned.safetensors"
    prune_checkpoint(quickstart_run / "best_dense.safetensors", out, sparsity=0.97)
    weights = [t for name, t in load_checkpoint(out).weights.items() if name.endswith("weight") and t.dim() >= 2]
    zeros, total = sum(int((t == 0).sum()) for t in weights), sum(t.numel() for t in weights)
    result = eval_checkpoint(out)
    assert zeros == round(0.97 * total) and result["sparsity"] == pytest.approx(zeros / total, abs=1e-12)
    assert result["images"] == 270


@pytest.mark.parametrize("case", ["split", "export", "no-config", "missing"])
def test_eval_errors_are_one_line(quickstart_run, tmp_path, case):
    path = quickstart_run / "best_sparse.safetensors"
    args = [path]
    if case == "split":
        args += ["--split", "train"]
    elif case == "export":
        from acdc_cli.export import export_checkpoint

        args = [tmp_path / "e.safetensors"]
        export_checkpoint(path, args[0], "dense")
    elif case == "no-config":
        ckpt = load_checkpoint(path)
        ckpt.config = {}
        args = [tmp_path / "bare.safetensors"]
        save_checkpoint(args[0], ckpt)
    else:
        args = [tmp_path / "nothing.safetensors"]
    fails(["eval", *args])
