"""files.open: one function says what a file is and opens it for every command; one reader for metadata fields; the
metadata acdc writes is strict JSON."""

import ast
import json
from pathlib import Path

import pytest
import torch
from faults_helpers import tiny_checkpoint, tiny_weights
from safetensors import safe_open
from safetensors.torch import save_file

import acdc_cli.files.state_dict as state_dict_module
from acdc_cli.commands.export import export_checkpoint
from acdc_cli.errors import AcdcError
from acdc_cli.files.jsonio import meta_field, meta_text
from acdc_cli.files.open import (
    CHECKPOINT,
    EXPORT,
    ONNX,
    STATE_DICT,
    identify,
    load,
    open_any,
    read_state_dict,
)


@pytest.fixture()
def files(tmp_path):
    masks = {"fc.weight": torch.rand(10, 32, generator=torch.Generator().manual_seed(1)) > 0.5}
    weights = tiny_weights()
    weights["fc.weight"] = weights["fc.weight"] * masks["fc.weight"]
    ckpt = tiny_checkpoint(tmp_path / "ckpt.safetensors", weights=weights, masks=masks)
    plain = tmp_path / "plain.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in tiny_weights().items()}, str(plain), metadata={"format": "pt"})
    torch_file = tmp_path / "plain.pt"
    torch.save({"state_dict": tiny_weights()}, torch_file)
    out = {"checkpoint": ckpt, "plain": plain, "torch": torch_file}
    for fmt in ("sparse-bitmask", "dense"):
        out[fmt] = export_checkpoint(ckpt, tmp_path / f"{fmt}.safetensors", fmt).path
    return out


def test_identify_tells_every_kind_from_the_header(files, tmp_path):
    assert (identify(files["checkpoint"]).kind, identify(files["checkpoint"]).format) == (CHECKPOINT,
                                                                                          "acdc-checkpoint")
    assert (identify(files["sparse-bitmask"]).kind, identify(files["sparse-bitmask"]).format) == (EXPORT,
                                                                                                  "sparse-bitmask")
    assert identify(files["plain"]).kind == STATE_DICT
    assert identify(files["torch"], torch_files=True).format == "torch"
    with pytest.raises(AcdcError, match="not a readable safetensors file"):
        identify(files["torch"])
    with pytest.raises(AcdcError, match="no such file"):
        identify(tmp_path / "missing.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "gguf-v3"})
    with pytest.raises(AcdcError, match="foreign metadata"):
        identify(foreign)


def test_every_kind_opens_to_the_same_dense_weights(files):
    opened = open_any(files["checkpoint"])
    assert opened.kind == CHECKPOINT and opened.arch == "tiny-test" and opened.prunable == ["fc.weight"]
    for fmt in ("sparse-bitmask", "dense"):
        export = open_any(files[fmt])
        assert export.kind == EXPORT and export.format == fmt and export.model_kwargs == opened.model_kwargs
        assert export.epoch == opened.epoch and export.config == opened.config and export.prunable == ["fc.weight"]
        assert all(torch.equal(export.weights[k], opened.weights[k]) for k in opened.weights)
        assert export.model()(torch.zeros(1, 3, 8, 8)).shape == (1, 10)
    assert load(files["sparse-bitmask"]).keys() == opened.weights.keys()


def test_read_state_dict_reads_every_kind_and_unwraps_names(files):
    expected = tiny_weights()
    for kind in ("plain", "torch"):
        state = read_state_dict(files[kind])
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
    assert read_state_dict(files["sparse-bitmask"]).keys() == expected.keys()


def test_a_command_refuses_a_kind_it_does_not_take(files):
    with pytest.raises(AcdcError, match=r"is an acdc dense export, not a checkpoint: use the checkpoint it was made "
                                        r"from \(\S+\)$"):  # not the hint, which speaks of plain state dicts
        open_any(files["dense"], (CHECKPOINT,), hint="give")
    with pytest.raises(AcdcError, match=r"is not an acdc export or ONNX export \(format: acdc-checkpoint\)"):
        open_any(files["checkpoint"], (EXPORT, ONNX))
    with pytest.raises(AcdcError, match=r"is not an acdc checkpoint \(a \.safetensors file\)"):
        open_any(files["torch"], (CHECKPOINT,), torch_files=True)
    with pytest.raises(AcdcError, match="records its own model"):
        open_any(files["checkpoint"], model_name="tiny-test", num_classes=10)
    imported = open_any(files["torch"], model_name="tiny-test", num_classes=10).checkpoint()
    assert imported.arch == "tiny-test" and imported.extra["kind"] == "import"


def test_meta_field_reads_every_field_one_way():
    meta = {"n": "3", "text": "sparse", "big": "7" * 5000, "list": "[1]"}
    assert meta_field(meta, "n", "f", int) == 3
    assert meta_field(meta, "missing", "f", dict, {}) == {}
    assert meta_field(meta, "text", "f", text=True) == "sparse"
    with pytest.raises(AcdcError, match="f: metadata field 'big' is not valid JSON"):
        meta_field(meta, "big", "f")
    with pytest.raises(AcdcError, match="f: metadata lacks a valid 'big'"):
        meta_field(meta, "big", "f", required=True)
    with pytest.raises(AcdcError, match="f: metadata lacks a valid 'missing'"):
        meta_field(meta, "missing", "f", dict, required=True)
    with pytest.raises(AcdcError, match="f: metadata field 'list' is malformed"):
        meta_field(meta, "list", "f", dict)


def test_metadata_is_written_as_strict_json(files):
    assert meta_text({"loss": float("nan"), "top1": float("inf")}) == '{"loss": null, "top1": null}'
    assert meta_text("free text") == "free text"
    with safe_open(str(files["sparse-bitmask"]), framework="pt") as fh:
        for value in fh.metadata().values():
            if value[:1] in "[{":
                json.loads(value, parse_constant=lambda c: pytest.fail(f"bare {c}"))


def test_state_dict_module_does_not_dispatch_on_file_kinds():
    """The dispatch belongs to files.open: state_dict.py reads no export (which kept the import floors high)."""
    tree = ast.parse(Path(state_dict_module.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "acdc_cli.files.export" not in imported and "acdc_cli.files.open" not in imported
