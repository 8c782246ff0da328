"""Acdc eval: the model and data rebuilt from a checkpoint's own metadata reproduce what training measured."""

import pytest
import torch
from cli_helpers import fails, invoke, invoke_json, shows

from acdc_cli.commands.evaluate import eval_checkpoint
from acdc_cli.commands.prune import prune_checkpoint
from acdc_cli.files.checkpoint import load_checkpoint, save_checkpoint
from acdc_cli.files.jsonio import read_jsonl
from acdc_cli.paper import paper_reference


def eval_json(*args) -> dict:
    return invoke_json("eval", *args)


def test_best_sparse_on_val_reproduces_metrics_jsonl(quickstart_run, one_thread):
    path = quickstart_run / "best_sparse.safetensors"
    epoch = load_checkpoint(path).metrics["epoch"]
    row = next(r for r in read_jsonl(quickstart_run / "metrics.jsonl") if r["epoch"] == epoch)
    data = eval_json(path)
    assert data["split"] == "val" and data["images"] == 270
    # exactly: same weights, same held-out images, fp32 on the CPU with one thread, as the quickstart fixture trains
    assert data["top1"] == row["val_top1"]
    assert data["top5"] == row["val_top5"]
    assert data["loss"] == pytest.approx(row["val_loss"], rel=1e-9)
    assert data["sparsity"] == pytest.approx(row["sparsity"], abs=1e-12)
    assert abs(data["sparsity"] - 0.9) < 1e-3
    assert data["paper_top1"] is None and data["paper_note"] == "preset quickstart has no paper number"
    assert data["schema"] == "acdc.eval/2" and data["precision"] == "fp32" and data["kind"] == "checkpoint"
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
    # one epoch key, counting completed epochs as the header does: metrics.jsonl numbers the last of them epoch - 1
    assert data["epoch"] == epoch + 1 and "last_epoch" not in data
    result = invoke("eval", path)
    assert result.exit_code == 0
    for text in ("top-1", "270 images", "recorded in training", "precision", "fp32",
                 "paper top-1 not shown: preset quickstart has no paper number"):
        assert shows(text, result.stdout), text


def _as_preset(quickstart_run, tmp_path, preset: str, **changes) -> str:
    ckpt = load_checkpoint(quickstart_run / "best_sparse.safetensors")
    ckpt.config["preset"] = preset
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        ckpt.config[section][key] = value
    path = tmp_path / f"{preset}-{len(changes)}.safetensors"
    save_checkpoint(path, ckpt)
    return path


def test_paper_number_only_when_comparable(quickstart_run, tmp_path, paper_preset):
    path = _as_preset(quickstart_run, tmp_path, paper_preset)
    data = eval_json(path, "--split", "test")
    assert data["paper_top1"] == 0.95 and data["paper_note"] is None
    assert data["paper_diff"] == pytest.approx(data["top1"] - 0.95)
    shown = invoke("eval", path, "--split", "test")
    assert shows("95.00 %", shown.stdout) and shows("points", shown.stdout)
    # the paper's number is a test-split number
    val = eval_json(path)
    assert val["paper_top1"] is None and val["paper_diff"] is None and "test split" in val["paper_note"]
    # a run that is no longer the preset's experiment
    longer = eval_json(_as_preset(quickstart_run, tmp_path, paper_preset, schedule__epochs=31), "--split", "test")
    assert longer["paper_top1"] is None and longer["paper_note"] == (
        "not preset digits-paper's experiment: schedule.epochs 31 (preset: 30)")
    table = invoke("eval", _as_preset(quickstart_run, tmp_path, paper_preset, schedule__epochs=31), "--split", "test")
    assert shows("paper top-1 not shown: not preset digits-paper's experiment: schedule.epochs 31 (preset: 30)", table.stdout)


@pytest.mark.parametrize("change, note", [
    ({"model": {"name": "tiny-test"}}, "model.name tiny-test (preset: digits-cnn)"),
    ({"data": {"name": "synthetic"}}, "data.name synthetic (preset: digits)"),
    ({"sparsity": {"target": 0.95}}, "sparsity.target 0.95 (preset: 0.9)"),
    # as acdc records a 2:4 run: the target that 2:4 implies (a stated 0.9 beside 2:4 is refused)
    ({"sparsity": {"structure": "2:4", "target": 0.5}},
     "sparsity.target 0.5 (preset: 0.9), and 1 other setting"),
    ({"schedule": {"method": "dense"}}, "schedule.method dense (preset: acdc)"),
    # the settings the old gate let through: each changes the result, so each hides the paper's number
    ({"optim": {"lr": 0.2}}, "optim.lr 0.2 (preset: 0.05)"),
    ({"data": {"batch_size": 32}}, "data.batch_size 32 (preset: 64)"),
    ({"sparsity": {"scope": "uniform"}}, "sparsity.scope uniform (preset: global)"),
    ({"sparsity": {"exclude": ["fc"]}}, "sparsity.exclude ['fc'] (preset: [])"),
    ({"schedule": {"compressed_epochs": 4, "reset_momentum": "never"}},
     "schedule.compressed_epochs 4 (preset: 3), and 1 other setting"),
    ({"data": {"val_size": 0}}, "data.val_size 0 (preset: 270)"),
    ({"runtime": {"eval_precision": "amp"}}, "runtime.eval_precision amp (preset: fp32)"),
    ({"preset": "nope"}, None),
])
def test_paper_reference_names_what_changed(paper_preset, change, note):
    from acdc_cli.config import load_settings

    settings = load_settings(preset=paper_preset).model_dump(mode="json")
    for section, values in change.items():
        if isinstance(values, dict):
            settings[section].update(values)
        else:
            settings[section] = values
    paper, why = paper_reference(load_settings(base=settings), "test")
    assert paper is None
    assert why == (f"not preset digits-paper's experiment: {note}" if note else "'nope' is not a preset of this acdc")
    assert paper_reference(load_settings(preset=paper_preset), "test") == (0.95, None)


def test_amp_on_the_cpu_still_computes_in_fp32(quickstart_run):
    path = quickstart_run / "best_sparse.safetensors"
    plain, amp = eval_json(path), eval_json(path, "--amp")
    assert amp["precision"] == "fp32" and amp["loss"] == plain["loss"]


@pytest.fixture(scope="module")
def exports(quickstart_run, tmp_path_factory):
    """The quickstart's best_sparse in every export format (2:4 from a 2:4 pruning of best_dense), with the
    checkpoint each came from."""
    from acdc_cli.commands.export import export_checkpoint
    from acdc_cli.commands.export_onnx import export_onnx

    folder = tmp_path_factory.mktemp("eval-exports")
    sparse, pruned = quickstart_run / "best_sparse.safetensors", folder / "pruned24.safetensors"
    prune_checkpoint(quickstart_run / "best_dense.safetensors", pruned, structure="2:4")
    files = {fmt: (export_checkpoint(sparse, folder / f"{fmt}.safetensors", fmt).path, sparse)
             for fmt in ("sparse-bitmask", "dense")}
    files["sparse-24-bitmask"] = (export_checkpoint(pruned, folder / "24.safetensors", "sparse-24-bitmask").path,
                                  pruned)
    files["bfloat16"] = (export_checkpoint(sparse, folder / "bf16.safetensors", "sparse-bitmask", "bfloat16").path,
                         sparse)
    pytest.importorskip("onnxruntime", reason="the 'onnx' extra is not installed (pip install -e '.[onnx]')")
    files["onnx"] = (export_onnx(sparse, folder / "model.onnx").path, sparse)
    return files


@pytest.mark.parametrize("fmt", ["sparse-bitmask", "dense", "sparse-24-bitmask", "onnx"])
def test_every_export_format_evaluates_like_its_checkpoint(exports, fmt):
    path, source = exports[fmt]
    data, reference = eval_json(path, "--split", "test"), eval_json(source, "--split", "test")
    assert data["kind"] == ("onnx" if fmt == "onnx" else "export") and data["format"] == fmt
    assert data["images"] == reference["images"] == 270
    assert data["sparsity"] == reference["sparsity"]  # counted in the file's own tensors
    assert data["top1"] == reference["top1"] and data["top5"] == reference["top5"]
    if fmt == "onnx":  # ONNX Runtime's kernels round differently
        assert data["loss"] == pytest.approx(reference["loss"], rel=1e-5) and data["device"] == "cpu (onnxruntime)"
    else:
        assert data["loss"] == reference["loss"]
    assert data["preset"] == "quickstart" and data["epoch"] == reference["epoch"]
    assert data["recorded_val_top1"] == reference["recorded_val_top1"]


def test_bfloat16_export_reports_its_weights_and_fp32_compute(exports):
    data = eval_json(exports["bfloat16"][0])
    assert data["weights_dtype"] == "bfloat16" and data["precision"] == "fp32"
    assert abs(data["sparsity"] - 0.9) < 1e-3 and data["top1"] > 0.9


def test_onnx_eval_refuses_gpu_options(exports):
    result = invoke("eval", exports["onnx"][0], "--amp")
    assert result.exit_code == 2 and "ONNX Runtime's CPU provider" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_eval_of_a_pruned_checkpoint_reports_its_sparsity(quickstart_run, tmp_path):
    """The sparsity eval reports is the zeros counted in the file's conv and linear weights (not prune's figure)."""
    out = tmp_path / "pruned.safetensors"
    prune_checkpoint(quickstart_run / "best_dense.safetensors", out, sparsity=0.97)
    weights = [t for name, t in load_checkpoint(out).weights.items() if name.endswith("weight") and t.dim() >= 2]
    zeros, total = sum(int((t == 0).sum()) for t in weights), sum(t.numel() for t in weights)
    result = eval_checkpoint(out)
    assert zeros == round(0.97 * total) and result["sparsity"] == pytest.approx(zeros / total, abs=1e-12)
    assert result["images"] == 270


@pytest.mark.parametrize("case", ["split", "state-dict", "no-config", "missing", "foreign-onnx"])
def test_eval_errors_are_one_line(quickstart_run, tmp_path, case):
    path = quickstart_run / "best_sparse.safetensors"
    args = [path]
    if case == "split":
        args += ["--split", "train"]
    elif case == "state-dict":
        from safetensors.torch import save_file

        args = [tmp_path / "plain.safetensors"]
        save_file({"w": torch.ones(2, 2)}, str(args[0]))
    elif case == "foreign-onnx":
        args = [tmp_path / "foreign.onnx"]
        args[0].write_bytes(b"not a protobuf at all")
    elif case == "no-config":
        ckpt = load_checkpoint(path)
        ckpt.config = {}
        args = [tmp_path / "bare.safetensors"]
        save_checkpoint(args[0], ckpt)
    else:
        args = [tmp_path / "nothing.safetensors"]
    fails(["eval", *args])
