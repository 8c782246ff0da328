"""acdc bench --inference: dense vs sparse throughput of a checkpoint or export in one run, on the CPU here (tiny model,
few repetitions); what it reports per layer and overall. No timing is asserted, only that the numbers agree."""

import json

import pytest
import torch
from cli_helpers import invoke

from acdc_cli.commands.bench_inference import _densified, interleaved, median_interval, timing_row, verdict
from acdc_cli.commands.export import export_checkpoint
from acdc_cli.commands.prune import prune_checkpoint
from acdc_cli.files.checkpoint import fold_masks, load_checkpoint
from acdc_cli.training import runtime


def bench_json(path, *args) -> dict:
    result = invoke("bench", "--inference", path, "--steps", "3", "--warmup", "1", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def files(quickstart_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench-inference")
    pruned = folder / "pruned24.safetensors"
    prune_checkpoint(quickstart_run / "best_dense.safetensors", pruned, structure="2:4")
    return {
        "checkpoint": quickstart_run / "best_sparse.safetensors",
        "2:4": pruned,
        "2:4-export": export_checkpoint(pruned, folder / "24.safetensors", "sparse-24-bitmask").path,
    }


def _check_numbers(data: dict, batch_sizes: list[int]) -> None:
    assert [row["batch_size"] for row in data["results"]] == batch_sizes
    for row in data["results"]:
        batch = row["batch_size"]
        assert row["dense_images_per_s"] == pytest.approx(batch / (row["dense_ms"] / 1000), rel=1e-9)
        assert row["sparse_images_per_s"] == pytest.approx(batch / (row["sparse_ms"] / 1000), rel=1e-9)
        assert row["ratio"] == pytest.approx(row["sparse_images_per_s"] / row["dense_images_per_s"], rel=1e-12)
        assert row["dense_ms"] > 0 and row["sparse_ms"] > 0
        assert row["ratio_low"] <= row["paired_ratio"] <= row["ratio_high"]
        assert row["verdict"] in ("faster", "slower", "same")


def test_checkpoint_on_the_cpu(files, one_thread):
    data = bench_json(files["checkpoint"])
    assert data["schema"] == "acdc.bench.inference/1"
    assert (data["kind"], data["runtime"], data["device"]) == ("checkpoint", "pytorch", "cpu")
    assert data["precision"] == "fp32"
    assert data["input_shape"] == [1, 8, 8] and data["repeats"] == 3 and data["warmup"] == 1
    _check_numbers(data, [1, 64])
    weights = fold_masks(load_checkpoint(files["checkpoint"]))
    layers = {layer["name"]: layer for layer in data["layers"]}
    assert sorted(layers) == sorted(n.removesuffix(".weight") for n in load_checkpoint(files["checkpoint"]).masks)
    for name, layer in layers.items():
        weight = weights[f"{name}.weight"]
        assert layer["sparsity"] == float((weight == 0).sum()) / weight.numel() and layer["shape"] == list(weight.shape)
        assert layer["sparse_kernel"] is False and "dense kernel" in layer["note"] and "cpu" in layer["note"]
    zeros = sum(int((weights[f"{n}.weight"] == 0).sum()) for n in layers)
    assert data["sparsity"] == pytest.approx(zeros / sum(weights[f"{n}.weight"].numel() for n in layers), abs=1e-9)
    assert abs(data["sparsity"] - 0.9) < 1e-3
    # nothing ran sparse, so the sparse model computed exactly what the plain model does, and the output says why
    # the two columns measure the same kernels
    assert data["sparse_layers"] == 0 and data["max_abs_diff"] == 0.0
    assert data["note"].startswith("no layer ran a sparse kernel on cpu")


def test_2_4_export_and_batch_size(files, one_thread):
    data = bench_json(files["2:4-export"], "--batch-size", "8")
    assert data["kind"] == "export"
    _check_numbers(data, [1, 8])
    masked = {n.removesuffix(".weight") for n in load_checkpoint(files["2:4"]).masks}
    for layer in data["layers"]:
        assert layer["nm_valid"] is (True if layer["name"] in masked else None), layer["name"]
    _check_numbers(bench_json(files["2:4-export"], "--batch-size", "1", "--steps", "2"), [1])  # batch 1 timed once


def test_onnx_file_on_onnx_runtime(files, tmp_path, one_thread):
    pytest.importorskip("onnxruntime", reason="the 'onnx' extra is not installed (pip install -e '.[onnx]')")
    from acdc_cli.commands.export_onnx import export_onnx

    path = export_onnx(files["checkpoint"], tmp_path / "model.onnx").path
    data = bench_json(path)
    assert (data["kind"], data["runtime"], data["device"]) == ("onnx", "onnxruntime", "cpu (onnxruntime)")
    _check_numbers(data, [1, 64])
    reference = bench_json(files["checkpoint"])
    # the initializers the Conv and Gemm nodes read are the checkpoint's weights: the same sparsity per layer
    assert {layer["name"]: layer["sparsity"] for layer in data["layers"]} == {
        f"{layer['name']}.weight": layer["sparsity"] for layer in reference["layers"]}
    assert data["sparsity"] == pytest.approx(reference["sparsity"], abs=1e-12)
    assert {layer["type"] for layer in data["layers"]} == {"Conv", "Gemm"}
    assert "ONNX Runtime's CPU provider runs Conv and Gemm densely" in data["note"]


def test_table_output_says_what_ran(files, one_thread):
    result = invoke("bench", "--inference", files["checkpoint"], "--steps", "2", "--warmup", "0")
    assert result.exit_code == 0, result.output
    for text in ("sparse/dense", "dense img/s", "batch 1: ", "batch 64: ", "0 of 6 layers ran a sparse kernel",
                 "no layer ran a sparse kernel"):
        assert text in result.stdout


@pytest.mark.parametrize("args, message", [
    (("--preset", "quickstart"), "drop --preset"),
    (("--steps", "0"), "--steps must be at least 1"),
])
def test_bad_inference_options_are_one_line_errors(files, args, message):
    result = invoke("bench", "--inference", files["checkpoint"], *args)
    assert result.exit_code == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_missing_file_is_a_one_line_error(tmp_path):
    result = invoke("bench", "--inference", tmp_path / "nothing.safetensors")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1


def test_verdict_is_honest_about_slower_sparse():
    """The verdict reads the confidence interval of the paired ratios: sparse slower in every one of 8 pairs is
    "slower", even by 5 %; a 5 % median difference within pairs that scatter around 1 (identical kernels on a
    busy machine) is "same", where a fixed 3 % band would have called it slower."""
    slower = timing_row(4, dense_times=[1.0] * 8, sparse_times=[2.0, 1.05, 1.06, 2.0, 1.07, 1.05, 2.0, 1.06])
    assert slower["verdict"] == "slower" and verdict(slower).startswith("sparse is slower (0.94x dense; ")
    assert slower["ratio_high"] < 1 and slower["confidence"] >= 0.95
    noisy = timing_row(4, dense_times=[1.0] * 8, sparse_times=[0.8, 1.05, 1.3, 0.9, 1.06, 1.2, 1.05, 0.95])
    assert noisy["paired_ratio"] == pytest.approx(1 / 1.05) and noisy["verdict"] == "same"
    assert noisy["ratio_low"] < 1 < noisy["ratio_high"]
    assert verdict(noisy).startswith("no measurable difference (0.95x; ")
    faster = timing_row(4, dense_times=[2.0, 1.5, 1.6, 1.8, 1.7, 1.9], sparse_times=[1.0] * 6)
    assert faster["verdict"] == "faster" and verdict(faster).startswith("sparse is faster (1.75x dense; ")
    assert faster["ratio"] == pytest.approx(1.75) and faster["dense_images_per_s"] == pytest.approx(4 / 1.75)


def test_median_interval_from_order_statistics():
    # n = 8: P(Binomial(8, 1/2) <= 1) = 9/256, so k = 2 covers 1 - 18/256 = 93 % < 95 %: k = 1, the whole range
    assert median_interval([5, 1, 4, 2, 8, 7, 3, 6]) == (1, 8, pytest.approx(1 - 2 / 256))
    # n = 9: k = 2 covers 1 - 2 * 10/512 = 96 %: the second smallest and the second largest
    assert median_interval(list(range(1, 10))) == (2, 8, pytest.approx(1 - 20 / 512))
    # n = 20: k = 6 covers 95.9 %, k = 7 only 88.5 %
    low, high, coverage = median_interval(list(range(1, 21)))
    assert (low, high) == (6, 15) and coverage == pytest.approx(0.9586, abs=1e-4)


def test_interleaved_passes_alternate_which_goes_first(monkeypatch):
    calls = []
    clock = iter(range(1, 100))
    monkeypatch.setattr(runtime, "elapsed_seconds", lambda fn, device: fn() or float(next(clock)))
    dense_times, sparse_times = interleaved(lambda x: calls.append("dense"), lambda x: calls.append("sparse"),
                                            torch.zeros(1), repeats=4, warmup=1, device=torch.device("cpu"))
    assert calls == ["dense", "sparse", "dense", "sparse", "sparse", "dense", "dense", "sparse", "sparse", "dense"]
    assert dense_times == [1, 4, 5, 8] and sparse_times == [2, 3, 6, 7]


def test_dense_counterpart_has_no_zeros_and_keeps_the_values():
    weight = torch.tensor([[0.0, 2.0, 0.0, -4.0], [1.0, 0.0, 0.0, 3.0]])
    dense = _densified(weight, torch.Generator().manual_seed(0))
    assert bool((dense != 0).all()) and torch.equal(dense[weight != 0], weight[weight != 0])
    assert float(dense[weight == 0].abs().max()) <= 0.01 * 4.0


@pytest.mark.gpu
def test_2_4_linear_runs_the_semi_structured_kernel_on_cuda(files):
    """On a CUDA GPU of compute capability 8.0+: the 2:4 classifier.1 (128 x 256) runs PyTorch's 2:4 kernel;
    classifier.4 (10 outputs) is below the kernels' 32-row minimum and stays dense, saying so."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs a CUDA GPU of compute capability 8.0 or newer")
    data = bench_json(files["2:4"], "--device", "cuda")
    layers = {layer["name"]: layer for layer in data["layers"]}
    assert data["precision"] == "fp16" and layers["classifier.1"]["sparse_kernel"] is True
    assert layers["classifier.4"]["sparse_kernel"] is False and "refused" in layers["classifier.4"]["note"]
    assert data["sparse_layers"] == 1 and data["max_abs_diff"] < 1e-2
