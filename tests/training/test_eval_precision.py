"""runtime.eval_precision: every evaluation of a run (the per-epoch passes that choose best_*, the test of best_*)
and `acdc eval` run in fp32 unless it says amp; best_* record the precision they were chosen under.

The CPU never autocasts in acdc (runtime.precision), so these tests put bf16 autocast on the CPU into the evaluation
module: an amp evaluation then really computes in bf16 and gives other losses than fp32, which is what the tests
tell apart."""

import contextlib

import pytest
import torch
from cli_helpers import short_schedule, trained

import acdc_cli.training.checkpoints as checkpoints
import acdc_cli.training.evaluation as evaluation
from acdc_cli.commands.evaluate import eval_checkpoint
from acdc_cli.config import load_settings
from acdc_cli.files.checkpoint import load_checkpoint, save_checkpoint
from acdc_cli.files.jsonio import read_jsonl


def _cpu_autocast(device, amp):
    return torch.autocast("cpu", dtype=torch.bfloat16) if amp != "off" else contextlib.nullcontext()


def _cpu_precision(device, amp):
    return "bf16" if amp == "bf16" else "fp32"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 3-epoch run with runtime.eval_precision fp32 and amp, evaluations autocast in bf16 on the CPU."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluation, "autocast", _cpu_autocast)
        patch.setattr(checkpoints, "precision", _cpu_precision)
        return {precision: trained(tmp_path_factory, f"eval-{precision}", *short_schedule(
            3, 1, 1, 1, 1, 0, f"runtime.eval_precision={precision}", "data.val_size=0"))
            for precision in ("fp32", "amp")}


def test_the_setting_resolves_to_fp32_by_default_and_shows():
    settings = load_settings()
    assert settings.runtime.eval_precision == "fp32" and settings.runtime.eval_amp == "off"
    assert load_settings(overrides=["runtime.eval_precision=amp"]).runtime.eval_amp == "bf16"
    assert load_settings(overrides=["runtime.eval_precision=amp", "runtime.amp=fp16"]).runtime.eval_amp == "fp16"
    assert 'eval_precision = "fp32"' in settings.to_toml()


def test_every_evaluation_of_a_run_uses_the_eval_precision(runs):
    fp32, amp = (read_jsonl(runs[p] / "metrics.jsonl") for p in ("fp32", "amp"))
    # training is the same computation in both runs: only the evaluations differ
    assert [r["train_loss"] for r in fp32] == [r["train_loss"] for r in amp]
    for a, b in zip(fp32, amp):
        assert a["test_loss"] != b["test_loss"], a["epoch"]
    # the fp32 run's numbers are an fp32 evaluation of its weights: acdc eval in fp32 gives them back exactly
    last = runs["fp32"] / "last.safetensors"
    assert eval_checkpoint(last, "test")["loss"] == pytest.approx(fp32[-1]["test_loss"], rel=1e-12)


def test_best_checkpoints_record_the_precision_they_were_chosen_under(runs):
    for precision, expected in (("fp32", "fp32"), ("amp", "bf16")):
        for name in ("best_sparse", "best_dense", "last"):
            assert load_checkpoint(runs[precision] / f"{name}.safetensors").extra["eval_precision"] == expected


def test_acdc_eval_follows_the_run_and_the_flags_override_it(runs, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation, "autocast", _cpu_autocast)
    path = runs["amp"] / "best_sparse.safetensors"
    as_run, fp32, amp = (eval_checkpoint(path, "test", amp=flag) for flag in (None, False, True))
    assert as_run["loss"] == amp["loss"] != fp32["loss"]
    recorded = load_checkpoint(path).metrics["test_loss"]
    assert as_run["loss"] == pytest.approx(recorded, rel=1e-12)
    # an fp32 run's file evaluates in fp32 unless --amp asks
    ckpt = load_checkpoint(path)
    ckpt.config["runtime"]["eval_precision"] = "fp32"
    save_checkpoint(tmp_path / "fp32.safetensors", ckpt)
    assert eval_checkpoint(tmp_path / "fp32.safetensors", "test")["loss"] == fp32["loss"]
    assert eval_checkpoint(tmp_path / "fp32.safetensors", "test", amp=True)["loss"] == amp["loss"]


@pytest.mark.parametrize("precision, expected", [("fp32", "off"), ("amp", "bf16")])
def test_the_test_of_best_uses_it_too(tmp_path_factory, monkeypatch, precision, expected):
    """The pass that leaves no loss to compare (best_*'s test top-1 at the end of a run with a val split) is handed
    the evaluation precision, not runtime.amp."""
    seen = {"test_best": []}

    def spy(name, function):
        def wrapper(model, loader, device, amp=False):
            seen[name].append(amp)
            return function(model, loader, device, amp)
        return wrapper

    monkeypatch.setattr(checkpoints, "evaluate", spy("test_best", checkpoints.evaluate))
    trained(tmp_path_factory, f"passes-{precision}", *short_schedule(
        3, 1, 1, 1, 1, 0, f"runtime.eval_precision={precision}"))
    assert seen["test_best"] == [expected, expected]  # best_sparse and best_dense


def test_acdc_eval_of_a_run_without_autocast_reproduces_its_fp32_evaluations(runs, tmp_path, monkeypatch):
    """runtime.amp off with eval_precision amp evaluated in fp32 during the run: acdc eval follows it, and only an
    explicit --amp asks for bf16."""
    monkeypatch.setattr(evaluation, "autocast", _cpu_autocast)
    ckpt = load_checkpoint(runs["amp"] / "best_sparse.safetensors")
    ckpt.config["runtime"]["amp"] = "off"
    save_checkpoint(tmp_path / "off.safetensors", ckpt)
    fp32 = eval_checkpoint(runs["amp"] / "best_sparse.safetensors", "test", amp=False)["loss"]
    assert eval_checkpoint(tmp_path / "off.safetensors", "test")["loss"] == fp32
    assert eval_checkpoint(tmp_path / "off.safetensors", "test", amp=True)["loss"] != fp32
