"""Values that were accepted silently or read in a misleading way are refused in one line
(non-finite floats, a target that contradicts N:M, GMP with N:M, masks that are not 0/1, fractional CIFAR labels,
an edited config.toml on resume), and a mask is applied the same way by every reader."""

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import fails, invoke
from faults_helpers import tiny_checkpoint, tiny_weights
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from acdc_cli.commands import export
from acdc_cli.commands.evaluate import eval_checkpoint
from acdc_cli.commands.inspect_file import inspect_file
from acdc_cli.config import Settings, load_settings
from acdc_cli.data import cifar
from acdc_cli.errors import AcdcError
from acdc_cli.files.checkpoint import load_checkpoint
from acdc_cli.files.open import load as load_export


def float_settings() -> list[str]:
    """Every float field of the settings, as section.key (found from the schema, so a new one is covered too)."""
    keys = ["paper_top1"]
    for section, field in Settings.model_fields.items():
        model = field.annotation
        if isinstance(model, type) and hasattr(model, "model_fields"):
            keys += [f"{section}.{name}" for name, sub in model.model_fields.items()
                     if sub.annotation in (float, float | None)]
    return keys


def test_the_float_settings_are_found():
    assert {"optim.lr", "optim.weight_decay", "optim.gamma", "optim.momentum", "sparsity.target",
            "model.dropout"} <= set(float_settings())


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
@pytest.mark.parametrize("key", float_settings())
def test_non_finite_floats_are_refused(key, value):
    """optim.lr=inf and weight_decay=inf were accepted (gt=0 lets inf through) and trained NaN weights."""
    line = fails(["train", "--dry-run", "--set", f"{key}={value}"])
    assert key in line and "finite" in line


# ----------------------------------------------------------------------------------------------------------------
# N:M: the structure fixes the target


def dry_run_sparsity(*args) -> dict:
    result = invoke("train", "--dry-run", "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["config"]["sparsity"]


def test_a_target_that_contradicts_nm_is_refused_like_prune_refuses_it(tmp_path):
    """train used to turn sparsity.target=0.9 with 2:4 into 0.5 without a word, where prune refuses."""
    line = fails(["train", "--dry-run", "--set", "sparsity.target=0.9", "--set", 'sparsity.structure="2:4"'])
    assert "target 0.9 contradicts structure 2:4, which prunes 0.5" in line
    assert "contradicts" in fails(["train", "--dry-run", "--preset", "resnet50-imagenet-2of4",
                                   "--set", "sparsity.target=0.9"])
    config = tmp_path / "c.toml"
    config.write_text('[sparsity]\nstructure = "1:4"\ntarget = 0.5\n')
    assert "contradicts structure 1:4, which prunes 0.75" in fails(["train", "--dry-run", "--config", str(config)])


def test_a_target_left_out_or_stated_below_the_structure_follows_nm():
    """The 2:4 preset states no target; the quickstart states 0.9 for its unstructured rules, and a --set of an N:M
    structure over it replaces those rules; a target that agrees is accepted."""
    assert dry_run_sparsity("--preset", "resnet50-imagenet-2of4")["target"] == 0.5
    assert dry_run_sparsity("--set", 'sparsity.structure="2:4"')["target"] == 0.5
    assert dry_run_sparsity("--set", 'sparsity.structure="1:4"', "--set", "sparsity.target=0.75")["target"] == 0.75
    # and back: an unstructured --set over the 2:4 preset takes the default target
    assert dry_run_sparsity("--preset", "resnet50-imagenet-2of4", "--set", 'sparsity.structure="unstructured"',
                            "--set", "sparsity.target=0.8")["target"] == 0.8


def test_every_resolved_nm_setting_loads_back():
    """What a run saves (config.toml, checkpoint metadata) is the resolved settings: 2:4 with target 0.5."""
    saved = load_settings(preset="resnet50-imagenet-2of4").model_dump(mode="json")
    assert Settings(**saved).sparsity.target == 0.5


def test_gmp_with_nm_is_refused():
    line = fails(["train", "--dry-run", "--set", "schedule.method=gmp", "--set", "schedule.gmp_end_epoch=10",
                  "--set", 'sparsity.structure="2:4"'])
    assert "gmp" in line and "2:4" in line


def test_prune_still_refuses_a_contradicting_sparsity(tmp_path):
    source = tiny_checkpoint(tmp_path / "src.safetensors")
    line = fails(["prune", str(source), "--structure", "2:4", "--sparsity", "0.9",
                  "-o", str(tmp_path / "p.safetensors")])
    assert "--sparsity 0.9 contradicts --structure 2:4, which prunes 0.5" in line


# ----------------------------------------------------------------------------------------------------------------
# masks are 0/1, and they are applied everywhere


def with_mask(tmp_path: Path, mask: torch.Tensor, name: str = "bad") -> Path:
    good = tiny_checkpoint(tmp_path / "good.safetensors")
    with safe_open(str(good), framework="pt") as fh:
        meta = fh.metadata()
    path = tmp_path / f"{name}.safetensors"
    save_file({**load_file(good), "mask.fc.weight": mask}, path, metadata=meta)
    return path


@pytest.mark.parametrize("value,dtype,expected", [
    (2, torch.uint8, "holds values other than 0 and 1"),
    (255, torch.uint8, "holds values other than 0 and 1"),
    (0.5, torch.float32, "is float32; acdc masks are 0/1 uint8"),
    (1.0, torch.float16, "is float16"),
])
def test_masks_that_are_not_0_1_are_refused_by_every_reader(tmp_path, value, dtype, expected):
    mask = torch.ones(10, 32, dtype=dtype)
    mask[0, :3] = value
    path = with_mask(tmp_path, mask)
    out = tmp_path / "out.safetensors"
    for args in (["inspect", path], ["eval", path], ["export", path, "-f", "dense", "-o", out],
                 ["prune", path, "--sparsity", "0.5", "-o", out],
                 ["train", "--from", path, "--out", tmp_path / "r", "--set", "data.name=synthetic",
                  "--set", "model.name=tiny-test"]):
        assert expected in fails([str(a) for a in args]), args
    assert not out.exists() and not (tmp_path / "r" / "config.toml").exists()


def test_a_bool_mask_holding_other_bytes_is_refused(tmp_path):
    # safetensors stores BOOL as bytes; a byte 2 must not count as True
    blob = bytearray(with_mask(tmp_path, torch.ones(10, 32, dtype=torch.bool), "ok").read_bytes())
    path = tmp_path / "bad.safetensors"
    header_end = 8 + int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:header_end])
    start = header_end + header["mask.fc.weight"]["data_offsets"][0]
    blob[start] = 2
    path.write_bytes(bytes(blob))
    with pytest.raises(AcdcError, match="holds values other than 0 and 1"):
        load_checkpoint(path)


def test_a_mask_over_nonzero_weights_is_applied_by_eval_export_and_inspect(tmp_path):
    """An all-zero mask over non-zero weights: eval scored the weights unmasked while export zeroed them. Now every
    reader applies the mask, so eval scores exactly what export writes, and inspect says the file disagreed."""
    torch.manual_seed(1)
    masks = {"fc.weight": torch.zeros(10, 32, dtype=torch.bool), "conv.weight": torch.rand(8, 8, 3, 3) < 0.5}
    weights = tiny_weights()  # non-zero everywhere, also outside the masks
    path = tiny_checkpoint(tmp_path / "odd.safetensors", weights=weights, masks=masks)
    loaded = load_checkpoint(path).weights
    assert int(torch.count_nonzero(loaded["fc.weight"])) == 0
    assert torch.equal(loaded["conv.weight"], weights["conv.weight"] * masks["conv.weight"])

    written = export.export_checkpoint(path, tmp_path / "dense.safetensors", "dense").path
    exported = load_export(written)
    assert all(torch.equal(exported[k], loaded[k]) for k in loaded)
    # eval of the file equals eval of a checkpoint holding exactly the exported tensors
    folded = tiny_checkpoint(tmp_path / "folded.safetensors", weights=exported, masks=masks)
    odd, clean = eval_checkpoint(path), eval_checkpoint(folded)
    assert (odd["loss"], odd["top1"], odd["sparsity"]) == (clean["loss"], clean["top1"], clean["sparsity"])

    info = inspect_file(path)
    assert info["outside_mask"] == ["conv.weight", "fc.weight"] and inspect_file(folded)["outside_mask"] == []
    result = invoke("inspect", path)
    assert "fc.weight holds non-zero weights outside its mask" in result.stdout


# ----------------------------------------------------------------------------------------------------------------
# CIFAR labels


def write_cifar(root: Path, labels) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]}
        if name == "data_batch_2":
            batch[b"labels"] = labels
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder / "data_batch_2"


@pytest.mark.parametrize("labels,expected", [
    ([0, 0.5, 1, 2], "is not a list of integers"),  # used to be truncated to 0
    (np.array([0.0, 1.0, 2.0, 3.0]), "is not a list of integers"),
    ([[0], [1], [2], [3]], "'labels' has shape 4 x 1; expected one list of 4 labels"),
    ([0, 1, 2, 2**70], "is not a list of integers"),
    (["0", "1", "2", "3"], "is not a list of integers"),
])
def test_cifar_labels_that_are_not_integers_are_refused(tmp_path, labels, expected):
    """Labels of shape (4, 1) used to say "4 images but 4 labels"."""
    path = write_cifar(tmp_path, labels)
    with pytest.raises(AcdcError, match=expected) as info:
        cifar.load("cifar10", tmp_path)
    assert str(path) in str(info.value)


# ----------------------------------------------------------------------------------------------------------------
# resume compares with the settings recorded in last.safetensors


@pytest.fixture
def finished(quickstart_run, tmp_path) -> Path:
    return Path(shutil.copytree(quickstart_run, tmp_path / "run"))


def test_an_edited_config_toml_does_not_pass_the_resume_check(finished):
    config = finished / "config.toml"
    config.write_text(config.read_text().replace("lr = 0.05", "lr = 0.5"))
    line = fails(["train", "--resume", str(finished)])
    assert f"cannot change optim.lr when resuming (0.05 in {finished / 'last.safetensors'} -> 0.5" in line


def test_an_emptied_config_toml_resumes_with_the_recorded_settings(finished):
    """It used to say "cannot change preset (None -> 'quickstart')"."""
    recorded = load_checkpoint(finished / "last.safetensors").config
    (finished / "config.toml").write_text("")
    result = invoke("train", "--resume", finished)
    assert result.exit_code == 0, result.output
    assert load_settings(config=finished / "config.toml").model_dump(mode="json") == recorded


@pytest.mark.parametrize("flag", [["--set", 'data.dir="~nosuchuser/data"'], ["--data-dir", "~nosuchuser"]])
def test_a_data_dir_in_an_unknown_users_home_is_one_line(flag):
    """Path.expanduser raises RuntimeError for ~name of no user (found by test_fuzz.test_set_fuzz)."""
    assert "no such user's home folder" in fails(["train", "--dry-run", *flag])
