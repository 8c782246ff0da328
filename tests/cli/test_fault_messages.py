"""The output rules: what used to end in a traceback is one line on stderr; paths and names
are never read as rich markup; JSON output is strict JSON (null, never NaN); a damaged metrics.jsonl loses no row."""

import json
import math
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import fails, invoke, short_schedule, shows
from faults_helpers import tiny_checkpoint, tiny_weights
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from acdc_cli.commands import export
from acdc_cli.commands.evaluate import eval_checkpoint
from acdc_cli.commands.inspect_file import inspect_file
from acdc_cli.errors import AcdcError
from acdc_cli.files.atomic import remove_stale_temps
from acdc_cli.files.checkpoint import load_checkpoint
from acdc_cli.files.jsonio import read_jsonl
from acdc_cli.files.open import load as load_export
from acdc_cli.files.open import load_model
from acdc_cli.training.metrics import MetricsLogger

QUICK = ["--set", "schedule.method=dense", "--set", "schedule.epochs=3", "--set", "log.tensorboard=false",
         "--set", "log.progress=false"]


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as every other JSON reader does."""
    def refuse(constant):
        raise ValueError(f"bare {constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    """A finished three-epoch dense run of the digits CNN, in a folder whose path holds "[/]" (copy before use)."""
    run_dir = tmp_path_factory.mktemp("quick") / "a[" / "]b" / "run"
    result = invoke("train", "--out", run_dir, *QUICK)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return run_dir


# ----------------------------------------------------------------------------------------------------------------
# rich markup: "[/]" closes a tag, so a path or a name holding it used to raise MarkupError after the work was done


@pytest.mark.slow  # a long end-to-end run: the slow pass, which CI runs
def test_a_run_dir_holding_markup_finishes_with_its_summary(quick_run, tmp_path):
    run_dir = Path(shutil.copytree(quick_run, tmp_path / "c[" / "]d" / "run"))
    result = invoke("train", "--resume", run_dir)  # a finished run: the note and the summary panel, nothing trained
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert shows("acdc run finished", result.stdout) and shows(f"run dir: {run_dir}", result.stdout.replace("│", " "))


def test_prune_export_inspect_eval_with_markup_in_paths(quick_run, tmp_path):
    folder = tmp_path / "x[" / "]y"
    folder.mkdir(parents=True)
    pruned, exported = folder / "p.safetensors", folder / "e.safetensors"
    result = invoke("prune", quick_run / "best_dense.safetensors", "--sparsity", "0.5", "-o", pruned)
    assert result.exit_code == 0, result.output
    assert f"wrote {pruned} and {folder / 'p.toml'}" in result.stdout
    result = invoke("export", pruned, "-f", "sparse-bitmask", "-o", exported)
    assert result.exit_code == 0, result.output
    assert f"wrote {exported}:" in result.stdout
    for args in (["inspect", "--layers", exported], ["eval", pruned]):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
    assert str(folder / "missing.safetensors") in fails(["inspect", str(folder / "missing.safetensors")])


def test_layer_names_holding_markup_are_printed_as_they_are(tmp_path):
    names = ("x[/]y.weight", "[bold]z.weight")
    weights = {**tiny_weights(), **{name: torch.ones(4, 8) for name in names}}
    # masked, so that export and inspect list them among the prunable layers
    ckpt = tiny_checkpoint(tmp_path / "names.safetensors", weights=weights,
                           masks={name: torch.ones(4, 8, dtype=torch.bool) for name in names})
    # export refuses a checkpoint whose layers its model lacks, naming the first one as it is written
    line = fails(["export", ckpt, "-f", "dense", "-o", tmp_path / "e.safetensors"])
    assert "does not fit this model" in line and ("x[/]y.weight" in line or "[bold]z.weight" in line)
    assert not (tmp_path / "e.safetensors").exists()
    result = invoke("inspect", "--layers", ckpt)
    assert result.exit_code == 0, result.output
    assert "x[/]y.weight" in result.stdout and "[bold]z.weight" in result.stdout


def test_bench_table_with_markup_in_the_preset_name(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('preset = "my[/]preset"\n')
    result = invoke("bench", "--config", config, "--steps", "1", "--warmup", "0", "--batch-size", "8")
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "my[/]preset" in result.stdout


# ----------------------------------------------------------------------------------------------------------------
# nesting that recursion cannot parse


def test_settings_nested_2000_deep_are_one_line(tmp_path):
    deep = "[" * 2000 + "]" * 2000
    config = tmp_path / "deep.toml"
    config.write_text(f"[optim]\nmilestones = {deep}\n")
    assert "nested too deeply" in fails(["train", "--dry-run", "--config", str(config)])
    assert "nested too deeply" in fails(["train", "--dry-run", "--set", f"optim.milestones={deep}"])
    result = invoke("train", "--dry-run", env={"ACDC_OPTIM__MILESTONES": deep})
    assert result.exit_code == 2 and result.stderr.strip() == "error: environment: an ACDC_* value is nested too deeply"


@pytest.mark.parametrize("case,expected", [
    ("a 5000-digit integer", "is not valid TOML: Exceeds the limit (4300 digits)"),
    ("a symlink loop", "Too many levels of symbolic links"),
    ("endless", "is larger than 1 MiB"),
    ("not UTF-8", "not UTF-8 text"),
    ("a folder", "Is a directory"),
])
def test_config_files_that_cannot_be_read_are_one_line(tmp_path, case, expected):
    """Each of these was a traceback (ValueError, OSError), or read /dev/zero until the memory ran out."""
    path = tmp_path / "c.toml"
    if case == "a 5000-digit integer":
        path.write_text(f"[optim]\nlr = {'9' * 5000}\n")
    elif case == "a symlink loop":
        path.symlink_to(path)
    elif case == "endless":
        path = Path("/dev/zero")
    elif case == "not UTF-8":
        path.write_bytes(b'description = "\xff"\n')
    else:
        path.mkdir()
    assert expected in fails(["train", "--dry-run", "--config", str(path)])


def test_a_5000_digit_set_value_is_read_as_text():
    assert "optim.lr" in fails(["train", "--dry-run", "--set", f"optim.lr={'9' * 5000}"])
    assert "schedule.epochs" in fails(["train", "--dry-run", "--set", f"schedule.epochs={'9' * 5000}"])


# ----------------------------------------------------------------------------------------------------------------
# metadata that json cannot read


@pytest.mark.parametrize("field", ["epoch", "config", "preset"])
def test_an_integer_of_5000_digits_in_the_metadata_is_one_line_or_text(tmp_path, field):
    """json.loads raises ValueError (not JSONDecodeError) past 4,300 digits; every reader used to pass it through."""
    good = tiny_checkpoint(tmp_path / "good.safetensors")
    with safe_open(str(good), framework="pt") as fh:
        meta = fh.metadata()
    path = tmp_path / "bigint.safetensors"
    save_file(load_file(good), path, metadata={**meta, field: "7" * 5000})
    if field == "preset":  # free text: read back as the string it is
        assert load_checkpoint(path).extra["preset"] == "7" * 5000
        return
    for reader in (load_checkpoint, inspect_file, load_export, eval_checkpoint):
        with pytest.raises(AcdcError, match=f"metadata field '{field}' is not valid JSON"):
            reader(path)


@pytest.mark.parametrize("field", ["layers", "tensors", "model_kwargs"])
def test_an_integer_of_5000_digits_in_an_exports_metadata_is_one_line(tmp_path, field):
    source = tiny_checkpoint(tmp_path / "src.safetensors")
    exported = export.export_checkpoint(source, tmp_path / "e.safetensors", "sparse-bitmask").path
    with safe_open(str(exported), framework="pt") as fh:
        meta = fh.metadata()
    path = tmp_path / "bigint.safetensors"
    save_file(load_file(exported), path, metadata={**meta, field: "7" * 5000})
    readers = (inspect_file, load_export) if field != "model_kwargs" else (load_model,)
    for reader in readers:
        with pytest.raises(AcdcError, match=f"metadata lacks a valid '{field}'"):
            reader(path)


# ----------------------------------------------------------------------------------------------------------------
# stale temporary files that cannot be removed (a read-only file system)


def test_a_stale_temp_that_cannot_be_removed_is_left(tmp_path):
    """A stale `.NAME.tmp` that unlink cannot remove (here a non-empty folder: root bypasses permissions) used to be an
    OSError traceback out of remove_stale_temps."""
    (tmp_path / ".last.safetensors.abc.tmp").mkdir()
    (tmp_path / ".last.safetensors.abc.tmp" / "inside").write_text("x")
    (tmp_path / ".config.toml.def.tmp").write_text("stale")
    remove_stale_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".last.safetensors.abc.tmp"]


def test_resume_on_a_read_only_file_system_with_a_stale_temp_is_one_line(quick_run, tmp_path):
    """The real case, in a mount namespace of our own: the run dir bind-mounted read-only."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) for a private read-only mount")
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("user and mount namespaces are not available here")
    run_dir = Path(shutil.copytree(quick_run, tmp_path / "run"))
    (run_dir / ".last.safetensors.abc.tmp").write_text("stale")
    script = (f'mount --bind "{run_dir}" "{run_dir}" && mount -o remount,bind,ro "{run_dir}" && '
              f'exec "{sys.executable}" -m acdc_cli train --resume "{run_dir}"')
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr
    # the first file the resume writes (its lock file, config.toml or metrics.jsonl) names the problem
    assert re.fullmatch(rf"error: cannot write {re.escape(str(run_dir))}/[\w.]+: Read-only file system",
                        proc.stderr.strip()), proc.stderr


# ----------------------------------------------------------------------------------------------------------------
# JSON: null for NaN


def test_eval_of_non_finite_weights_is_one_line_not_a_nan_loss(tmp_path):
    """A diverged model (NaN weights) is refused before it is evaluated: no top-1 of NaN logits, no null loss."""
    weights = tiny_weights()
    weights["fc.weight"] = torch.full_like(weights["fc.weight"], float("nan"))
    path = tiny_checkpoint(tmp_path / "nan.safetensors", weights=weights)
    line = fails(["eval", "--json", path])
    assert "fc.weight holds non-finite values" in line


def test_inspect_json_writes_null_for_nan_metrics(tmp_path):
    path = tiny_checkpoint(tmp_path / "m.safetensors", metrics={"val_top1": float("nan"), "val_loss": float("inf")})
    result = invoke("inspect", "--json", path)
    assert result.exit_code == 0, result.output
    assert strict_json(result.stdout)["metadata"]["metrics"] == {"val_top1": None, "val_loss": None}


def test_checkpoint_metadata_holds_null_for_nan(tmp_path):
    """A diverged metric in a checkpoint's header is null: every JSON reader can read the header."""
    path = tiny_checkpoint(tmp_path / "m.safetensors", metrics={"val_loss": float("nan"), "val_top1": 0.25})
    with safe_open(str(path), framework="pt") as fh:
        raw = fh.metadata()["metrics"]
    assert strict_json(raw) == {"val_loss": None, "val_top1": 0.25}


def test_metrics_jsonl_writes_null_for_nan(tmp_path):
    logger = MetricsLogger(tmp_path, Console(file=open("/dev/null", "w")), tensorboard=False, per_layer=False)
    logger.log_epoch({"epoch": 0, "phase": "dense", "train_loss": float("nan"), "val_top1": 0.5})
    logger.close()
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert strict_json(line) == {"epoch": 0, "phase": "dense", "train_loss": None, "val_top1": 0.5}


# ----------------------------------------------------------------------------------------------------------------
# a damaged metrics.jsonl


@pytest.mark.parametrize("damage", [b'{"epoch": 1, "pha', b"\xff\xfe not even text", b"[1, 2]"])
def test_resume_keeps_every_valid_row_and_sets_damaged_lines_aside(quick_run, tmp_path, damage):
    """A damaged line used to end the rows read: --resume then rewrote metrics.jsonl without the epochs after it."""
    run_dir = Path(shutil.copytree(quick_run, tmp_path / "run"))
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_bytes().splitlines()
    assert len(lines) == 3
    metrics.write_bytes(b"\n".join([lines[0], damage, lines[2]]) + b"\n")
    result = invoke("train", "--resume", run_dir)
    assert result.exit_code == 0, result.output
    assert [row["epoch"] for row in read_jsonl(metrics)] == [0, 2]
    assert (run_dir / "metrics.jsonl.damaged").read_bytes() == damage + b"\n"
    notes = [line for line in result.stdout.splitlines() if line.startswith("note:") and "damaged" in line]
    assert notes == [f"note: 1 damaged line(s) of {metrics} set aside in {metrics}.damaged"]
    assert all(math.isfinite(row["val_top1"]) for row in read_jsonl(metrics))


# ----------------------------------------------------------------------------------------------------------------
# resume states that load but are malformed: one line before any step runs (some used to fail an epoch later)


@pytest.fixture(scope="module")
def stopped_mid_epoch(tmp_path_factory) -> Path:
    """An AC/DC run whose last pair is at epoch 1 (compressed), step 8: its 5th save failed (copy before use)."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    args = ["train", "--out", run_dir, *short_schedule(3, 1, 1, 1, 1, 0, "data.batch_size=64",
                                                       "runtime.checkpoint_every_steps=8")]
    assert "No space left" in fails(args, env={"_ACDC_TEST_FAULT": "fail@write:5:last.safetensors"})
    return run_dir


def _wrong_shape(state):
    first = state["optimizer"]["state"][0]
    first["momentum_buffer"] = first["momentum_buffer"].flatten()[:5].clone()


@pytest.mark.parametrize("damage,expected", [
    (lambda s: s["progress"].update(best_dense="oops"),
     "progress.best_dense is 'oops', expected none or {epoch, split, val_top1}"),
    (lambda s: s["progress"].update(best_dense={"epoch": 0, "split": "test", "test_top1": 0.5}),
     "progress.best_dense.split is 'test', this run selects on val"),
    (lambda s: s["progress"].update(best_dense={"epoch": 0, "split": "val", "val_top1": "high"}),
     "progress.best_dense.val_top1 is 'high', expected a fraction 0..1"),
    (lambda s: s["progress"].update(epoch=1.0), "progress.epoch is 1.0, expected a whole number >= 0"),
    (lambda s: s["progress"].pop("best_sparse"), "progress.best_sparse is missing"),
    (lambda s: s.pop("optimizer"), "optimizer is None, expected a table of state and param_groups"),
    (_wrong_shape, "optimizer.state[0].momentum_buffer has shape [5] (float32); its parameter is [32, 1, 3, 3]"),
    (lambda s: s["optimizer"]["param_groups"][0].update(lr="fast"),
     "optimizer.param_groups[0].lr is 'fast', expected a number"),
    (lambda s: s["optimizer"]["param_groups"][0].pop("momentum"),
     "optimizer.param_groups[0].momentum is None, expected a number"),
    (lambda s: s["optimizer"]["param_groups"][0]["params"].pop(), "optimizer.param_groups[0] holds 15 parameters, "
                                                                  "this model 16"),
    (lambda s: s["engine"].update(mask_change="none"), "engine.mask_change is 'none', expected a number"),
    (lambda s: s["engine"].update(previous_masks={"features.0.weight": torch.ones(3, dtype=torch.bool)}),
     "engine.previous_masks[features.0.weight] is a tensor of shape [3], its weight is [32, 1, 3, 3]"),
    (lambda s: s["totals"][0].update(count="384"), "totals[0].count is '384', expected a whole number >= 0"),
    (lambda s: s["totals"][0].update(loss_sum=torch.tensor([1.0, 2.0])),
     "totals[0].loss_sum is a tensor of shape [2], expected a single floating number"),
    (lambda s: s.update(scaler={"scale": "big"}), "scaler is {'scale': 'big'}, expected a table of numbers"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_a_malformed_resume_state_is_one_line_before_any_step(stopped_mid_epoch, tmp_path, damage, expected):
    from acdc_cli.files.torchfile import load_state, save_state
    from acdc_cli.training.checkpoints import state_path

    run_dir = Path(shutil.copytree(stopped_mid_epoch, tmp_path / "run"))
    path = state_path(run_dir)
    state = load_state(path)
    damage(state)
    save_state(path, state)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert fails(["train", "--resume", run_dir]) == f"error: {path}: malformed resume state: {expected}"
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


# ----------------------------------------------------------------------------------------------------------------
# what a run dir without last.safetensors offers; the summary panel


@pytest.mark.slow  # a long end-to-end run: the slow pass, which CI runs
def test_a_run_dir_with_best_checkpoints_but_no_last_offers_from_not_force(quick_run, tmp_path):
    """--force would delete best_*: the message offers a new run from one of them, and that command works."""
    run_dir = Path(shutil.copytree(quick_run, tmp_path / "run"))
    for path in [run_dir / "last.safetensors", *run_dir.glob("last.state*.pt")]:
        path.unlink()
    line = fails(["train", "--resume", run_dir])
    assert "--force" not in line
    best = run_dir / "best_dense.safetensors"
    assert line.endswith(f"its best checkpoints are kept: start a new run from one with acdc train --from "
                         f"{shlex.quote(str(best))} --out NEW_DIR"), line
    result = invoke("train", "--from", best, "--out", tmp_path / "new")
    assert result.exit_code == 0, result.output
    assert best.is_file()


def test_the_summary_panel_prints_every_file_whole_and_names_tensorboard_only_when_it_ran(quick_run, tmp_path):
    """In a pipe (COLUMNS=60 is not a terminal's width) the panel takes the width its lines need: every file name
    and the run dir are printed whole; log.tensorboard = false (quick_run) prints no TensorBoard command and lists
    no tb folder."""
    run_dir = Path(shutil.copytree(quick_run, tmp_path / "run"))
    result = invoke("train", "--resume", run_dir, env={"COLUMNS": "60"})
    assert result.exit_code == 0, result.output
    panel = result.stdout[result.stdout.index("acdc run finished"):]
    assert f"run dir: {run_dir} " in panel.replace("│", " ")
    names = re.findall(r"[\w.]+", panel[panel.index("files:"):panel.index("run dir:")].replace("│", " "))
    assert names == ["files", "best_dense.safetensors", "config.toml", "last.safetensors", "last.state.3.pt",
                     "metrics.jsonl"]
    assert "tensorboard" not in result.stdout
