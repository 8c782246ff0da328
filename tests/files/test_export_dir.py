"""acdc export to a directory: model.safetensors and the config.json compressed-tensors' ModelCompressor.from_pretrained
reads, acdc reading the directory back, the layouts a directory refuses, and (with compressed-tensors 0.12-0.14
installed) the library's own from_pretrained -> decompress(dir, model) restoring the exact model."""

import json

import pytest
import torch
from cli_helpers import invoke, invoke_json
from interop_helpers import compressed_tensors
from safetensors import safe_open

from acdc_cli import models
from acdc_cli.commands.export import export_checkpoint
from acdc_cli.files.checkpoint import fold_masks, load_checkpoint
from acdc_cli.files.open import load, load_model

SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(SAME_WIDTH_INT[t.element_size()]) if t.is_floating_point() else t


def _meta(path) -> dict:
    with safe_open(str(path), framework="pt") as fh:
        return {k: json.loads(v) if v[:1] in "{[" else v for k, v in fh.metadata().items()}


@pytest.fixture(scope="module")
def sources(quickstart_run, quickstart_24, tmp_path_factory):
    """The quickstart's unstructured best_sparse, its 2:4 pruning (conv layers included) and a 2:4 pruning of the
    classifier's linear layers only."""
    linear = tmp_path_factory.mktemp("linear24") / "l24.safetensors"
    invoke_json("prune", quickstart_run / "best_dense.safetensors", "--structure", "2:4", "--include", "classifier.*",
                "-o", linear)
    return {"unstructured": quickstart_run / "best_sparse.safetensors", "2:4": quickstart_24[0], "linear 2:4": linear}


def test_directory_export_writes_model_and_config(sources, tmp_path):
    out = tmp_path / "exported"  # no suffix, not there yet: a directory
    result = invoke_json("export", sources["unstructured"], "--format", "sparse-bitmask", "-o", out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert result["path"] == str(out / "model.safetensors") and result["config_path"] == str(out / "config.json")
    assert result["conv_layout"] == "native"
    config = json.loads((out / "config.json").read_text())
    meta = _meta(out / "model.safetensors")
    ckpt = load_checkpoint(sources["unstructured"])
    # transformers' AutoConfig needs a model_type it knows; the rest is timm's config of an image classifier
    assert config["model_type"] == "timm_wrapper" and config["architecture"] == ckpt.arch == "digits-cnn"
    assert config["num_classes"] == 10 and config["label_names"] == [str(i) for i in range(10)]
    prep = meta["preprocessing"]
    assert prep["input_shape"] == [1, 8, 8] and len(prep["mean"]) == 1
    assert config["pretrained_cfg"] == {"input_size": [1, 8, 8], "interpolation": "bilinear", "crop_pct": 1.0,
                                        "crop_mode": "center", "mean": prep["mean"], "std": prep["std"],
                                        "num_classes": 10}
    sparsity = meta["sparsity_config"]
    assert config["quantization_config"] == {"quant_method": "compressed-tensors", "sparsity_config": sparsity}
    assert sparsity["format"] == "sparse-bitmask"
    assert sorted(sparsity["targets"]) == sorted(n.removesuffix(".weight") for n in ckpt.masks)
    assert config["acdc"]["weights"] == "model.safetensors" and config["acdc"]["preprocessing"] == prep
    assert config["acdc"]["model_kwargs"] == ckpt.model_kwargs and config["acdc"]["conv_layout"] == "native"
    # acdc reads the directory as the file in it, bit for bit
    expected = fold_masks(ckpt)
    for name, tensor in load(out).items():
        assert torch.equal(_bits(tensor), _bits(expected[name])), name
    shown = invoke_json("inspect", out)
    assert shown["format"] == "sparse-bitmask" and shown["kind"] == "export"
    evaluated = invoke_json("eval", out)
    assert evaluated["kind"] == "export" and evaluated["loss"] == invoke_json("eval", sources["unstructured"])["loss"]
    assert evaluated["top1"] == evaluated["recorded_val_top1"]


def test_directory_export_into_an_existing_folder_and_force(sources, tmp_path):
    out = tmp_path / "models.v1"  # an existing directory, whatever its name
    out.mkdir()
    (out / "README.md").write_text("mine")
    invoke_json("export", sources["unstructured"], "--format", "dense", "-o", out)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["acdc"]["export_format"] == "dense"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = invoke("export", sources["unstructured"], "--format", "sparse-bitmask", "-o", out)
    assert again.exit_code == 2 and "model.safetensors exists; pass --force" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing overwritten
    forced = invoke("export", sources["unstructured"], "--format", "sparse-bitmask", "-o", out, "--force")
    assert forced.exit_code == 0, forced.stderr
    assert "config.json" in forced.stdout and (out / "README.md").read_text() == "mine"
    assert json.loads((out / "config.json").read_text())["acdc"]["export_format"] == "sparse-bitmask"


@pytest.mark.parametrize(("kind", "args", "said"), [
    ("unstructured", ("--format", "sparse-bitmask", "--conv-layout", "rows"),
     "features.0.weight would be stored as 32×9 rows"),
    ("2:4", ("--format", "sparse-24-bitmask"), "features.3.weight would be stored as 32×288 rows"),
])
def test_directory_refuses_layouts_compressed_tensors_would_load_wrongly(sources, tmp_path, kind, args, said):
    """A conv weight stored as 2-D rows would go into its Conv2d as it is: a directory export refuses it, writes
    nothing, and a file export of the same still works."""
    out = tmp_path / "d"
    result = invoke("export", sources[kind], *args, "-o", out)
    assert result.exit_code == 2 and said in result.stderr
    assert ("a 2:4 conv weight has no other layout" if kind == "2:4" else "drop --conv-layout rows") in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
    assert invoke("export", sources[kind], *args, "-o", tmp_path / "f.safetensors").exit_code == 0


def test_linear_only_24_goes_to_a_directory(sources, tmp_path):
    out = tmp_path / "d24"
    export_checkpoint(sources["linear 2:4"], out, "sparse-24-bitmask")
    sparsity = json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sparsity["sparsity_structure"] == "2:4" and sorted(sparsity["targets"]) == ["classifier.1", "classifier.4"]
    assert "features.3" in sparsity["ignore"]
    expected = fold_masks(load_checkpoint(sources["linear 2:4"]))
    assert all(torch.equal(load(out)[k], v) for k, v in expected.items())


def test_a_folder_without_model_file_is_one_line(tmp_path):
    result = invoke("inspect", tmp_path)
    assert result.exit_code == 2 and "is a directory without model.safetensors" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------------------------
# compressed-tensors' own entry point, with the library installed (0.12.x-0.14.x)


def _model_compressor():
    compressed_tensors()
    from compressed_tensors.compressors import ModelCompressor

    return ModelCompressor


def _fresh_model(directory):
    """The model config.json names, built anew (its own random weights), as a user of the directory would."""
    config = json.loads((directory / "config.json").read_text())
    model = models.create(config["architecture"], **config["acdc"]["model_kwargs"])
    return model.eval()


@pytest.mark.interop
@pytest.mark.slow
@pytest.mark.parametrize(("kind", "fmt", "dtype"), [
    ("unstructured", "sparse-bitmask", "float32"),
    ("unstructured", "sparse-bitmask", "bfloat16"),
    ("linear 2:4", "sparse-24-bitmask", "float32"),
])
def test_from_pretrained_then_decompress_restores_the_model_bit_exactly(sources, tmp_path, kind, fmt, dtype):
    ModelCompressor = _model_compressor()
    out = tmp_path / "ct"
    export_checkpoint(sources[kind], out, fmt, dtype)
    compressor = ModelCompressor.from_pretrained(str(out))
    assert compressor is not None and compressor.quantization_config is None
    assert compressor.sparsity_config.format == fmt
    model = _fresh_model(out)
    exported = load(out)
    assert any(not torch.equal(model.state_dict()[k].to(v.dtype), v) for k, v in exported.items())
    compressor.decompress(str(out), model)
    restored = model.state_dict()
    assert set(restored) == set(exported)
    for name, tensor in exported.items():
        assert restored[name].shape == tensor.shape and restored[name].dtype == tensor.dtype, name
        assert torch.equal(_bits(restored[name]), _bits(tensor)), name
    if dtype == "float32":  # the same model acdc's loader builds: the same logits
        images = torch.randn(7, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(model(images), load_model(out).eval()(images))


@pytest.mark.interop
@pytest.mark.slow
def test_transformers_reads_the_config(sources, tmp_path):
    """transformers' AutoConfig (what from_pretrained goes through) reads config.json without timm or a download."""
    _model_compressor()
    from transformers import AutoConfig

    out = tmp_path / "ct"
    export_checkpoint(sources["unstructured"], out, "dense")
    config = AutoConfig.from_pretrained(str(out))
    assert config.model_type == "timm_wrapper" and config.num_labels == 10
    assert config.pretrained_cfg["input_size"] == [1, 8, 8]
    assert _model_compressor().from_pretrained(str(out)) is None  # a dense export: nothing to decompress


def test_config_of_a_folder_model_carries_its_resize_and_crop():
    """timm's crop_pct is the crop over the resized shorter side (timm resizes to input / crop_pct, then crops)."""
    from acdc_cli.files.export import model_config

    prep = {"input_shape": [3, 64, 64], "resize_shorter_side": 73, "center_crop": 64, "mean": [0.4, 0.5, 0.6],
            "std": [0.2, 0.25, 0.3]}
    meta = {"arch": "torchvision:resnet18", "model_kwargs": {"num_classes": 3}, "preprocessing": prep,
            "format_version": 1, "acdc_version": "x", "export_format": "dense", "dtype": "float16",
            "conv_layout": "native"}
    config = model_config(meta)
    assert config["pretrained_cfg"]["crop_pct"] == 64 / 73 and config["pretrained_cfg"]["input_size"] == [3, 64, 64]
    assert config["pretrained_cfg"]["mean"] == [0.4, 0.5, 0.6] and config["label_names"] == ["0", "1", "2"]
    assert config["acdc"]["dtype"] == "float16" and "quantization_config" not in config


def test_out_paths_say_what_they_are(sources, quickstart_run, tmp_path):
    """A trailing / names a new directory whatever its suffix; a file export ends in .safetensors (onnx: .onnx);
    a directory in the way of a file is named as such. Every refusal is one line and writes nothing."""
    slash = tmp_path / "v1.safetensors"
    assert invoke("export", sources["unstructured"], "-f", "dense", "-o", f"{slash}/").exit_code == 0
    assert slash.is_dir() and (slash / "config.json").is_file()
    (tmp_path / "emptyd.onnx").mkdir()
    for args, said in [
        (("-f", "sparse-bitmask", "-o", tmp_path / "x.onnx"), "a sparse-bitmask export is a .safetensors file"),
        (("-f", "dense", "-o", tmp_path / "model-v1.2"), "a dense export is a .safetensors file"),
        (("-f", "onnx", "-o", tmp_path / "onnxdir"), "an ONNX export is a .onnx file"),
        (("-f", "onnx", "-o", tmp_path / "emptyd.onnx", "--force"), "emptyd.onnx is a directory: give the path of a"),
    ]:
        result = invoke("export", sources["unstructured"], *args)
        assert result.exit_code == 2 and said in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emptyd.onnx", "v1.safetensors"]
    assert not any((tmp_path / "emptyd.onnx").iterdir())


def test_an_export_given_where_a_checkpoint_belongs_names_its_source(sources, tmp_path):
    out = tmp_path / "exported"
    export_checkpoint(sources["unstructured"], out, "sparse-bitmask")
    for args in (("export", out, "-f", "dense", "-o", tmp_path / "d.safetensors"),
                 ("prune", out, "--sparsity", "0.5", "-o", tmp_path / "p.safetensors")):
        result = invoke(*args)
        assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
        assert ("is an acdc sparse-bitmask export, not a checkpoint: use the checkpoint it was made from "
                "(best_sparse.safetensors)") in result.stderr
    result = invoke("train", "--from", out, "--out", tmp_path / "run")
    assert result.exit_code == 2 and "is a directory; give a checkpoint file" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]


def test_inspect_of_a_directory_measures_its_model_file_and_global_sparsity_is_the_whole_model(sources, tmp_path):
    out = tmp_path / "exported"
    export_checkpoint(sources["unstructured"], out, "sparse-bitmask")
    shown = invoke_json("inspect", out)
    assert shown["size_bytes"] == (out / "model.safetensors").stat().st_size
    dense = [t for t in fold_masks(load_checkpoint(sources["unstructured"])).values() if t.is_floating_point()]
    whole = sum(int((t == 0).sum()) for t in dense) / sum(t.numel() for t in dense)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["sparsity_config"]["global_sparsity"] == whole
    assert 0.5 < whole < shown["sparsity"]  # biases and BatchNorm are dense: the whole model is less sparse
