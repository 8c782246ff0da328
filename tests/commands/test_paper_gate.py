"""The paper's number is set beside a run's only when the run is its preset's experiment: every setting that can
change a result equal (config.NOT_RESULT_SETTINGS, the one list of those that cannot, aside); otherwise eval, report
and the train summary name the first setting that differs."""

import re
import shutil

import pytest

from acdc_cli.commands import report as report_mod
from acdc_cli.config import NOT_RESULT_SETTINGS, load_settings, result_settings, setting_names
from acdc_cli.paper import paper_reference
from acdc_cli.training.loop import RunResult, summary_panel


def test_every_setting_is_compared_or_listed_as_not_changing_a_result():
    names = setting_names()
    sections = {n.partition(".")[0] for n in names}
    assert all(entry in names or entry in sections for entry in NOT_RESULT_SETTINGS)  # each names a setting or section
    compared = result_settings(load_settings())
    assert list(compared) == [n for n in names if n not in NOT_RESULT_SETTINGS
                              and n.partition(".")[0] not in NOT_RESULT_SETTINGS]
    assert not any(n.startswith("log.") for n in compared)  # what is logged, and where, changes no number
    # the settings that define the experiment are compared
    for name in ("sparsity.scope", "sparsity.include", "sparsity.exclude", "optim.lr", "data.batch_size",
                 "schedule.compressed_epochs", "schedule.reset_momentum", "data.val_size", "runtime.amp",
                 "runtime.eval_precision", "runtime.eval_every", "model.weights"):
        assert name in compared, name


@pytest.mark.parametrize("override", [
    "runtime.device=cpu", "runtime.seed=7", "runtime.threads=1", "runtime.deterministic=true",
    "runtime.compile=true", "data.eval_batch_size=17", "data.num_workers=3", "data.dir=/elsewhere",
    "log.tensorboard=false", "log.progress=false", "runtime.checkpoint_every_steps=5", "runtime.checkpoint_every=3",
    "log.wandb_project='p'",
])
def test_settings_that_cannot_change_a_number_keep_the_paper_number(paper_preset, override):
    assert paper_reference(load_settings(preset=paper_preset, overrides=[override]), "test") == (0.95, None)


def test_the_note_names_the_first_differing_setting_and_counts_the_others(paper_preset):
    settings = load_settings(preset=paper_preset, overrides=["optim.lr=0.2", "sparsity.scope=uniform",
                                                             "runtime.seed=3"])
    assert paper_reference(settings, "test") == (
        None, "not preset digits-paper's experiment: optim.lr 0.2 (preset: 0.05), and 1 other setting")
    weights = load_settings(preset=paper_preset, overrides=["model.weights='/w.safetensors'"])
    assert paper_reference(weights, "test")[1] == (
        "not preset digits-paper's experiment: model.weights /w.safetensors (preset: (not set))")


def _panel_text(result: RunResult) -> str:
    from rich.console import Console

    console = Console(width=400, record=True)
    console.print(summary_panel(result, tensorboard=False))
    return console.export_text()


def test_the_summary_panel_shows_the_paper_number_or_why_not(tmp_path):
    best = {"epoch": 9, "split": "test", "test_top1": 0.9321}
    shown = _panel_text(RunResult(tmp_path, best, None, 0.9, paper={"top1": 0.95, "note": None}))
    assert "paper top-1: 0.9500 (best sparse -1.79 points)" in shown
    dense = _panel_text(RunResult(tmp_path, None, best, 0.0, paper={"top1": 0.9, "note": None}))
    assert "paper top-1: 0.9000 (best dense +3.21 points)" in dense
    note = "not preset p's experiment: optim.lr 0.2 (preset: 0.05)"
    hidden = _panel_text(RunResult(tmp_path, best, None, 0.9, paper={"top1": None, "note": note}))
    assert f"paper top-1 not shown: {note}" in hidden and "paper top-1:" not in hidden


def test_train_reports_the_gate_in_its_summary(quickstart_run):
    printed = re.sub(r"\s+", " ", (quickstart_run.parent / "stdout.txt").read_text().replace("│", " "))
    assert "paper top-1 not shown: preset quickstart has no paper number" in printed


def test_the_report_table_names_the_setting(quickstart_run, tmp_path, paper_preset):
    run = shutil.copytree(quickstart_run, tmp_path / "run")
    text = (run / "config.toml").read_text()
    text = text.replace('preset = "quickstart"', f'preset = "{paper_preset}"')
    (run / "config.toml").write_text(text.replace("lr = 0.05", "lr = 0.2", 1))
    row = report_mod.summary_rows([report_mod.read_run(run, "run")])[0]
    assert row[-1] == "95.00 % (not this experiment: optim.lr differs)"
    (run / "config.toml").write_text(text)
    assert report_mod.summary_rows([report_mod.read_run(run, "run")])[0][-1] == "95.00 %"


def test_train_json_carries_the_gate(tmp_path):
    from cli_helpers import invoke_json, short_schedule

    data = invoke_json("train", "--out", tmp_path / "run", *short_schedule(2, 1, 1, 1, 1, 0, "optim.lr=0.2"))
    assert data["paper"] == {"top1": None, "note": "preset quickstart has no paper number"}
