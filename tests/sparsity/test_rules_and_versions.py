"""The sparsity rules are one set of functions (sparsity/rules.py): the engine, reading a model, and inspect,
reading a file's weight names, leave the same layers dense for the same reasons, in the same words. And every file
acdc writes records its format_version, which readers check: a newer one is refused in one line."""

import json

import pytest
import torch
from cli_helpers import fails
from faults_helpers import tiny_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from acdc_cli import ACDC
from acdc_cli.commands.export import export_checkpoint
from acdc_cli.commands.inspect_file import inspect_file
from acdc_cli.errors import AcdcError
from acdc_cli.files.checkpoint import FORMAT_VERSION, Checkpoint, load_checkpoint
from acdc_cli.files.open import load
from acdc_cli.files.torchfile import load_state, save_state
from acdc_cli.models import create
from acdc_cli.sparsity.rules import EXCLUDED, nm_reason, prunable_names, rule_reason, select_layers
from acdc_cli.training.checkpoints import RunState, load_last, resume_state, save_last


def test_engine_and_inspect_give_the_same_reasons(tmp_path):
    # tiny-test: a stem of 3 input channels (cannot be 2:4), a conv, and the classifier, excluded here
    model = create("tiny-test", num_classes=10)
    engine = ACDC(model, torch.optim.SGD(model.parameters(), lr=0.1), epochs=2, sparsity=0.5, structure="2:4",
                  exclude=["fc"], warmup_epochs=0, final_compressed_epochs=2)
    engine.start_epoch(0)
    trained = {r.param: r.reason for r in engine.sparsifier.rules if not r.selected}
    assert trained == {"stem.weight": nm_reason(4), "fc.weight": EXCLUDED}

    path = engine.save(tmp_path / "tiny.safetensors", arch="tiny-test")
    inspected = {layer["name"]: layer["reason"] for layer in inspect_file(path)["dense_layers"]}
    assert inspected == trained


def test_a_model_and_its_state_dict_select_the_same_weights():
    model = create("tiny-test", num_classes=10)
    weights = model.state_dict()
    config = {"sparsity": {"include": ["*"], "exclude": ["fc"]}}
    selected = {r.param for r in select_layers(model, ["*"], ["fc"]) if r.selected}
    assert set(prunable_names(weights, {}, config)) == selected == {"stem.weight", "conv.weight"}
    # under N:M the stem (3 input channels) cannot hold 2:4 groups: left out by both
    nm_selected = {r.param for r in select_layers(model, ["*"], ["fc"], nm=(2, 4)) if r.selected}
    nm_config = {"sparsity": {**config["sparsity"], "structure": "2:4"}}
    assert set(prunable_names(weights, {}, nm_config)) == nm_selected == {"conv.weight"}
    assert set(prunable_names(weights, {}, config, (2, 4))) == nm_selected
    assert rule_reason("fc.weight", ["*"], ["fc"]) == EXCLUDED
    # a model that is one layer: its weight is named "weight" and its module ""
    assert rule_reason("weight", [""], []) is None


def _metadata(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata())


def _rewrite(path, **changes) -> None:
    """Rewrite a safetensors file with some metadata entries changed (None: removed)."""
    meta = {**_metadata(path), **{k: v for k, v in changes.items() if v is not None}}
    save_file(load_file(path), path, metadata={k: v for k, v in meta.items() if changes.get(k, "") is not None})


def _engine() -> ACDC:
    model = create("tiny-test", num_classes=10)
    return ACDC(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), epochs=2, sparsity=0.5,
                warmup_epochs=0, final_compressed_epochs=2)


def test_every_file_records_its_format_version(tmp_path):
    assert FORMAT_VERSION == 1
    ckpt = tiny_checkpoint(tmp_path / "c.safetensors")
    assert json.loads(_metadata(ckpt)["format_version"]) == 1
    for fmt in ("sparse-bitmask", "dense"):
        out = export_checkpoint(ckpt, tmp_path / f"{fmt}.safetensors", fmt).path
        assert json.loads(_metadata(out)["format_version"]) == 1
    engine = _engine()
    engine.start_epoch(0)
    assert engine.state_dict()["format_version"] == 1
    state = resume_state(RunState(), engine, engine.optimizer, torch.amp.GradScaler("cpu", enabled=False))
    assert state["format_version"] == 1 and state["engine"]["format_version"] == 1
    # the metadata key is the reader's, not one of the checkpoint's extras
    assert "format_version" not in load_checkpoint(ckpt).extra


def test_a_file_of_a_newer_acdc_is_refused_in_one_line(tmp_path):
    newer = "was written by a newer acdc \\(format_version 2\\)"
    ckpt = tiny_checkpoint(tmp_path / "c.safetensors")
    export = export_checkpoint(ckpt, tmp_path / "e.safetensors", "sparse-bitmask").path
    for path in (ckpt, export):
        _rewrite(path, format_version="2")
        with pytest.raises(AcdcError, match=newer):
            load(path)
        assert "format_version 2" in fails(["inspect", path])
    _rewrite(ckpt, format_version='"one"')
    with pytest.raises(AcdcError, match="malformed metadata \\(format_version"):
        load_checkpoint(ckpt)
    # a file without one reads as version 1
    _rewrite(ckpt, format_version=None)
    assert "format_version" not in _metadata(ckpt) and load_checkpoint(ckpt).epoch == 1

    engine = _engine()
    engine.start_epoch(0)
    with pytest.raises(AcdcError, match="the engine state was written by a newer acdc \\(format_version 2\\)"):
        engine.load_state_dict({**engine.state_dict(), "format_version": 2})

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pair = Checkpoint(weights={"w": torch.zeros(4)}, masks={}, arch="tiny-test", model_kwargs={}, config={}, epoch=1,
                      phase="dense")
    save_last(run_dir, pair, {"format_version": 2, "progress": {"epoch": 1, "step": 0}})
    with pytest.raises(AcdcError, match=newer):
        load_last(run_dir)


def test_no_reader_of_an_unreleased_layout(tmp_path):
    """Layouts acdc never released are malformed files: a last.safetensors that names no resume state, an export
    layer entry without its layout."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pair = Checkpoint(weights={"w": torch.zeros(4)}, masks={}, arch="tiny-test", model_kwargs={}, config={}, epoch=1,
                      phase="dense")
    save_last(run_dir, pair, {"progress": {"epoch": 1, "step": 0}})
    state_file = _metadata(run_dir / "last.safetensors")["resume_state"]
    save_state(run_dir / "last.state.pt", load_state(run_dir / state_file))
    _rewrite(run_dir / "last.safetensors", resume_state=None)
    with pytest.raises(AcdcError, match="names no resume state"):
        load_last(run_dir)

    ckpt = tiny_checkpoint(tmp_path / "c.safetensors")
    export = export_checkpoint(ckpt, tmp_path / "e.safetensors", "sparse-bitmask").path
    layers = json.loads(_metadata(export)["layers"])
    for entry in layers.values():
        del entry["layout"]
    _rewrite(export, layers=json.dumps(layers))
    with pytest.raises(AcdcError, match="malformed layer entry"):
        load(export)
