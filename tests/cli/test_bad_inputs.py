"""The bad-input catalogue: every case gives one line on stderr, a non-zero exit, no traceback (unless --debug) and
leaves existing files as they were. Also: no file handed to any command can run code (pickle payloads)."""

import hashlib
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from cli_helpers import PINNED, QUIET, fails, sets, trained

from acdc_cli.files.checkpoint import Checkpoint, save_checkpoint
from acdc_cli.models import create
from acdc_cli.training.checkpoints import state_path

ONE_EPOCH = [*PINNED, *QUIET, *sets("schedule.method=dense", "schedule.epochs=1")]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A complete one-epoch run of the quickstart model (copy it before changing anything)."""
    return trained(tmp_path_factory, "finished", *ONE_EPOCH)


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write_checkpoint(path: Path, arch: str, num_classes: int, in_channels: int) -> Path:
    model = create(arch, num_classes=num_classes, in_channels=in_channels)
    save_checkpoint(path, Checkpoint(weights=model.state_dict(), masks={}, arch=arch,
                                     model_kwargs={"num_classes": num_classes, "in_channels": in_channels},
                                     config={}, epoch=1, phase="dense"))
    return path


# ----------------------------------------------------------------------------------------------------------------
# settings


def test_unknown_preset_suggests_closest_names():
    assert "did you mean quickstart" in fails(["train", "--preset", "quickstrat"])


def test_unknown_settings_key_is_named(tmp_path):
    assert "'nope'" in fails(["train", "--set", "optim.nope=1", "--out", str(tmp_path / "r")])
    config = tmp_path / "c.toml"
    config.write_text("[schedule]\nepochz = 3\n")
    assert "schedule.epochz" in fails(["train", "--config", str(config), "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


def test_wrong_type_is_named(tmp_path):
    line = fails(["train", "--set", "optim.lr=fast", "--out", str(tmp_path / "r")])
    assert "optim.lr" in line and "number" in line
    assert "data.batch_size" in fails(["train", "--set", "data.batch_size=[1]", "--dry-run"])


@pytest.mark.parametrize("value", ["1.0", "-0.1", "1.5"])
def test_sparsity_outside_zero_one(value):
    assert "sparsity.target" in fails(["train", "--set", f"sparsity.target={value}", "--dry-run"])


@pytest.mark.parametrize("structure", ["4:4", "5:4", "0:4"])
def test_nm_with_n_not_below_m(structure):
    assert "sparsity.structure" in fails(["train", "--set", f'sparsity.structure="{structure}"', "--dry-run"])


def test_nm_where_m_does_not_divide_a_requested_layer(tmp_path):
    # the first conv of the quickstart CNN has 1 input channel: asking for it by name as 2:4 is an error
    line = fails(["train", "--out", str(tmp_path / "r"), "--set", 'sparsity.structure="2:4"',
                  "--set", 'sparsity.include=["features.0", "classifier.*"]'])
    assert "features.0" in line and "multiple of 4" in line
    assert not (tmp_path / "r" / "config.toml").exists()


def test_phases_longer_than_the_run():
    line = fails(["train", "--set", "schedule.epochs=3", "--dry-run"])
    assert "exceed schedule.epochs (3)" in line


# ----------------------------------------------------------------------------------------------------------------
# data, run dirs, output paths


def test_missing_data_dir(tmp_path):
    missing = tmp_path / "no-such-folder"
    line = fails(["train", "--set", "data.name=cifar10", "--set", "model.name=resnet20", "--data-dir", str(missing), "--out", str(tmp_path / "r")])
    assert str(missing) in line
    assert not missing.exists()


@pytest.mark.parametrize("kind", ["empty", "other files", "missing", "a file"])
def test_resume_of_a_folder_that_is_not_a_run(tmp_path, kind):
    target = tmp_path / "target"
    if kind == "empty":
        target.mkdir()
    elif kind == "other files":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    elif kind == "a file":
        target.write_text("mine")
    before = snapshot(tmp_path)
    assert "not an acdc run dir" in fails(["train", "--resume", str(target)])
    assert snapshot(tmp_path) == before


def test_resume_of_a_run_without_checkpoint(run_copy):
    for path in [*run_copy.glob("*.safetensors"), *run_copy.glob("last.state*.pt")]:
        path.unlink()
    before = snapshot(run_copy)
    assert "no checkpoint yet" in fails(["train", "--resume", str(run_copy)])
    assert snapshot(run_copy) == before


def test_checkpoint_of_another_architecture(tmp_path):
    ckpt = write_checkpoint(tmp_path / "tiny.safetensors", "tiny-test", 10, 3)
    line = fails(["train", "--preset", "quickstart", "--from", str(ckpt), "--out", str(tmp_path / "r")])
    assert "tiny-test" in line and "digits-cnn" in line


def test_checkpoint_of_another_class_count(tmp_path):
    ckpt = write_checkpoint(tmp_path / "five.safetensors", "digits-cnn", 5, 1)
    line = fails(["train", "--preset", "quickstart", "--from", str(ckpt), "--out", str(tmp_path / "r")])
    assert "trained for 5 classes, digits has 10" in line


def test_truncated_safetensors(run_copy, tmp_path):
    data = (run_copy / "last.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    assert "not a readable safetensors file" in fails(["train", "--from", str(cut), "--out", str(tmp_path / "r")])
    # the same file as a run's last checkpoint: --resume refuses and leaves the run as it was
    (run_copy / "last.safetensors").write_bytes(data[:100])
    before = snapshot(run_copy)
    assert "not a readable safetensors file" in fails(["train", "--resume", str(run_copy)])
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("content", [b"just some text\n", bytes(range(256)) * 4, b""])
def test_file_that_is_not_safetensors(tmp_path, content):
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(content)
    assert str(bogus) in fails(["train", "--from", str(bogus), "--out", str(tmp_path / "r")])


def test_existing_output_path_without_force(run_copy, tmp_path):
    before = snapshot(run_copy)
    assert "--force" in fails(["train", "--out", str(run_copy), *ONE_EPOCH])
    assert snapshot(run_copy) == before
    a_file = tmp_path / "results.txt"
    a_file.write_text("keep me")
    assert "not a folder" in fails(["train", "--out", str(a_file)])
    assert a_file.read_text() == "keep me"


def test_unwritable_output_folder(tmp_path):
    # a path below a regular file cannot be created even by root (chmod would not stop root)
    blocker = tmp_path / "file.txt"
    blocker.write_text("keep me")
    assert "cannot write" in fails(["train", "--out", str(blocker / "sub"), *ONE_EPOCH])
    assert blocker.read_text() == "keep me"


def test_debug_shows_the_traceback(tmp_path):
    """`acdc --debug` in a real process: Python prints the whole traceback, ending in the AcdcError and its
    message, instead of the one line; nothing is written."""
    proc = subprocess.run([sys.executable, "-m", "acdc_cli", "--debug", "train", "--preset", "quickstrat"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 1 and proc.stderr.startswith("Traceback (most recent call last):"), proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("acdc_cli.errors.AcdcError: ") and "did you mean quickstart" in last
    assert 'File "' in proc.stderr and "config.py" in proc.stderr and not any(tmp_path.iterdir())


def test_installed_entry_point_prints_one_line_and_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "acdc_cli", "train", "--set", "optim.nope=1"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nope" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------------------------
# no code from files


class Payload:
    """Unpickling this creates the folder ``marker``: proof that code in the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def payload_files(folder: Path, marker: Path) -> dict[str, Path]:
    """The same payload as a raw pickle and as a torch.save zip (what torch.load would happily run)."""
    raw, zipped = folder / "payload.pkl", folder / "payload.pt"
    raw.write_bytes(pickle.dumps({"weights": Payload(marker)}))
    torch.save({"weights": Payload(marker)}, zipped)
    return {"pickle": raw, "torch.save": zipped}


def test_payloads_are_live(tmp_path):
    """The payloads used below do run code when unpickled the unsafe way, so the tests below can fail."""
    files = payload_files(tmp_path, tmp_path / "ran")
    pickle.loads(files["pickle"].read_bytes())
    assert (tmp_path / "ran").is_dir()
    os.rmdir(tmp_path / "ran")
    torch.load(files["torch.save"], weights_only=False)
    assert (tmp_path / "ran").is_dir()


@pytest.mark.parametrize("form", ["pickle", "torch.save"])
@pytest.mark.parametrize("command", ["train --from", "train --config", "eval", "inspect", "prune", "export"])
def test_pickle_payload_where_a_safetensors_or_toml_file_belongs_is_refused_by_format(tmp_path, form, command):
    """These commands read safetensors (or TOML) only, so a pickle never reaches an unpickler there: it is refused
    as not being that format, with that reason, before anything is read as objects. The places where acdc does
    unpickle (a resume state, a CIFAR batch) are tested below with payloads that pass every outer check."""
    marker = tmp_path / "ran"
    payload = payload_files(tmp_path, marker)[form]
    args = {
        "train --from": ["train", "--from", str(payload), "--out", str(tmp_path / "r")],
        "train --config": ["train", "--config", str(payload), "--out", str(tmp_path / "r")],
        "eval": ["eval", str(payload)],
        "inspect": ["inspect", str(payload)],
        "prune": ["prune", str(payload), "--sparsity", "0.5", "--out", str(tmp_path / "p.safetensors")],
        "export": ["export", str(payload), "--format", "dense", "--out", str(tmp_path / "e.safetensors")],
    }[command]
    expected = {
        "train --config": "cannot read config",
        # without --model/--num-classes these read acdc checkpoints only, and say so from the file's name
        "prune": "is not an acdc checkpoint (a .safetensors file)",
        "export": "is not an acdc checkpoint (a .safetensors file)",
    }.get(command, "is not a readable safetensors file")
    assert expected in fails(args)
    assert not marker.exists() and not (tmp_path / "r").exists()


def resume_state_with_payload(run_dir: Path, marker: Path, legacy: bool) -> dict:
    """The run's own resume state with one more entry, a payload, saved as torch.save writes it (a zip holding
    data.pkl, or the legacy format): a well-formed file of the right kind whose unpickling is the only defence."""
    state = torch.load(state_path(run_dir), weights_only=True)
    state["progress"]["note"] = Payload(marker)
    torch.save(state, state_path(run_dir), _use_new_zipfile_serialization=not legacy)
    return state


@pytest.mark.parametrize("form", ["torch zip", "torch legacy", "raw pickle"])
def test_pickle_payload_in_the_resume_state_of_a_valid_run_is_refused_and_never_runs(run_copy, tmp_path, form):
    """The one place acdc unpickles a run's files: `train --resume` reads the resume state (last.state.N.pt) with
    torch.load(weights_only=True) after last.safetensors passed every check. The payload is refused by name."""
    marker, state_file = tmp_path / "ran", state_path(run_copy)
    if form == "raw pickle":
        state = torch.load(state_file, weights_only=True)
        state_file.write_bytes(pickle.dumps({**state, "note": Payload(marker)}))
    else:
        resume_state_with_payload(run_copy, marker, legacy=form == "torch legacy")
        assert zipfile.is_zipfile(state_file) == (form == "torch zip")
    # the payload is live: loading the file the unsafe way runs it
    probe = tmp_path / "probe"
    probe.mkdir()
    shutil.copy(state_file, probe / "state.pt")
    torch.load(probe / "state.pt", weights_only=False) if form != "raw pickle" else pickle.loads(
        (probe / "state.pt").read_bytes())
    assert marker.is_dir()
    marker.rmdir()

    before = snapshot(run_copy)
    line = fails(["train", "--resume", str(run_copy)])
    assert f"{state_file} is not a valid acdc resume state: refused, it holds" in line
    assert ("pickled posix.mkdir" in line) if form != "raw pickle" else ("pickled Python objects" in line)
    assert not marker.exists()
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("epoch", ["-3", "true", "1.5"])
def test_checkpoint_with_a_bad_epoch_is_refused(tmp_path, epoch):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    good = write_checkpoint(tmp_path / "good.safetensors", "digits-cnn", 10, 1)
    with safe_open(str(good), framework="pt") as fh:
        meta = fh.metadata()
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(good), bad, metadata={**meta, "epoch": epoch})
    line = fails(["train", "--preset", "quickstart", "--from", str(bad), "--out", str(tmp_path / "r")])
    assert "malformed metadata" in line
    assert not (tmp_path / "r" / "config.toml").exists()
