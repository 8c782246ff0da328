"""Preset values taken by analogy (no reference run script gives them) are labelled inferred: in the preset file
(``inferred = [...]``), in `acdc presets show` beside each such value, and in the `acdc presets` table."""

import tomllib

import pytest
from cli_helpers import invoke, invoke_json, squash

from acdc_cli.config import load_settings, preset_names
from acdc_cli.errors import AcdcError

# the presets whose reference config no run script uses (or whose run script restarts an earlier run)
INFERRED = {
    "resnet50-imagenet-90-uniform": ["data.batch_size", "schedule.epochs", "schedule.reset_momentum"],
    "resnet50-imagenet-80-no-conv1-fc": ["data.batch_size", "schedule.epochs", "schedule.reset_momentum"],
    "resnet50-imagenet-95-uniform-200ep": ["data.batch_size", "schedule.reset_momentum"],
    "resnet50-imagenet-dense": ["data.batch_size", "schedule.epochs"],
    "mobilenet-imagenet-dense": ["data.batch_size", "schedule.epochs"],
    "wrn-cifar100-dense": ["data.batch_size", "schedule.epochs", "optim.lr", "optim.milestones"],
    "resnet50-imagenet-gmp-80": ["data.batch_size", "schedule.epochs", "optim.lr", "optim.momentum",
                                 "optim.weight_decay", "optim.lr_schedule", "optim.lr_warmup_epochs"],
    "resnet50-imagenet-gmp-90": ["data.batch_size", "schedule.epochs", "optim.lr", "optim.momentum",
                                 "optim.weight_decay", "optim.lr_schedule", "optim.lr_warmup_epochs"],
}


def test_the_presets_label_exactly_their_inferred_values():
    assert {n: load_settings(preset=n).inferred for n in preset_names() if load_settings(preset=n).inferred} == INFERRED


def test_an_inferred_name_must_be_a_setting():
    with pytest.raises(AcdcError, match="inferred names 'optim.rate', which is not a setting"):
        load_settings(overrides=['inferred=["optim.rate"]'])


@pytest.mark.parametrize("name", sorted(INFERRED))
def test_presets_show_marks_each_inferred_value(name):
    text = invoke("presets", "show", name).stdout
    marked = set()
    section = ""
    for line in text.splitlines():
        if line.startswith("["):
            section = line.strip("[]") + "."
        elif "# inferred:" in line:
            marked.add(section + line.split(" = ")[0])
    assert marked == set(INFERRED[name])
    # still TOML that --config reads back, comments and all
    assert tomllib.loads(text)["inferred"] == INFERRED[name]


def test_the_presets_table_and_json_show_inferred_values():
    rows = {r["name"]: r for r in invoke_json("presets")["presets"]}
    assert {n: r["inferred"] for n, r in rows.items() if r["inferred"]} == INFERRED
    table = squash(invoke("presets").stdout)
    assert "resnet50-imagenet-90-uniform resnet50 imagenet acdc 90 % unstructured, uniform 100 75.04 % " \
           "batch_size, epochs, reset_momentum" in table
    assert "resnet50-imagenet-90 resnet50 imagenet acdc 90 % unstructured, global 100 75.03 % -" in table


def test_a_narrow_presets_table_lists_the_inferred_values_below_it(monkeypatch):
    import io

    from rich.console import Console

    from acdc_cli.cli import presets as cli

    screen = io.StringIO()
    monkeypatch.setattr(cli, "out_console", lambda markup=True: Console(
        file=screen, width=80, force_terminal=True, color_system=None, markup=markup))
    assert invoke("presets").exit_code == 0
    below = squash(screen.getvalue().split("inferred (no reference run script", 1)[1])
    for name, keys in INFERRED.items():
        assert f"{name}: {', '.join(k.split('.')[-1] for k in keys)}" in below, name
