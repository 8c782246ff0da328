"""The sparsity rules are one set of functions (sparsity/rules.py): the engine, reading a model, and inspect,
reading a file's weight names, leave the same layers dense for the same reasons, in the same words."""

import torch

from acdc_cli import ACDC
from acdc_cli.commands.inspect_file import inspect_file
from acdc_cli.models import create
from acdc_cli.sparsity.rules import EXCLUDED, nm_reason, prunable_names, rule_reason, select_layers


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
    assert rule_reason("fc.weight", ["*"], ["fc"]) == EXCLUDED
    # a model that is one layer: its weight is named "weight" and its module ""
    assert rule_reason("weight", [""], []) is None
