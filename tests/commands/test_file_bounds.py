"""Every command that reads a checkpoint checks it the one way eval does: the weights fit the model its metadata
describes (names, shapes, a known arch, model kwargs that build) and are finite. ONNX files are bounded before they
run: the export's input size, a graph whose constant shapes ask for tens of GB, a model with fewer class scores than
the data has classes. Each is one line, exit 2, and nothing written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from cli_helpers import fails
from safetensors import safe_open
from safetensors.torch import save_file

from acdc_cli import ACDC
from acdc_cli.models import create


def _saved(path: Path, num_classes: int = 10) -> Path:
    """A tiny-test checkpoint on digits (1 channel, 10 classes) written through the API, at 50 % sparsity."""
    torch.manual_seed(0)
    model = create("tiny-test", num_classes=num_classes, in_channels=1)
    acdc = ACDC(model, torch.optim.SGD(model.parameters(), lr=0.1), epochs=2, sparsity=0.5, warmup_epochs=0,
                compressed_epochs=1, decompressed_epochs=1, final_compressed_epochs=1)
    acdc.start_epoch(0)
    return acdc.save(path, arch="tiny-test", data="digits")


def _rewrite(path: Path, tensors=None, meta=None) -> Path:
    with safe_open(str(path), framework="pt") as fh:
        stored = {k: fh.get_tensor(k) for k in fh.keys()}
        metadata = fh.metadata()
    stored = tensors(stored) if tensors else stored
    metadata = meta(metadata) if meta else metadata
    save_file(stored, str(path), metadata=metadata)
    return path


def _renamed(t):
    t["fc.biases"] = t.pop("fc.bias")
    return t


def _swapped(t):
    for key in ("fc.weight", "mask.fc.weight"):  # the weight and its mask, so that only the model disagrees
        t[key] = t[key].t().contiguous()
    return t


def _missing(t):
    t.pop("bn.running_mean")
    return t


def _inf_bias(t):
    t["fc.bias"][0] = math.inf
    return t


def _nan_weight(t):
    t["bn.weight"][0] = math.nan  # not a pruned position: a NaN where the mask prunes reads as the zero it is
    return t


DAMAGES = {
    "renamed-key": (dict(tensors=_renamed), "does not fit this model (missing fc.bias)"),
    "swapped-shape": (dict(tensors=_swapped), "does not fit this model: fc.weight is (32, 10), model has (10, 32)"),
    "missing-key": (dict(tensors=_missing), "does not fit this model (missing bn.running_mean)"),
    "unknown-arch": (dict(meta=lambda m: {**m, "arch": "no-such-net"}), "unknown model 'no-such-net'"),
    "bad-model-kwargs": (dict(meta=lambda m: {**m, "model_kwargs": json.dumps({"num_classes": 10, "width": 3})}),
                         "cannot build model 'tiny-test'"),
    "inf-bias": (dict(tensors=_inf_bias), "fc.bias holds non-finite values (inf or NaN); the model it holds has "
                                          "diverged"),
    "nan-weight": (dict(tensors=_nan_weight), "bn.weight holds non-finite values (inf or NaN)"),
}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return _saved(tmp_path_factory.mktemp("good") / "m.safetensors")


@pytest.fixture(params=sorted(DAMAGES))
def damaged(request, good, tmp_path) -> tuple[Path, str]:
    changes, expected = DAMAGES[request.param]
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(good.read_bytes())
    return _rewrite(path, **changes), expected


COMMANDS = {
    "eval": lambda src, out: ["eval", src],
    "export-bitmask": lambda src, out: ["export", src, "-o", out, "-f", "sparse-bitmask"],
    "export-dense": lambda src, out: ["export", src, "-o", out, "-f", "dense"],
    "prune": lambda src, out: ["prune", src, "-o", out, "--sparsity", "0.5"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_refuses_a_checkpoint_that_does_not_fit_or_is_not_finite(damaged, command, tmp_path):
    path, expected = damaged
    out = tmp_path / "out.safetensors"
    line = fails(COMMANDS[command](path, out))
    assert line.startswith("error: ") and expected in line, line
    assert not out.exists()


def test_the_undamaged_checkpoint_passes_every_command(good, tmp_path):
    from cli_helpers import invoke

    for name, command in sorted(COMMANDS.items()):
        out = tmp_path / f"{name}.safetensors"
        result = invoke(*command(good, out))
        assert result.exit_code == 0, (name, result.output)
        assert name == "eval" or out.is_file()


# ----------------------------------------------------------------------------------------------------------------
# ONNX

onnx = pytest.importorskip("onnx")


def test_onnx_export_bounds_the_input_size_before_tracing(good, tmp_path):
    out = tmp_path / "m.onnx"
    assert fails(["export", good, "-o", out, "-f", "onnx", "--input-size", "100000"]) == (
        "error: --input-size expects a whole number 1 to 4096, got 100000")
    assert fails(["export", good, "-o", out, "-f", "onnx", "--input-size", "4096", "--batch", "65536"]) == (
        "error: an example batch of 65536 x 1 x 4096 x 4096 is above the 268,435,456 values the exporter traces; "
        "lower --batch or --input-size")
    assert not out.exists()


def test_onnx_export_refuses_a_checkpoint_that_does_not_fit(good, tmp_path):
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(good.read_bytes())
    _rewrite(path, tensors=_swapped)
    out = tmp_path / "m.onnx"
    assert "does not fit this model: fc.weight is (32, 10)" in fails(["export", path, "-o", out, "-f", "onnx"])
    assert not out.exists()


def test_onnx_eval_of_a_model_with_fewer_outputs_than_classes_is_one_line(tmp_path):
    five = _saved(tmp_path / "five.safetensors", num_classes=5)
    out = tmp_path / "five.onnx"
    from cli_helpers import invoke

    assert invoke("export", five, "-o", out, "-f", "onnx").exit_code == 0
    assert fails(["eval", out]) == f"error: {out} gives 5 class scores per image; digits has 10 classes"


def _with_huge_constant(source: Path, out: Path) -> Path:
    """``source`` with a ConstantOfShape of 10**10 floats (40 GB) added to the graph's outputs."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(source))
    model.graph.initializer.append(numpy_helper.from_array(np.array([10**10], dtype=np.int64), "huge_shape"))
    model.graph.node.append(helper.make_node("ConstantOfShape", ["huge_shape"], ["huge"],
                                             value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])))
    model.graph.output.append(helper.make_tensor_value_info("huge", TensorProto.FLOAT, None))
    onnx.save(model, str(out))
    return out


def test_an_onnx_graph_asking_for_40_gb_is_refused_before_it_runs(good, tmp_path):
    from cli_helpers import invoke

    exported = tmp_path / "m.onnx"
    assert invoke("export", good, "-o", exported, "-f", "onnx").exit_code == 0
    huge = _with_huge_constant(exported, tmp_path / "huge.onnx")
    expected = (f"error: {huge}: the ONNX graph computes 'huge' of 10,000,000,000 elements (37.3 GiB), above the "
                "4 GiB acdc runs")
    assert fails(["eval", huge]) == expected
    assert fails(["bench", "--inference", huge, "--steps", "1"]) == expected
    assert fails(["inspect", huge]).startswith("error: ")
