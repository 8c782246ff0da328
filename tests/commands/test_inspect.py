"""Acdc inspect: per-layer numbers equal zeros counted directly in the file; bad files are one-line errors."""

import json

import numpy as np
import pytest
import torch
import torchvision
from cli_helpers import fails, invoke, invoke_json, shows
from safetensors import safe_open
from safetensors.torch import save_file

from acdc_cli.commands.export import export_checkpoint
from acdc_cli.files.checkpoint import load_checkpoint, save_checkpoint
from acdc_cli.sparsity.rules import natural_key


def inspect_json(path) -> dict:
    return invoke_json("inspect", path)


def read_np(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    with safe_open(str(path), framework="np") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata() or {}


@pytest.fixture(scope="module")
def files(quickstart_run, quickstart_24, tmp_path_factory):
    folder = tmp_path_factory.mktemp("inspect")
    pruned = quickstart_24[0]
    out = {"sparse": quickstart_run / "best_sparse.safetensors", "p24": pruned}
    for name, source, fmt, dtype in [("e24", pruned, "sparse-24-bitmask", "float32"),
                                     ("ebits", out["sparse"], "sparse-bitmask", "float16"),
                                     ("edense", out["sparse"], "dense", "bfloat16")]:
        out[name] = folder / f"{name}.safetensors"
        export_checkpoint(source, out[name], fmt, dtype)
    return out


def test_checkpoint_layers_equal_zeros_counted_in_the_file(files):
    info = inspect_json(files["sparse"])
    tensors, meta = read_np(files["sparse"])
    masked = sorted(k[len("mask."):] for k in tensors if k.startswith("mask."))
    assert info["kind"] == "checkpoint" and info["format"] == "acdc-checkpoint"
    assert sorted(layer["name"] for layer in info["layers"]) == masked
    for layer in info["layers"]:
        weight = tensors[layer["name"]]
        zeros = int((weight == 0).sum())
        assert layer["zeros"] == zeros and layer["shape"] == list(weight.shape)
        assert layer["sparsity"] == zeros / weight.size
    total = sum(tensors[n].size for n in masked)
    assert info["sparsity"] == sum(int((tensors[n] == 0).sum()) for n in masked) / total
    assert abs(info["sparsity"] - 0.9) < 1e-3
    assert info["size_bytes"] == files["sparse"].stat().st_size
    assert info["metadata"]["arch"] == "digits-cnn" and info["metadata"]["preset"] == "quickstart"
    assert info["metadata"]["phase"] == "sparse" and info["metadata"]["epoch"] == json.loads(meta["epoch"])
    assert info["metadata"]["metrics"]["val_top1"] == json.loads(meta["metrics"])["val_top1"]
    assert info["ratio_to_dense"] > 1.2  # a checkpoint stores every zero plus a uint8 mask per weight


def _zeros_in_export_layer(tensors: dict[str, np.ndarray], name: str, numel: int) -> int:
    """Zeros of a compressed layer, from its parts: unset bits plus stored values that are zero."""
    prefix = name.removesuffix(".weight")
    last = int(tensors[f"{prefix}.shape"].ravel()[-1])  # bits are packed along the stored shape's last dimension
    kept = int(np.unpackbits(tensors[f"{prefix}.bitmask"], axis=-1, count=last, bitorder="little").sum())
    return numel - kept + int((tensors[f"{prefix}.compressed"] == 0).sum())


@pytest.mark.parametrize("key", ["e24", "ebits"])
def test_export_layers_equal_zeros_counted_in_the_file(files, key):
    info = inspect_json(files[key])
    tensors, meta = read_np(files[key])
    layers = json.loads(meta["layers"])
    assert info["kind"] == "export" and info["format"] == meta["export_format"]
    assert {layer["name"] for layer in info["layers"]} >= set(layers)
    for layer in info["layers"]:
        numel = int(np.prod(layer["shape"]))
        if layer["name"] in layers:
            zeros = _zeros_in_export_layer(tensors, layer["name"], numel)
            assert layer["encoding"] == meta["export_format"]
        else:
            zeros = int((tensors[layer["name"]] == 0).sum())
        assert layer["zeros"] == zeros and layer["sparsity"] == zeros / numel, layer["name"]
    assert info["size_bytes"] == files[key].stat().st_size
    assert info["ratio_to_dense"] < 0.6


def test_dense_export_is_inspected_as_export(files):
    info = inspect_json(files["edense"])
    with safe_open(str(files["edense"]), framework="pt") as fh:
        weight = fh.get_tensor("classifier.1.weight")
    layer = next(x for x in info["layers"] if x["name"] == "classifier.1.weight")
    assert info["kind"] == "export" and info["format"] == "dense" and info["dtype"] == "bfloat16"
    assert layer["zeros"] == int((weight == 0).sum()) and layer["encoding"] == "dense"
    assert 0.99 < info["ratio_to_dense"] <= 1.0


def test_inspect_flags_a_layer_that_breaks_2_4(files, tmp_path):
    clean = inspect_json(files["p24"])
    assert clean["structure"] == "2:4" and clean["structure_violations"] == []
    assert all(layer["nm_valid"] for layer in clean["layers"])
    ckpt = load_checkpoint(files["p24"])
    name = "features.7.weight"
    weight = ckpt.weights[name].clone()
    group = weight[0, 0:4, 1, 1]
    group[group == 0] = 0.5  # all four input channels of one group non-zero
    ckpt.weights[name] = weight  # as if edited outside acdc
    # with the mask still 2:4, every reader applies it: the layer stays 2:4, inspect warns about the file
    outside = tmp_path / "outside.safetensors"
    save_checkpoint(outside, ckpt)
    info = inspect_json(outside)
    assert info["structure_violations"] == [] and info["outside_mask"] == [name]
    assert invoke("export", outside, "--format", "sparse-24-bitmask", "-o", tmp_path / "ok.safetensors").exit_code == 0
    # with the mask edited too, the layer breaks 2:4
    ckpt.masks[name] = ckpt.masks[name].clone()
    ckpt.masks[name][0, 0:4, 1, 1] = True
    broken = tmp_path / "broken.safetensors"
    save_checkpoint(broken, ckpt)
    info = inspect_json(broken)
    assert info["structure_violations"] == [name] and info["outside_mask"] == []
    assert [layer["name"] for layer in info["layers"] if layer["nm_valid"] is False] == [name]
    result = invoke("inspect", broken, "--layers")
    assert result.exit_code == 0 and shows(f"{name} breaks the 2:4 structure", result.stdout)
    assert any("features.7" in line and " no " in line for line in result.stdout.splitlines())  # its table row
    refused = invoke("export", broken, "--format", "sparse-24-bitmask", "-o", tmp_path / "x.safetensors")
    assert refused.exit_code == 2 and name in refused.stderr and "acdc prune" in refused.stderr
    ckpt.masks = {}
    save_checkpoint(broken, ckpt)
    line = fails(["export", broken, "--format", "sparse-24-bitmask", "-o", tmp_path / "x.safetensors"])
    assert name in line and "acdc prune" in line


def test_plain_torchvision_state_dict_is_inspected(tmp_path):
    net = torchvision.models.mobilenet_v3_small()
    path = tmp_path / "mobilenet.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    info = inspect_json(path)
    conv_linear = [n for n, t in net.state_dict().items() if n.endswith("weight") and t.dim() >= 2]
    assert info["kind"] == "state_dict" and info["format"] == "dense"
    assert [layer["name"] for layer in info["layers"]] == sorted(conv_linear, key=natural_key)
    depthwise = next(x for x in info["layers"] if x["shape"][1] == 1)
    assert depthwise["nm_valid"] is None  # one input channel per group: cannot be 2:4
    assert info["sparsity"] < 0.01
    table = invoke("inspect", path, "--layers")
    assert table.exit_code == 0 and shows("state_dict", table.stdout)


@pytest.mark.parametrize("case", ["text", "truncated", "foreign", "compressed-without-metadata", "bad-export", "missing"])
def test_bad_files_are_one_line_errors(files, tmp_path, case):
    path = tmp_path / f"{case}.safetensors"
    if case == "text":
        path.write_text("this is not a safetensors file\n")
    elif case == "truncated":
        data = files["sparse"].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "foreign":
        save_file({"w": torch.zeros(2, 2)}, str(path), metadata={"format": "gguf-v3"})
    elif case == "compressed-without-metadata":
        save_file({"fc.compressed": torch.ones(4), "fc.bitmask": torch.ones(1, 1, dtype=torch.uint8)}, str(path))
    elif case == "bad-export":
        tensors, meta = read_np(files["e24"])
        meta["layers"] = "{not json"
        save_file({k: torch.from_numpy(v) for k, v in tensors.items()}, str(path), metadata=meta)
    fails(["inspect", path])
    assert invoke("inspect", path).stdout == ""


def test_layers_left_dense_by_rule_are_reported(quickstart_run, quickstart_24):
    out = quickstart_24[0]
    info = inspect_json(out)
    assert info["dense_layers"] == [
        {"name": "features.0.weight", "shape": [32, 1, 3, 3], "reason": "input channels not a multiple of 4"}
    ]
    assert shows("left dense by rule: features.0.weight", invoke("inspect", out).stdout)
    # a dense checkpoint has no masks, so nothing is "left dense by rule"
    assert inspect_json(quickstart_run / "best_dense.safetensors")["dense_layers"] == []


def test_dense_24_checkpoint_counts_the_same_layers_in_eval_and_inspect(quickstart_run, tmp_path):
    # a checkpoint without masks whose settings say 2:4: the stem (1 input channel) cannot be 2:4, so the rules leave
    # it out of what sparsity is counted over, in inspect as in eval (and as training would)
    ckpt = load_checkpoint(quickstart_run / "best_dense.safetensors")
    ckpt.config["sparsity"].update(structure="2:4", target=0.5)
    path = tmp_path / "dense24.safetensors"
    save_checkpoint(path, ckpt)
    info, scored = inspect_json(path), invoke_json("eval", path)
    names = [layer["name"] for layer in info["layers"]]
    every_layer = load_checkpoint(quickstart_run / "best_sparse.safetensors").masks  # include = ["*"], unstructured
    assert names == sorted(set(every_layer) - {"features.0.weight"}, key=natural_key)
    zeros = sum(int((ckpt.weights[n] == 0).sum()) for n in names)
    numel = sum(ckpt.weights[n].numel() for n in names)
    assert info["sparsity"] == scored["sparsity"] == zeros / numel
