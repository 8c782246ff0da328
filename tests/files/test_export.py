"""acdc export and the loader: exact round trips for every format and dtype, the compressed-tensors layout read
back with plain numpy, refusals, and ResNet-50 file sizes measured on disk."""

import json

import numpy as np
import pytest
import torch
import torchvision
from cli_helpers import fails, invoke, invoke_json, shows
from interop_helpers import compressed_tensors
from safetensors import safe_open

from acdc_cli import models
from acdc_cli.commands.export import export_checkpoint
from acdc_cli.config import Settings
from acdc_cli.files.checkpoint import Checkpoint, fold_masks, load_checkpoint, save_checkpoint
from acdc_cli.files.open import load, load_model
from acdc_cli.sparsity import formats as F
from acdc_cli.sparsity.masks import nm_mask

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FORMATS = ["sparse-24-bitmask", "sparse-bitmask", "dense"]


def _bits(t: torch.Tensor) -> torch.Tensor:
    if not t.is_floating_point():
        return t
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.fixture(scope="module")
def sources(quickstart_run, quickstart_24):
    """The quickstart's unstructured best_sparse and a 2:4 pruning of its best_dense."""
    return {"unstructured": quickstart_run / "best_sparse.safetensors", "2:4": quickstart_24[0]}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_is_exact_for_every_format_and_dtype(sources, tmp_path, fmt, dtype):
    source = sources["2:4" if fmt == "sparse-24-bitmask" else "unstructured"]
    out = tmp_path / f"{fmt}-{dtype}.safetensors"
    export_checkpoint(source, out, fmt, dtype)
    expected = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v
                for k, v in fold_masks(load_checkpoint(source)).items()}
    loaded = load(out)
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert torch.equal(_bits(loaded[name]), _bits(tensor)), name
    model = load_model(out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name].to(tensor.dtype)), name


def test_sparse_24_layout_read_back_with_numpy(sources, tmp_path):
    out = tmp_path / "24.safetensors"
    export_checkpoint(sources["2:4"], out, "sparse-24-bitmask")
    ckpt = load_checkpoint(sources["2:4"])
    with safe_open(str(out), framework="np") as fh:
        meta = fh.metadata()
        stored = {k: fh.get_tensor(k) for k in fh.keys()}
    layers = json.loads(meta["layers"])
    assert meta["format"] == "acdc-export" and meta["export_format"] == "sparse-24-bitmask"
    assert meta["dtype"] == "float32" and meta["structure"] == "2:4"
    assert set(layers) == set(ckpt.masks)  # the 2:4 layers; features.0 (1 input channel) stays dense
    assert "features.0.weight" in stored and "features.3.weight" not in stored
    for name, info in layers.items():
        prefix = name.removesuffix(".weight")
        weight = ckpt.weights[name].numpy()
        out_ch, in_ch = weight.shape[:2]
        cols = weight[0].size
        assert info["shape"] == list(weight.shape) and info["layout"] == ("OHWI" if weight.ndim == 4 else "OI")
        shape = stored[f"{prefix}.shape"]
        assert shape.dtype == np.int64 and shape.shape == (2, 1) and shape.ravel().tolist() == [out_ch, cols]
        values, bitmask = stored[f"{prefix}.compressed"], stored[f"{prefix}.bitmask"]
        assert values.dtype == np.float32 and values.shape == (out_ch, cols // 2)
        assert bitmask.dtype == np.uint8 and bitmask.shape == (out_ch, -(-cols // 8))
        keep = np.unpackbits(bitmask, axis=-1, count=cols, bitorder="little").astype(bool)
        assert (keep.reshape(-1, 4).sum(axis=1) == 2).all()
        rows = np.zeros((out_ch, cols), dtype=np.float32)
        rows[keep] = values.ravel()
        # rows are (O, kh, kw, I) flattened: undo that by hand
        dense = rows.reshape(out_ch, *weight.shape[2:], in_ch)
        dense = np.moveaxis(dense, -1, 1) if weight.ndim == 4 else dense
        assert np.array_equal(dense, weight), name
        kept_by_mask = ckpt.masks[name].numpy()
        kept_rows = np.moveaxis(kept_by_mask, 1, -1).reshape(out_ch, cols) if weight.ndim == 4 else kept_by_mask
        assert np.array_equal(keep, kept_rows), name  # the 2 values of each group are the ones the mask keeps


def test_sparse_bitmask_layout_has_row_offsets(sources, tmp_path):
    out = tmp_path / "bitmask.safetensors"
    export_checkpoint(sources["unstructured"], out, "sparse-bitmask", "bfloat16")
    weight = load_checkpoint(sources["unstructured"]).weights["classifier.1.weight"]
    with safe_open(str(out), framework="pt") as fh:
        meta = fh.metadata()
        parts = {p: fh.get_tensor(f"classifier.1.{p}") for p in ("compressed", "bitmask", "shape", "row_offsets")}
    assert parts["shape"].tolist() == list(weight.shape) and parts["shape"].dtype == torch.int64
    assert parts["compressed"].dim() == 1 and parts["compressed"].dtype == torch.bfloat16
    per_row = (weight.to(torch.bfloat16) != 0).sum(dim=1)
    assert parts["compressed"].numel() == int(per_row.sum())
    assert parts["row_offsets"].tolist() == [0] + torch.cumsum(per_row, 0)[:-1].tolist()
    assert json.loads(meta["sparsity_config"])["format"] == "sparse-bitmask"


def _sparsity_config(path) -> dict:
    with safe_open(str(path), framework="pt") as fh:
        return json.loads(fh.metadata()["sparsity_config"])


@pytest.mark.parametrize("kind", ["unstructured", "2:4"])
def test_sparsity_config_names_modules(sources, tmp_path, kind):
    """compressed-tensors matches targets/ignore against model.named_modules(): they must be module names."""
    fmt = "sparse-24-bitmask" if kind == "2:4" else "sparse-bitmask"
    out = tmp_path / "e.safetensors"
    export_checkpoint(sources[kind], out, fmt)
    config = _sparsity_config(out)
    modules = dict(load_model(out).named_modules())
    compressed = [n.removesuffix(".weight") for n in load_checkpoint(sources[kind]).masks]
    assert sorted(config["targets"]) == sorted(compressed)
    assert all(isinstance(modules[name], (torch.nn.Conv2d, torch.nn.Linear)) for name in config["targets"])
    # 2:4: the first conv (1 input channel) has no mask and stays dense; unstructured prunes every layer
    assert config["ignore"] == (["features.0"] if kind == "2:4" else [])
    assert config["sparsity_structure"] == ("2:4" if kind == "2:4" else "unstructured")


def test_native_conv_layout_is_the_default_and_keeps_the_weight_shape(sources, tmp_path):
    out = tmp_path / "native.safetensors"
    result = export_checkpoint(sources["unstructured"], out, "sparse-bitmask")
    ckpt = load_checkpoint(sources["unstructured"])
    expected = fold_masks(ckpt)
    with safe_open(str(out), framework="pt") as fh:
        meta = fh.metadata()
        stored = {k: fh.get_tensor(k) for k in fh.keys()}
    layers = json.loads(meta["layers"])
    assert meta["conv_layout"] == "native" and result.as_dict()["conv_layout"] == "native"
    weight = expected["features.3.weight"]  # 32 x 32 x 3 x 3
    assert layers["features.3.weight"]["layout"] == "OIHW" and layers["classifier.1.weight"]["layout"] == "OI"
    assert stored["features.3.shape"].tolist() == [32, 32, 3, 3]
    assert stored["features.3.bitmask"].shape == (32, 32, 3, 1)  # packed along kw, one byte per 3 weights
    keep = np.unpackbits(stored["features.3.bitmask"].numpy(), axis=-1, count=3, bitorder="little").astype(bool)
    assert np.array_equal(keep, (weight != 0).numpy())
    assert torch.equal(stored["features.3.compressed"], weight[weight != 0])  # OIHW row-major order
    per_channel = (weight != 0).reshape(32, -1).sum(dim=1)
    assert stored["features.3.row_offsets"].tolist() == [0] + torch.cumsum(per_channel, 0)[:-1].tolist()
    loaded = load(out)
    assert all(torch.equal(_bits(loaded[k]), _bits(v)) for k, v in expected.items())
    rows = tmp_path / "rows.safetensors"
    compact = export_checkpoint(sources["unstructured"], rows, "sparse-bitmask", conv_layout="rows")
    assert compact.size_bytes < result.size_bytes and compact.conv_layout == "rows"
    assert json.loads(load_metadata_of(rows)["layers"])["features.3.weight"]["layout"] == "OHWI"
    assert all(torch.equal(_bits(load(rows)[k]), _bits(v)) for k, v in expected.items())


def load_metadata_of(path) -> dict:
    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata()


@pytest.mark.parametrize("fmt", ["sparse-24-bitmask", "dense"])
def test_native_conv_layout_only_for_sparse_bitmask(sources, tmp_path, fmt):
    out = tmp_path / "x.safetensors"
    result = invoke("export", sources["2:4"], "--format", fmt, "--conv-layout", "native", "-o", out)
    assert result.exit_code == 2 and "sparse-bitmask only" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
    rows = invoke("export", sources["2:4"], "--format", fmt, "--conv-layout", "rows", "-o", out)
    if fmt == "dense":  # a dense export keeps every weight in its own shape
        assert rows.exit_code == 2 and "sparse-bitmask only" in rows.stderr and not out.exists()
    else:  # rows is the only 2:4 layout: naming it is allowed
        assert rows.exit_code == 0, rows.stderr
        assert json.loads(load_metadata_of(out)["layers"])["features.3.weight"]["layout"] == "OHWI"


def test_export_cli_prints_statistics_and_refuses_overwrite(sources, tmp_path):
    out = tmp_path / "cli.safetensors"
    result = invoke("export", sources["unstructured"], "--format", "sparse-bitmask", "-o", out)
    assert result.exit_code == 0, result.output
    for text in ("sparsity", "kept", "stored", "total", "× a dense export"):
        assert shows(text, result.stdout), text
    assert "--force" in fails(["export", sources["unstructured"], "--format", "dense", "-o", out])
    data = invoke_json("export", sources["unstructured"], "--format", "dense", "-o", out, "--force")
    assert data["format"] == "dense" and data["size_bytes"] == out.stat().st_size
    assert abs(data["sparsity"] - 0.9) < 1e-3 and all(0 <= layer["sparsity"] <= 1 for layer in data["layers"])


def test_sparse_24_refuses_weights_that_are_not_2_4(sources, tmp_path):
    out = tmp_path / "no.safetensors"
    line = fails(["export", sources["unstructured"], "--format", "sparse-24-bitmask", "-o", out])
    assert "acdc prune" in line and "--structure 2:4" in line
    assert not out.exists()


def test_unknown_format_and_dtype_are_one_line_errors(sources, tmp_path):
    for args in (("--format", "csr"), ("--format", "dense", "--dtype", "int8")):
        fails(["export", sources["unstructured"], *args, "-o", tmp_path / "x.safetensors"])


@pytest.fixture(scope="module")
def resnet50_exports(tmp_path_factory):
    """ResNet-50 from the registry, fp32: a 2:4 checkpoint (the engine's N:M masks) and a 95 % unstructured one,
    each exported, plus the dense export. File sizes depend only on which weights are kept, so the 95 % mask is a
    seeded random one (the engine's exact magnitude counts are tested on the quickstart models)."""
    folder = tmp_path_factory.mktemp("resnet50")
    torch.manual_seed(0)
    model = models.create("resnet50", num_classes=1000)
    weights = {k: v.detach() for k, v in model.state_dict().items()}
    config = Settings(model={"name": "resnet50"}, data={"name": "synthetic"}).model_dump(mode="json")
    prunable = [n for n, t in weights.items() if n.endswith("weight") and t.dim() in (2, 4)]
    g = torch.Generator().manual_seed(0)
    masks = {
        "2:4": {n: nm_mask(weights[n], 2, 4) for n in prunable if weights[n].shape[1] % 4 == 0},
        "95": {n: torch.rand(weights[n].shape, generator=g) >= 0.95 for n in prunable},
    }
    files = {}
    for kind, kind_masks in masks.items():
        ckpt_path = folder / f"{kind.replace(':', '')}.safetensors"
        masked = {n: t * kind_masks[n] if n in kind_masks else t for n, t in weights.items()}
        save_checkpoint(ckpt_path, Checkpoint(masked, kind_masks, "resnet50", {"num_classes": 1000}, config, 0, "sparse"))
        fmt = "sparse-24-bitmask" if kind == "2:4" else "sparse-bitmask"
        files[kind] = export_checkpoint(ckpt_path, folder / f"{kind.replace(':', '')}-export.safetensors", fmt)
        files[f"{kind}-checkpoint"] = ckpt_path
    files["dense"] = export_checkpoint(files["95-checkpoint"], folder / "dense.safetensors", "dense")
    files["95 rows"] = export_checkpoint(files["95-checkpoint"], folder / "95-rows.safetensors", "sparse-bitmask",
                                         conv_layout="rows")
    return files


@pytest.mark.slow  # builds and writes ResNet-50 three times (~20 s); CI runs it in its slow pass
def test_resnet50_sizes_on_disk(resnet50_exports):
    dense = resnet50_exports["dense"].path.stat().st_size
    two_four = resnet50_exports["2:4"].path.stat().st_size
    unstructured = resnet50_exports["95"].path.stat().st_size  # conv weights in their own shape (the default)
    rows = resnet50_exports["95 rows"].path.stat().st_size
    assert dense > 100e6  # 25.6 M fp32 parameters
    assert two_four <= 0.56 * dense
    assert rows <= 0.10 * dense
    # a bitmask packed along kw: a byte per 1x1-conv weight and per 3 weights of a 3x3 conv (docs/files.md: 0.214)
    assert 0.20 * dense <= unstructured <= 0.23 * dense
    assert resnet50_exports["95"].sparsity > 0.949 and resnet50_exports["95 rows"].sparsity > 0.949
    # the reported reference is the dense export of the same weights (metadata sizes differ slightly)
    assert abs(resnet50_exports["95"].dense_bytes - dense) / dense < 1e-3


@pytest.mark.slow  # builds and writes ResNet-50 three times (~20 s); CI runs it in its slow pass
def test_resnet50_dense_export_loads_into_torchvision(resnet50_exports):
    state = load(resnet50_exports["dense"].path)
    net = torchvision.models.resnet50()
    net.load_state_dict(state)  # strict: every key and shape matches torchvision's definition
    assert float((net.layer1[0].conv1.weight == 0).float().mean()) > 0.9


@pytest.mark.slow  # builds and writes ResNet-50 three times (~20 s); CI runs it in its slow pass
def test_resnet50_24_export_round_trip(resnet50_exports):
    expected = fold_masks(load_checkpoint(resnet50_exports["2:4-checkpoint"]))
    loaded = load(resnet50_exports["2:4"].path)
    assert all(torch.equal(_bits(loaded[k]), _bits(v)) for k, v in expected.items())
    with safe_open(str(resnet50_exports["2:4"].path), framework="pt") as fh:
        keys = set(fh.keys())
    assert "conv1.weight" in keys and "conv1.compressed" not in keys  # 3 input channels: stored as it is
    assert {"fc.compressed", "fc.bitmask", "fc.shape", "layer4.2.conv3.compressed"} <= keys
    assert "fc.weight" not in keys and "fc.bias" in keys


# ----------------------------------------------------------------------------------------------------------------
# compressed-tensors reads the exports with its own code: run with the library installed (0.12.x-0.14.x)


@pytest.mark.interop
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["unstructured", "2:4"])
def test_compressed_tensors_module_matching_finds_every_pruned_module(sources, tmp_path, kind):
    compressed_tensors()
    from compressed_tensors.utils.match import match_named_modules

    out = tmp_path / "e.safetensors"
    export_checkpoint(sources[kind], out, "sparse-24-bitmask" if kind == "2:4" else "sparse-bitmask")
    config = _sparsity_config(out)
    matched = {name for name, _ in match_named_modules(load_model(out), config["targets"], config["ignore"])}
    pruned = {n.removesuffix(".weight") for n in load_checkpoint(sources[kind]).masks}
    assert matched == pruned and len(pruned) >= 5


@pytest.mark.interop
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["unstructured", "2:4"])
def test_compressed_tensors_decompresses_rows_bit_exactly(sources, tmp_path, kind):
    """The library's own compressor decodes every layer to acdc's (O, kh·kw·I) rows; acdc's reader restores the
    conv shape from the recorded layout."""
    compressed_tensors()
    from compressed_tensors.compressors import ModelCompressor

    out = tmp_path / "e.safetensors"
    export_checkpoint(sources[kind], out, "sparse-24-bitmask" if kind == "2:4" else "sparse-bitmask",
                      conv_layout="rows")
    compressor = ModelCompressor.from_compression_config({"sparsity_config": _sparsity_config(out)})
    decoded = dict(compressor.sparsity_compressor.decompress(str(out)))
    expected = fold_masks(load_checkpoint(sources[kind]))
    assert set(decoded) == set(expected)
    for name, tensor in expected.items():
        want = F.to_rows(tensor) if name in load_checkpoint(sources[kind]).masks else tensor
        assert torch.equal(_bits(decoded[name]), _bits(want)), name


@pytest.mark.interop
@pytest.mark.slow
def test_compressed_tensors_model_compressor_restores_native_layout(sources, tmp_path):
    """With the native layout (the default), ModelCompressor.decompress puts every weight back into the model in its own
    shape, without acdc's reader: the model computes exactly what acdc's loader gives."""
    compressed_tensors()
    from compressed_tensors.compressors import ModelCompressor

    out = tmp_path / "native.safetensors"
    export_checkpoint(sources["unstructured"], out, "sparse-bitmask")
    config = _sparsity_config(out)
    reference = load_model(out).eval()
    model = load_model(out).eval()
    with torch.no_grad():
        for name in config["targets"]:
            model.get_submodule(name).weight.fill_(7.0)
    ModelCompressor.from_compression_config({"sparsity_config": config}).decompress(str(out), model)
    for name in config["targets"]:
        restored, want = model.get_submodule(name).weight, reference.get_submodule(name).weight
        assert restored.shape == want.shape and torch.equal(restored, want), name
    images = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(images), reference(images))
