"""acdc prune: the training engine's masks on a checkpoint, written so that a fine-tune holds them."""

import os

import pytest
import torch
from cli_helpers import PINNED, QUIET, fails, invoke, invoke_json, sets, shows

from acdc_cli.commands.prune import prune_checkpoint
from acdc_cli.config import load_settings
from acdc_cli.files.checkpoint import load_checkpoint
from acdc_cli.sparsity.schedule import Phase, plan


def two_of_four_along_input_channels(weight: torch.Tensor) -> bool:
    """Direct check: at every (out, kh, kw), each run of 4 consecutive input channels holds at most 2 non-zeros."""
    w = weight if weight.dim() == 4 else weight[:, :, None, None]
    out_ch, in_ch, kh, kw = w.shape
    for o in range(out_ch):
        for y in range(kh):
            for x in range(kw):
                channels = w[o, :, y, x]
                for start in range(0, in_ch, 4):
                    if int((channels[start : start + 4] != 0).sum()) > 2:
                        return False
    return True


def test_prune_24_passes_a_direct_2_of_4_check_on_every_pruned_layer(quickstart_24, quickstart_run):
    out, report = quickstart_24
    ckpt = load_checkpoint(out)
    source = load_checkpoint(quickstart_run / "best_dense.safetensors")
    conv_linear = [n for n, t in ckpt.weights.items() if n.endswith("weight") and t.dim() >= 2]
    # every Conv/Linear whose input channels are a multiple of 4 is pruned; the 1-channel stem cannot be
    assert set(ckpt.masks) == {n for n in conv_linear if ckpt.weights[n].shape[1] % 4 == 0}
    assert "features.0.weight" not in ckpt.masks
    assert torch.equal(ckpt.weights["features.0.weight"], source.weights["features.0.weight"])
    for name, mask in ckpt.masks.items():
        assert two_of_four_along_input_channels(ckpt.weights[name]), name
        assert int(mask.sum()) * 2 == mask.numel(), name  # exactly 2 kept of every 4
        assert bool((ckpt.weights[name][~mask] == 0).all()), name
        kept = ckpt.weights[name][mask]
        assert torch.equal(kept, source.weights[name][mask]), name  # kept weights are untouched
    assert report["structure"] == "2:4" and report["target"] == 0.5
    assert {"name": "features.0.weight", "shape": [32, 1, 3, 3],
            "kept_dense": "input channels not a multiple of 4"} in report["layers"]


def test_prune_writes_a_config_whose_plan_is_compressed_throughout(quickstart_24):
    out, report = quickstart_24
    settings = load_settings(config=out.with_suffix(".toml"))
    assert report["config"] == str(out.with_suffix(".toml"))
    assert plan(settings) == [Phase(0, settings.schedule.epochs, "sparse", 0.5)]
    assert settings.sparsity.structure == "2:4" and settings.model.name == "digits-cnn"
    assert load_checkpoint(out).config == settings.model_dump(mode="json")


def test_fine_tune_from_pruned_checkpoint_holds_the_masks(quickstart_24, tmp_path):
    out, _ = quickstart_24
    run_dir = tmp_path / "finetune"
    invoke_json("train", "--from", out, "--out", run_dir, *PINNED, *QUIET,
                *sets("schedule.epochs=1", "schedule.final_compressed_epochs=1"))
    pruned, tuned = load_checkpoint(out), load_checkpoint(run_dir / "last.safetensors")
    assert set(tuned.masks) == set(pruned.masks)
    changed = 0
    for name, mask in pruned.masks.items():
        assert torch.equal(tuned.masks[name], mask), name
        assert bool((tuned.weights[name][~mask] == 0).all()), name
        changed += int((tuned.weights[name][mask] != pruned.weights[name][mask]).sum())
    assert changed > 0  # it did train


@pytest.mark.parametrize("scope", ["global", "uniform"])
def test_unstructured_counts_are_exact(quickstart_run, tmp_path, scope):
    out = tmp_path / "u.safetensors"
    result = prune_checkpoint(quickstart_run / "best_dense.safetensors", out, sparsity=0.95, scope=scope,
                              exclude=["classifier.4"])
    ckpt = load_checkpoint(out)
    assert "classifier.4.weight" not in ckpt.masks and len(ckpt.masks) == 5
    total = sum(m.numel() for m in ckpt.masks.values())
    pruned = sum(int((~m).sum()) for m in ckpt.masks.values())
    assert pruned == round(0.95 * total)
    if scope == "uniform":
        for name, mask in ckpt.masks.items():
            assert int((~mask).sum()) == round(0.95 * mask.numel()), name
    else:  # one threshold: every kept weight is at least as large as every pruned one
        kept = torch.cat([ckpt.weights[n][m].abs() for n, m in ckpt.masks.items()])
        source = load_checkpoint(quickstart_run / "best_dense.safetensors").weights
        dropped = torch.cat([source[n][~m].abs() for n, m in ckpt.masks.items()])
        assert float(kept.min()) >= float(dropped.max())
    zeros = sum(int((ckpt.weights[n] == 0).sum()) for n in ckpt.masks)
    assert abs(result.sparsity - zeros / total) < 1e-12
    assert load_settings(config=out.with_suffix(".toml")).sparsity.exclude == ["classifier.4"]


def test_prune_refusals_are_one_line(quickstart_run, tmp_path):
    source = quickstart_run / "best_dense.safetensors"
    cases = [
        (("--sparsity", "0.9", "-o", tmp_path / "a.pt"), "*.safetensors"),
        (("-o", tmp_path / "b.safetensors"), "--sparsity is required"),
        (("--structure", "2:4", "--sparsity", "0.9", "-o", tmp_path / "c.safetensors"), "contradicts"),
        (("--sparsity", "0.9", "--scope", "local", "-o", tmp_path / "d.safetensors"), "scope"),
        (("--sparsity", "0.9", "--include", "nope*", "-o", tmp_path / "e.safetensors"), "nope*"),
    ]
    for args, text in cases:
        assert text in fails(["prune", source, *args]), args
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"keep me")
    assert "--force" in fails(["prune", source, "--sparsity", "0.5", "-o", taken])
    assert taken.read_bytes() == b"keep me"
    result = invoke("prune", source, "--sparsity", "0.5", "-o", taken, "--force")
    assert result.exit_code == 0 and shows(f"acdc train --from {taken}", result.stdout)
    assert load_checkpoint(taken).masks


def test_prune_table_output(quickstart_run, tmp_path):
    result = invoke("prune", quickstart_run / "best_dense.safetensors", "--structure", "2:4",
                    "-o", tmp_path / "t.safetensors")
    assert result.exit_code == 0
    for text in ("features.0.weight", "dense:", "50.00 %"):
        assert shows(text, result.stdout), text


def test_masks_that_do_not_fit_the_plan_are_recomputed(quickstart_run, tmp_path):
    """--from masks at 50 % under a plan that asks for 90 %: the first compressed phase prunes to 90 %, so
    best_sparse really is at the target."""
    p50 = tmp_path / "p50.safetensors"
    assert invoke("prune", quickstart_run / "best_dense.safetensors", "--sparsity", "0.5", "-o", p50).exit_code == 0
    run_dir = tmp_path / "run"
    result = invoke("train", "--preset", "quickstart", "--from", p50, "--out", run_dir, *PINNED, *QUIET,
                    *sets("schedule.warmup_epochs=0", "schedule.epochs=2", "schedule.final_compressed_epochs=2"))
    assert result.exit_code == 0, result.output
    assert shows(f"note: the masks in {p50} do not match these sparsity rules at 0.9", result.stdout)
    best = load_checkpoint(run_dir / "best_sparse.safetensors")
    total = sum(m.numel() for m in best.masks.values())
    assert sum(int((~m).sum()) for m in best.masks.values()) == round(0.9 * total)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc, a folder no one can create files in")
@pytest.mark.parametrize("command", ["prune", "export"])
def test_unwritable_output_folder_is_one_line(quickstart_run, command):
    source = quickstart_run / "best_sparse.safetensors"
    args = ["--sparsity", "0.5"] if command == "prune" else ["--format", "dense"]
    assert "cannot write" in fails([command, source, *args, "-o", "/proc/acdc-out.safetensors"])


def test_a_plain_state_dict_pruned_with_data_records_it_and_evaluates_on_it(tmp_path):
    """A 3-channel model pruned from a plain state dict: the recorded data.name follows --data, eval of a file whose
    data does not fit its model is one line (exit 2), and a mismatch named at prune is refused before writing."""
    torch.manual_seed(0)
    from acdc_cli.models import create

    plain = tmp_path / "plain.pt"
    torch.save(create("tiny-test", num_classes=10, in_channels=3).state_dict(), plain)
    base = [plain, "--model", "tiny-test", "--num-classes", "10", "--sparsity", "0.5"]
    # no --data: the default (digits, 1 channel) is recorded, and eval says in one line what does not fit
    invoke_json("prune", *base, "-o", tmp_path / "digits.safetensors")
    line = fails(["eval", tmp_path / "digits.safetensors", *PINNED[:2]])
    assert "does not take the images of data.name 'digits' (1x8x8 images, 10 classes)" in line
    assert "--data NAME" in line
    # --data synthetic (3 channels at the model's input size) is recorded and evaluated on
    out = tmp_path / "synthetic.safetensors"
    invoke_json("prune", *base, "--data", "synthetic", "-o", out)
    assert load_checkpoint(out).config["data"]["name"] == "synthetic"
    result = invoke_json("eval", out, "--device", "cpu")
    assert result["images"] == 128 and result["sparsity"] == pytest.approx(0.5, abs=1e-3)
    # eval --data overrides what the file records: the digits-recorded file evaluates on synthetic data too
    again = invoke_json("eval", tmp_path / "digits.safetensors", "--data", "synthetic", "--device", "cpu")
    assert again["top1"] == result["top1"] and again["loss"] == result["loss"]
    # a mismatch named at prune: channels, and classes, each one line with nothing written
    refused = tmp_path / "refused.safetensors"
    assert "1x8x8 images" in fails(["prune", *base, "--data", "digits", "-o", refused])
    assert "predicts 10 classes, but data.name 'cifar100'" in fails(["prune", *base, "--data", "cifar100", "-o",
                                                                      refused])
    assert not refused.exists() and not refused.with_suffix(".toml").exists()
