"""acdc export --format onnx: ONNX Runtime (CPU) reproduces PyTorch's logits, the initializers read back with `onnx`
keep every pruned zero (and the 2:4 pattern along input channels), names, batch, opset and metadata are as promised."""

import json
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from acdc_cli.cli.app import app
from acdc_cli.commands.prune import prune_checkpoint
from acdc_cli.errors import TrainingFault
from acdc_cli.files.checkpoint import fold_masks, load_checkpoint
from acdc_cli.files.open import load_model

onnx = pytest.importorskip("onnx", reason="the 'onnx' extra is not installed (pip install -e '.[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="the 'onnx' extra is not installed (pip install -e '.[onnx]')")
from onnx import numpy_helper  # noqa: E402

from acdc_cli.commands.export_onnx import check_initializers
from acdc_cli.files.onnx_file import OnnxRuntimeModule, session


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def sources(quickstart_run, tmp_path_factory):
    """The quickstart's unstructured best_sparse and a 2:4 pruning of its best_dense."""
    pruned = tmp_path_factory.mktemp("onnx-sources") / "pruned24.safetensors"
    prune_checkpoint(quickstart_run / "best_dense.safetensors", pruned, structure="2:4")
    return {"unstructured": quickstart_run / "best_sparse.safetensors", "2:4": pruned}


def export_json(*args) -> dict:
    result = invoke("export", *args, "--format", "onnx", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def by_name(proto) -> dict[str, np.ndarray]:
    """Every initializer by name, dense ones and sparse ones (values at their linear indices), read with onnx."""
    stored = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
    for sparse in proto.graph.sparse_initializer:
        values, indices = numpy_helper.to_array(sparse.values), numpy_helper.to_array(sparse.indices)
        dense = np.zeros(int(np.prod(sparse.dims)), values.dtype)
        dense[indices] = values
        stored[sparse.values.name] = dense.reshape(tuple(sparse.dims))
    return stored


def two_of_four_along_input_channels(weight: np.ndarray) -> bool:
    """At most 2 non-zeros in every group of 4 consecutive input channels at each (out, kh, kw), by hand."""
    channels_last = np.moveaxis(weight, 1, -1) if weight.ndim == 4 else weight
    groups = channels_last.reshape(*channels_last.shape[:-1], -1, 4)
    return bool(((groups != 0).sum(axis=-1) <= 2).all())


def pytorch_logits(path, images: torch.Tensor) -> np.ndarray:
    model = load_model(path).eval()
    with torch.no_grad():
        return model(images).numpy()


@pytest.mark.parametrize("kind", ["unstructured", "2:4"])
def test_onnx_runtime_matches_pytorch_and_initializers_keep_the_zeros(sources, tmp_path, kind):
    out = tmp_path / "model.onnx"
    data = export_json(sources[kind], "-o", out)
    proto = onnx.load(str(out))
    ckpt = load_checkpoint(sources[kind])
    expected = fold_masks(ckpt)

    # names, dynamic batch, metadata
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 8, 8]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["format"] == "acdc-onnx" and meta["arch"] == "digits-cnn" and meta["preset"] == "quickstart"
    assert meta["structure"] == ("2:4" if kind == "2:4" else "unstructured")
    assert json.loads(meta["sparsity"]) == pytest.approx(data["sparsity"], abs=1e-12)
    assert json.loads(meta["model_kwargs"])["num_classes"] == 10
    # BatchNorm is kept, not folded into the conv initializers
    assert sum(node.op_type == "BatchNormalization" for node in proto.graph.node) == 4

    # initializers read back with onnx: the checkpoint's weights bit for bit, so the same zeros per layer
    stored = by_name(proto)
    assert set(ckpt.masks) <= set(stored)
    for name, mask in ckpt.masks.items():
        weight = expected[name].numpy()
        assert stored[name].dtype == np.float32 and np.array_equal(stored[name].view(np.int32), weight.view(np.int32))
        assert (stored[name][~mask.numpy()] == 0).all()
        layer = next(layer for layer in data["layers"] if layer["name"] == name)
        assert layer["sparsity"] == pytest.approx(float((weight == 0).mean()), abs=1e-12)
        assert layer["exact"] and layer["zeros_kept"]
        if kind == "2:4":
            assert two_of_four_along_input_channels(stored[name]), name
            assert layer["nm_valid"] is True
    if kind == "unstructured":
        assert abs(data["sparsity"] - 0.9) < 1e-3

    # ONNX Runtime on the CPU, batch 1 and 64, against PyTorch on the same inputs
    sess = session(out)
    generator = torch.Generator().manual_seed(1)
    for batch in (1, 64):
        images = torch.randn(batch, 1, 8, 8, generator=generator)
        got = sess.run(["logits"], {"input": images.numpy()})[0]
        assert got.shape == (batch, 10)
        assert np.abs(got - pytorch_logits(sources[kind], images)).max() <= 1e-4
    assert data["max_abs_diff"] <= 1e-4


def test_fixed_batch_and_opset(sources, tmp_path):
    out = tmp_path / "b1.onnx"
    data = export_json(sources["unstructured"], "-o", out, "--batch", "1", "--opset", "18")
    proto = onnx.load(str(out))
    assert data["batch"] == 1 and data["opset"] == 18 and data["input_shape"] == [1, 1, 8, 8]
    assert next(o.version for o in proto.opset_import if o.domain == "") == 18
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    # a fixed-batch model still evaluates any number of images: in chunks, the last one padded
    runner = OnnxRuntimeModule(session(out))
    images = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    assert np.abs(runner(images).numpy() - pytorch_logits(sources["unstructured"], images)).max() <= 1e-4


def test_fold_bn_rechecks_the_2_4_pattern(sources, tmp_path):
    out = tmp_path / "folded.onnx"
    result = invoke("export", sources["2:4"], "-f", "onnx", "-o", out, "--fold-bn")
    assert result.exit_code == 0, result.output
    assert "folded 4 of 4 BatchNorm layers" in result.stdout and "2:4 kept in every 2:4 layer" in result.stdout
    proto = onnx.load(str(out))
    assert not any(node.op_type == "BatchNormalization" for node in proto.graph.node)
    stored = by_name(proto)
    ckpt = load_checkpoint(sources["2:4"])
    conv = "features.3.weight"
    # folding scales each output channel: the values change, the zeros and the 2:4 groups stay
    assert not np.array_equal(stored[conv], fold_masks(ckpt)[conv].numpy())
    for name, mask in ckpt.masks.items():
        assert (stored[name][~mask.numpy()] == 0).all() and two_of_four_along_input_channels(stored[name]), name
    images = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    got = session(out).run(None, {"input": images.numpy()})[0]
    assert np.abs(got - pytorch_logits(sources["2:4"], images)).max() <= 1e-4


def test_the_check_refuses_an_initializer_that_lost_a_zero(sources, tmp_path):
    """The read-back check behind every ONNX export fails when a pruned position holds a value."""
    out = tmp_path / "m.onnx"
    export_json(sources["2:4"], "-o", out)
    proto = onnx.load(str(out))
    ckpt = load_checkpoint(sources["2:4"])
    weights, name = fold_masks(ckpt), "features.7.weight"
    layers = check_initializers(proto, weights, ckpt.masks, list(ckpt.masks), exact=True, structure="2:4")
    assert all(layer.nm_valid and layer.exact for layer in layers)
    init = next(i for i in proto.graph.initializer if i.name == name)
    broken = numpy_helper.to_array(init).copy()
    pruned = np.argwhere(~ckpt.masks[name].numpy())[0]
    broken[tuple(pruned)] = 0.5
    init.CopyFrom(numpy_helper.from_array(broken, name))
    with pytest.raises(TrainingFault, match=name):
        check_initializers(proto, weights, ckpt.masks, list(ckpt.masks), exact=False, structure="2:4")


@pytest.mark.parametrize("args, message", [
    (("-f", "onnx", "--batch", "0"), "--batch expects"),
    (("-f", "onnx", "--opset", "12"), "--opset 12 is not available"),
    (("-f", "onnx", "--dtype", "float16"), "writes float32"),
    (("-f", "onnx", "--input-size", "0"), "--input-size expects"),
    (("-f", "dense", "--fold-bn"), "--fold-bn applies to --format onnx only"),
    (("-f", "sparse-bitmask", "--no-onnx-sparse"), "--onnx-sparse/--no-onnx-sparse applies to --format onnx only"),
])
def test_bad_onnx_options_are_one_line_errors(sources, tmp_path, args, message):
    out = tmp_path / "x.onnx"
    result = invoke("export", sources["unstructured"], *args, "-o", out)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output
    assert not out.exists()


def test_missing_extra_names_it(sources, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    result = invoke("export", sources["unstructured"], "-f", "onnx", "-o", tmp_path / "m.onnx")
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: ONNX needs the optional extra 'onnx' (onnxruntime is not installed): "
                                     "pip install 'acdc-cli[onnx]'")


@pytest.mark.parametrize("damage", ["external-data", "short-initializer", "sparse-index-out-of-range",
                                    "sparse-negative-index"])
def test_hostile_onnx_files_are_one_line_errors(sources, tmp_path, damage):
    """`acdc eval` / `bench --inference` read ONNX files: an initializer pointing to another file, one whose data
    does not fit its shape, or a sparse one with an index outside its shape, is refused with one line."""
    out = tmp_path / "m.onnx"
    sparse = damage.startswith("sparse")
    export_json(sources["unstructured"], "-o", out, "--onnx-sparse" if sparse else "--no-onnx-sparse")
    proto = onnx.load(str(out))
    if sparse:
        init = next(t.indices for t in proto.graph.sparse_initializer if t.values.name == "classifier.1.weight")
        indices = numpy_helper.to_array(init).copy()
        indices[-1] = 10**6 if damage == "sparse-index-out-of-range" else -1
        init.CopyFrom(numpy_helper.from_array(indices, init.name))
    elif damage == "external-data":
        init = next(i for i in proto.graph.initializer if i.name == "classifier.1.weight")
        init.data_location = onnx.TensorProto.EXTERNAL
        init.external_data.add(key="location", value="/etc/passwd")
        init.ClearField("raw_data")
    else:
        init = next(i for i in proto.graph.initializer if i.name == "classifier.1.weight")
        init.raw_data = init.raw_data[:100]
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(proto.SerializeToString())
    for command in (["eval", bad], ["bench", "--inference", bad, "--steps", "1"]):
        result = invoke(*command)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "classifier.1.weight" in lines[0], result.stderr


def test_sparse_initializers_make_a_90_percent_sparse_file_small_and_onnx_runtime_reads_them(sources, tmp_path):
    """A 90 %-sparse checkpoint is written with its pruned layers as ONNX sparse initializers by default: the file is
    well under half the dense-initializer one, every value reads back bit for bit, and ONNX Runtime gives the very
    logits of the dense layout."""
    sparse_out, dense_out = tmp_path / "sparse.onnx", tmp_path / "dense.onnx"
    sparse_data = export_json(sources["unstructured"], "-o", sparse_out)
    dense_data = export_json(sources["unstructured"], "-o", dense_out, "--no-onnx-sparse")
    ckpt = load_checkpoint(sources["unstructured"])
    # global magnitude pruning leaves some layers under 2/3 zeros: 12 bytes per kept value (fp32 + int64 index)
    # would make those bigger than 4 bytes per value, so they stay dense
    smaller = {name for name, mask in ckpt.masks.items() if 12 * int(mask.sum()) < 4 * mask.numel()}
    assert len(smaller) >= len(ckpt.masks) // 2
    assert set(sparse_data["sparse_initializers"]) == smaller and dense_data["sparse_initializers"] == []
    assert sparse_out.stat().st_size == sparse_data["size_bytes"] < 0.4 * dense_out.stat().st_size
    sparse_proto, dense_proto = onnx.load(str(sparse_out)), onnx.load(str(dense_out))
    onnx.checker.check_model(sparse_proto)
    assert {t.values.name for t in sparse_proto.graph.sparse_initializer} == smaller
    assert not dense_proto.graph.sparse_initializer
    stored, expected = by_name(sparse_proto), by_name(dense_proto)
    assert stored.keys() == expected.keys()
    for name, value in expected.items():
        assert stored[name].dtype == value.dtype and np.array_equal(stored[name].view(np.uint8), value.view(np.uint8))
    # each sparse initializer holds exactly the layer's non-zeros
    for sparse in sparse_proto.graph.sparse_initializer:
        assert sparse.values.dims[0] == int(np.count_nonzero(expected[sparse.values.name]))
    images = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(4)).numpy()
    got = session(sparse_out).run(["logits"], {"input": images})[0]
    assert np.array_equal(got, session(dense_out).run(["logits"], {"input": images})[0])
    assert np.abs(got - pytorch_logits(sources["unstructured"], torch.from_numpy(images))).max() <= 1e-4
    # acdc's own reader (eval, inspect, bench --inference) sees the same weights
    from acdc_cli.files.onnx_file import initializers
    assert all(np.array_equal(initializers(sparse_proto)[name], value) for name, value in expected.items())


def test_sparse_initializers_only_where_smaller(sources, tmp_path):
    """A 2:4 layer (half zeros) is smaller dense: asked for sparse initializers, the export keeps it dense."""
    out = tmp_path / "24.onnx"
    data = export_json(sources["2:4"], "-o", out, "--onnx-sparse")
    assert data["sparse_initializers"] == [] and not onnx.load(str(out)).graph.sparse_initializer


def test_existing_output_is_kept_without_force(sources, tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"keep me")
    result = invoke("export", sources["unstructured"], "-f", "onnx", "-o", out)
    assert result.exit_code == 2 and "--force" in result.stderr and out.read_bytes() == b"keep me"


@pytest.mark.slow
def test_resnet50_2_4_prune_exports_to_onnx(tmp_path):
    """ResNet-50: a 2:4 prune of a (random-init) ResNet-50 checkpoint, exported at 224x224."""
    from acdc_cli import models
    from acdc_cli.config import Settings
    from acdc_cli.files.checkpoint import Checkpoint, save_checkpoint

    torch.manual_seed(0)
    weights = {k: v.detach() for k, v in models.create("resnet50", num_classes=1000).state_dict().items()}
    config = Settings(model={"name": "resnet50"}, data={"name": "synthetic"}).model_dump(mode="json")
    dense = tmp_path / "dense.safetensors"
    save_checkpoint(dense, Checkpoint(weights, {}, "resnet50", {"num_classes": 1000}, config, 0, "dense"))
    pruned = tmp_path / "pruned24.safetensors"
    prune_checkpoint(dense, pruned, structure="2:4")
    out = tmp_path / "resnet50-24.onnx"
    data = export_json(pruned, "-o", out)
    assert data["input_shape"] == ["batch", 3, 224, 224] and data["max_abs_diff"] <= 1e-4
    stored = by_name(onnx.load(str(out)))
    ckpt = load_checkpoint(pruned)
    assert len(ckpt.masks) == 53  # every conv but the 3-channel stem, and fc
    for name, mask in ckpt.masks.items():
        assert (stored[name][~mask.numpy()] == 0).all() and two_of_four_along_input_channels(stored[name]), name


def test_the_metadata_preprocessing_alone_gives_acdc_evals_logits(quickstart_run, tmp_path):
    """A reader with only the ONNX file: the raw uint8 test images, prepared as its metadata says (shape, channel
    order, /255, mean, std) and run on ONNX Runtime, give the logits acdc eval computes, and its top-1."""
    from acdc_cli import data as data_mod
    from acdc_cli.config import load_settings
    from acdc_cli.data import digits
    from acdc_cli.files.open import open_any

    out = tmp_path / "model.onnx"
    export_json(quickstart_run / "best_sparse.safetensors", "--out", out)
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    pre = json.loads(meta["preprocessing"])
    assert pre["input_shape"] == [1, 8, 8] and pre["channel_order"] == "gray" and pre["resize_shorter_side"] is None
    # the checkpoint and acdc inspect carry the same record
    ckpt_meta = json.loads(invoke("inspect", quickstart_run / "best_sparse.safetensors", "--json").stdout)
    assert ckpt_meta["preprocessing"] == pre

    # acdc eval's logits: its own loader over the test split, through the same ONNX session
    opened = open_any(out)
    settings = load_settings(base=opened.config, flags={"runtime.device": "cpu"})
    bundle = data_mod.build(settings, torch.device("cpu"))
    model = opened.model()
    batches = list(bundle.test)
    acdc_logits = torch.cat([model(x) for x, _ in batches]).numpy()
    labels = torch.cat([y for _, y in batches]).numpy()

    # the reader's: raw pixels of the same images, prepared from the metadata only
    images, all_labels = digits.load()
    _, test = digits.split_test(len(all_labels))
    assert np.array_equal(all_labels[test].numpy(), labels)
    raw = images[test].numpy().astype(np.float32)  # uint8 (N, 1, 8, 8) as stored
    mean = np.asarray(pre["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(pre["std"], np.float32).reshape(1, -1, 1, 1)
    prepared = (raw * np.float32(pre["pixel_scale"]) - mean) / std
    assert list(prepared.shape[1:]) == pre["input_shape"]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    reader_logits = sess.run(None, {sess.get_inputs()[0].name: prepared.astype(np.float32)})[0]
    np.testing.assert_allclose(reader_logits, acdc_logits, atol=1e-4, rtol=1e-4)
    top1 = float((reader_logits.argmax(1) == labels).mean())
    evaluated = json.loads(invoke("eval", out, "--split", "test", "--json").stdout)
    assert evaluated["top1"] == top1 and top1 > 0.8
