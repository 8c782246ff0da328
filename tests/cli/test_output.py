"""Output that survives a pipe, a file and a script: tables whole at any width, resolved settings that are TOML a run
reads back, a "schema" in every --json object, and shell completion."""

import json
import os
import subprocess
import sys
import tomllib

from cli_helpers import invoke, invoke_json

from acdc_cli.config import preset_names


def acdc(*args: str, columns: int = 80, **env: str) -> subprocess.CompletedProcess:
    """``acdc ARGS`` in a subprocess whose stdout is a pipe, as in ``acdc ... | cat`` or a batch log."""
    return subprocess.run([sys.executable, "-m", "acdc_cli", *args], capture_output=True, text=True, check=False,
                          env={**os.environ, "COLUMNS": str(columns), **env}, timeout=300)


def test_presets_piped_at_80_columns_cut_no_cell():
    out = acdc("presets", columns=80)
    assert out.returncode == 0, out.stderr
    assert "…" not in out.stdout and "\x1b" not in out.stdout
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()
            if line.strip() and line.split()[0] in preset_names()}
    assert set(rows) == set(preset_names())
    # each row whole: model, dataset, method, sparsity as "NN %", structure, epochs, paper top-1
    assert rows["wrn-cifar100-95"][1:9] == ["wrn-28-10", "cifar100", "acdc", "95", "%", "unstructured,", "global",
                                            "200"]
    assert rows["resnet50-imagenet-2of4"][1:7] == ["resnet50", "imagenet", "acdc", "50", "%", "2:4"]


def test_presets_on_an_80_column_terminal_cut_no_cell(monkeypatch):
    """A real terminal has a width: the table drops the model/data column (the name says it) and wraps the pruning
    words at spaces instead of cutting every cell to "m…"."""
    import io

    from rich.console import Console

    from acdc_cli.cli import presets as cli

    screen = io.StringIO()
    monkeypatch.setattr(cli, "out_console", lambda markup=True: Console(
        file=screen, width=80, force_terminal=True, color_system=None, markup=markup))
    assert invoke("presets").exit_code == 0
    text = screen.getvalue()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    assert "model, data" not in text and all(name in text for name in preset_names())
    row = text[text.index("wrn-cifar100-95 "):].splitlines()[:3]
    assert [line.split() for line in row] == [["wrn-cifar100-95", "acdc", "95", "%", "200", "78.20", "%"],
                                              ["unstructured,"], ["global"]]


def test_presets_show_is_toml_that_train_reads_back(tmp_path):
    """`acdc presets show wrn-cifar100-95 > p.toml && acdc train --config p.toml --dry-run`, at 20 columns (where
    rich used to wrap the description): the file is TOML, the phase timeline is in its comments, and the settings
    read back are the preset's."""
    columns = 20
    shown = acdc("presets", "show", "wrn-cifar100-95", columns=columns)
    assert shown.returncode == 0, shown.stderr
    saved = tmp_path / "p.toml"
    saved.write_text(shown.stdout)
    parsed = tomllib.loads(shown.stdout)
    assert parsed["sparsity"]["target"] == 0.95 and parsed["schedule"]["epochs"] == 200
    comments = [line for line in shown.stdout.splitlines() if line.startswith("#")]
    assert "#     10     30  sparse  0.95" in comments and "#    170    200  sparse  0.95" in comments
    assert any("momentum zeroed at the start of epochs: 30, 70, 110, 150" in line for line in comments)
    back = acdc("train", "--config", str(saved), "--dry-run", columns=columns)
    assert back.returncode == 0, back.stderr
    assert tomllib.loads(back.stdout) == parsed
    assert invoke_json("train", "--config", saved, "--dry-run") == invoke_json("presets", "show", "wrn-cifar100-95")


def test_dry_run_prints_toml_even_with_long_strings(tmp_path):
    """A description and paths longer than any terminal stay on one line each, quotes and backslashes escaped."""
    text = 'a "quoted" \\ description ' + "x" * 300
    folder = tmp_path / ("d" * 150)
    out = invoke("train", "--dry-run", "--set", f"description={json.dumps(text)}", "--data-dir", folder,
                 env={"COLUMNS": "30"})
    assert out.exit_code == 0, out.output
    parsed = tomllib.loads(out.stdout)
    assert parsed["description"] == text and parsed["data"]["dir"] == str(folder)


def test_every_json_output_names_its_schema(quickstart_run, quickstart_24, tmp_path):
    assert invoke_json("train", "--dry-run")["schema"] == "acdc.resolved/1"
    assert invoke_json("presets", "show", "quickstart")["schema"] == "acdc.resolved/1"
    assert invoke_json("presets")["schema"] == "acdc.presets/1"
    assert quickstart_24[1]["schema"] == "acdc.prune/1"
    best = quickstart_run / "best_sparse.safetensors"
    assert invoke_json("inspect", best)["schema"] == "acdc.inspect/1"
    assert invoke_json("eval", best)["schema"] == "acdc.eval/2"
    assert invoke_json("export", best, "-f", "sparse-bitmask", "-o", tmp_path / "e.safetensors")["schema"] == \
        "acdc.export/1"
    # one line each, schema first, so `head -c` or a line reader sees it at once
    line = invoke("inspect", best, "--json").stdout
    assert line.count("\n") == 1 and line.startswith('{"schema": "acdc.inspect/1"')


def test_shell_completion_is_offered_and_completes_commands_and_options():
    assert "--install-completion" in invoke("--help").stdout
    script = acdc("--show-completion", "bash", _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1")
    assert script.returncode == 0 and "_ACDC_COMPLETE=complete_bash" in script.stdout, script.stderr
    # what bash asks when the user presses tab after "acdc pre" and after "acdc train --pre"
    command = acdc(_ACDC_COMPLETE="complete_bash", COMP_WORDS="acdc pre", COMP_CWORD="1")
    assert command.stdout.split() == ["presets"]
    option = acdc("train", _ACDC_COMPLETE="complete_bash", COMP_WORDS="acdc train --pre", COMP_CWORD="2")
    assert option.stdout.split() == ["--preset"]


def test_recorded_preprocessing_that_is_not_numbers_is_shown_not_a_crash():
    """A file's preprocessing is untrusted metadata: a mean of [None] or a string is shown as it is."""
    from acdc_cli.cli.files import _preprocessing_text

    text = _preprocessing_text({"input_shape": [3, 8, 8], "channel_order": "RGB", "dataset": "x",
                                "mean": [None, "a", 0.5], "std": [0.25]})
    assert text.endswith("minus mean [None, 'a', 0.5000], divided by std [0.2500]")
