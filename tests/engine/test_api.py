"""The public engine, ``from acdc_cli import ACDC``, in a user's own loop: the plan, exact masks, pruned weights zero
after every step, the momentum policies (SGD and AdamW), GradScaler skip steps, DDP and torch.compile wrappers,
state_dict round trips, presets, ``save`` read back by the CLI, and the README's example run as written."""

from __future__ import annotations

import copy
import json
import re
import runpy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from data_helpers import write_cifar10
from safetensors.torch import load_file
from typer.testing import CliRunner

from acdc_cli import ACDC, Phase
from acdc_cli.cli.app import app
from acdc_cli.config import load_settings
from acdc_cli.engine import reset_momentum
from acdc_cli.errors import AcdcError
from acdc_cli.models import create
from acdc_cli.sparsity import masks as M
from acdc_cli.sparsity.schedule import momentum_resets, plan

README = Path(__file__).resolve().parents[2] / "README.md"

# dense 0, compressed 1, decompressed 2, final compressed 3-5
PLAN = (Phase(0, 1, "dense", 0.0), Phase(1, 2, "sparse", 0.7), Phase(2, 3, "dense", 0.0), Phase(3, 6, "sparse", 0.7))
SHORT = dict(epochs=6, sparsity=0.7, warmup_epochs=1, compressed_epochs=1, decompressed_epochs=1,
             final_compressed_epochs=2)


def _batches(seed: int = 0, count: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(count)]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create("tiny-test", num_classes=10)


def _optimizer(model: torch.nn.Module, kind: str) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05)
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)


def _step(model, optimizer, x, y, scaler=None) -> None:
    loss = torch.nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()


def _assert_masked(acdc: ACDC, sparsity: float) -> None:
    """Exactly round(sparsity * n) selected weights pruned, each of them zero with a zero gradient."""
    params = dict(acdc.model.named_parameters())
    masks = dict(acdc.masks)
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == M.pruned_count(total, sparsity)
    for name, mask in masks.items():
        assert torch.count_nonzero(params[name].detach()[~mask]) == 0, name
        if params[name].grad is not None:
            assert torch.count_nonzero(params[name].grad[~mask]) == 0, name


def _momentum_zero(optimizer: torch.optim.Optimizer) -> bool:
    buffers = [s[k] for s in optimizer.state.values() for k in ("momentum_buffer", "exp_avg", "exp_avg_sq") if k in s]
    assert buffers  # the check is not vacuous
    return all(float(b.abs().max()) == 0.0 for b in buffers)


def test_plan_phases_and_momentum_reset_epochs():
    model = _model()
    acdc = ACDC(model, _optimizer(model, "sgd"), **SHORT)
    assert acdc.plan == PLAN
    assert [acdc.start_epoch(e) for e in range(6)] == [PLAN[0], PLAN[1], PLAN[2], PLAN[3], PLAN[3], PLAN[3]]
    assert momentum_resets(list(PLAN), "restore") == {2}
    assert momentum_resets(list(PLAN), "every") == {1, 2, 3}
    assert momentum_resets(list(PLAN), "never") == set()
    # the quickstart: dense 0-3, C 4-6, D 7-9, C 10-12, D 13-15, C 16-18, D 19-21, final C 22-29
    quick = plan(load_settings(preset="quickstart"))
    assert momentum_resets(quick, "restore") == {7, 13, 19}
    assert momentum_resets(quick, "every") == {4, 7, 10, 13, 16, 19, 22}
    with pytest.raises(ValueError, match="unknown momentum reset policy"):
        momentum_resets(quick, "sometimes")


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("policy", ["restore", "every", "never"])
def test_masks_exact_after_every_step_and_momentum_reset_per_policy(one_thread, kind, policy):
    model = _model()
    optimizer = _optimizer(model, kind)
    acdc = ACDC(model, optimizer, **SHORT, reset_momentum=policy)
    zeroed = set()
    for epoch in range(6):
        phase = acdc.start_epoch(epoch)
        if epoch and _momentum_zero(optimizer):
            zeroed.add(epoch)
        for x, y in _batches(epoch):
            _step(model, optimizer, x, y)
            if phase.kind == "sparse":
                _assert_masked(acdc, 0.7)
            else:
                assert not acdc.masks
        if phase.kind == "sparse":
            assert acdc.sparsity() == M.pruned_count(acdc.sparsifier.numel, 0.7) / acdc.sparsifier.numel
        else:  # revived weights train (a channel pruned whole may stay dead: its ReLU passes no gradient back)
            assert acdc.sparsity() < 0.35
    assert zeroed == momentum_resets(list(PLAN), policy)


def test_adamw_reset_is_a_fresh_optimizer():
    """After a reset, AdamW's next step equals that of a newly built AdamW: moments zeroed and the bias correction
    restarted (zeroed moments with the old step count would take a ~3x too large first step)."""
    model = _model()
    optimizer = _optimizer(model, "adamw")
    acdc = ACDC(model, optimizer, **SHORT, reset_momentum="restore")
    for epoch in range(2):
        acdc.start_epoch(epoch)
        for x, y in _batches(epoch):
            _step(model, optimizer, x, y)
    acdc.start_epoch(2)  # a restore: reset
    fresh_model = copy.deepcopy(model)
    fresh = _optimizer(fresh_model, "adamw")
    x, y = _batches(9, 1)[0]
    _step(model, optimizer, x, y)
    _step(fresh_model, fresh, x, y)
    for a, b in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(a, b)
    assert reset_momentum(torch.optim.SGD(model.parameters(), lr=0.1)) == 0  # no momentum: nothing to reset


def test_grad_scaler_skip_steps_change_nothing_and_masks_hold(one_thread):
    model = _model()
    optimizer = _optimizer(model, "sgd")
    acdc = ACDC(model, optimizer, **SHORT)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for epoch in range(2):
        acdc.start_epoch(epoch)
        for x, y in _batches(epoch):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                _step(model, optimizer, x, y, scaler)
    _assert_masked(acdc, 0.7)
    before = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    x, y = _batches(5, 1)[0]
    loss = torch.nn.functional.cross_entropy(model(x), y) * float("inf")  # overflowing gradients: the step is skipped
    optimizer.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**9
    params = dict(model.named_parameters())
    for name in params:
        assert torch.equal(params[name].detach(), before[name]), name
    for x, y in _batches(6):
        _step(model, optimizer, x, y, scaler)
    _assert_masked(acdc, 0.7)
    assert any(not torch.equal(params[n].detach(), before[n]) for n in params)  # later steps do train


def test_ddp_and_compile_wrappers(tmp_path, one_thread):
    """The engine sees through DistributedDataParallel (gradients in bucket views) and torch.compile: the masks
    carry the model's own names and hold under the wrapped forward."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model = _model()
        net = torch.compile(torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True),
                            backend="eager")
        optimizer = _optimizer(model, "sgd")
        acdc = ACDC(net, optimizer, **SHORT)
        assert acdc.model is model
        for epoch in range(4):
            acdc.start_epoch(epoch)
            for x, y in _batches(epoch):
                _step(net, optimizer, x, y)
        assert set(acdc.masks) == {"stem.weight", "conv.weight", "fc.weight"}
        _assert_masked(acdc, 0.7)
        del net
    finally:
        dist.destroy_process_group()


def _train(model, optimizer, acdc, epochs) -> list[float | None]:
    changes = []
    for epoch in epochs:
        acdc.start_epoch(epoch)
        changes.append(acdc.mask_change)
        for x, y in _batches(epoch):
            _step(model, optimizer, x, y)
    return changes


@pytest.mark.parametrize("stop_after", [2, 3])  # resume at a phase start (a compression), or inside a phase
def test_state_dict_round_trip_continues_bit_identically(tmp_path, one_thread, stop_after):
    whole = _model()
    whole_optimizer = _optimizer(whole, "sgd")
    whole_changes = _train(whole, whole_optimizer, ACDC(whole, whole_optimizer, **SHORT), range(6))

    first = _model()
    first_optimizer = _optimizer(first, "sgd")
    first_acdc = ACDC(first, first_optimizer, **SHORT)
    _train(first, first_optimizer, first_acdc, range(stop_after + 1))
    torch.save({"model": first.state_dict(), "optimizer": first_optimizer.state_dict(),
                "acdc": first_acdc.state_dict()}, tmp_path / "state.pt")

    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    model = create("tiny-test", num_classes=10)
    model.load_state_dict(saved["model"])
    optimizer = _optimizer(model, "sgd")
    optimizer.load_state_dict(saved["optimizer"])
    acdc = ACDC(model, optimizer, **SHORT)
    acdc.load_state_dict(saved["acdc"])
    changes = _train(model, optimizer, acdc, range(stop_after + 1, 6))
    assert changes == whole_changes[stop_after + 1:]
    assert changes[-1] is not None  # the mask change at epoch 3 or later is measured against epoch 1's masks
    for a, b in zip(whole.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    other = create("tiny-test", num_classes=10)
    other_plan = ACDC(other, _optimizer(other, "sgd"), **{**SHORT, "warmup_epochs": 2})
    with pytest.raises(AcdcError, match="not in this plan"):
        other_plan.load_state_dict(saved["acdc"])


def test_from_preset_and_bad_arguments():
    model = _model()
    optimizer = _optimizer(model, "sgd")
    assert ACDC.from_preset("quickstart", model, optimizer).plan == tuple(plan(load_settings(preset="quickstart")))
    short = ACDC.from_preset("quickstart", model, optimizer, epochs=12, final_compressed_epochs=2, structure="2:4")
    assert short.plan[-1] == Phase(10, 12, "sparse", 0.5)  # 2:4 implies 50 %
    with pytest.raises(TypeError, match="lr"):
        ACDC.from_preset("quickstart", model, optimizer, lr=0.1)
    with pytest.raises(AcdcError, match="unknown preset"):
        ACDC.from_preset("quickstrat", model, optimizer)
    with pytest.raises(AcdcError, match=r"^invalid setting sparsity:"):
        ACDC(model, optimizer, epochs=10, sparsity=1.5)
    with pytest.raises(AcdcError, match="exceed epochs"):
        ACDC(model, optimizer, epochs=10)  # 10 warm-up + 15 final compressed epochs by default
    with pytest.raises(AcdcError, match="matches no"):
        ACDC(model, optimizer, **SHORT, include=["nothing.*"])
    with pytest.raises(AcdcError, match="optimizer updates none"):
        ACDC(model, _optimizer(_model(), "sgd"), **SHORT)
    acdc = ACDC(model, optimizer, **SHORT)
    with pytest.raises(ValueError, match="outside the plan"):
        acdc.start_epoch(6)
    with pytest.raises(TypeError):
        acdc.masks["fc.weight"] = torch.ones(1)  # read-only
    acdc.remove_hooks()
    acdc.start_epoch(1)
    x, y = _batches()[0]
    _step(model, optimizer, x, y)  # detached: the step no longer masks
    assert torch.count_nonzero(model.fc.weight) == model.fc.weight.numel()


def _readme_example() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs_and_every_command_reads_its_checkpoint(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "example.py").write_text(_readme_example())
    namespace = runpy.run_path(str(tmp_path / "example.py"), run_name="__main__")
    model, acdc = namespace["model"], namespace["acdc"]
    path = tmp_path / "run" / "final.safetensors"
    assert path.is_file() and acdc.phase.kind == "sparse"
    _assert_masked(acdc, 0.9)

    runner = CliRunner()
    inspected = runner.invoke(app, ["inspect", str(path), "--json"])
    assert inspected.exit_code == 0, inspected.output
    info = json.loads(inspected.stdout)
    assert info["kind"] == "checkpoint" and info["metadata"]["arch"] == "torchvision:resnet18"
    assert info["sparsity"] == pytest.approx(0.9, abs=1e-6)

    dense = tmp_path / "dense.safetensors"
    exported = runner.invoke(app, ["export", str(path), "--format", "dense", "--out", str(dense)])
    assert exported.exit_code == 0, exported.output
    import torchvision

    rebuilt = torchvision.models.resnet18(num_classes=10)
    rebuilt.load_state_dict(load_file(str(dense)), strict=True)
    for (name, a), b in zip(model.state_dict().items(), rebuilt.state_dict().values()):
        assert torch.equal(a, b), name

    data = write_cifar10(tmp_path / "cifar", train=300, test=40)
    evaluated = runner.invoke(app, ["eval", str(path), "--split", "test", "--data-dir", str(data), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    result = json.loads(evaluated.stdout)
    assert result["images"] == 40 and result["arch"] == "torchvision:resnet18"
    assert result["sparsity"] == pytest.approx(0.9, abs=1e-6)


def test_save_infers_the_constructor_arguments_or_says_what_to_pass(tmp_path):
    model = create("resnet20", num_classes=7)
    optimizer = _optimizer(model, "sgd")
    acdc = ACDC(model, optimizer, **SHORT)
    acdc.start_epoch(1)
    path = acdc.save(tmp_path / "r20.safetensors", arch="resnet20")
    from acdc_cli.files.checkpoint import build_model, load_checkpoint

    ckpt = load_checkpoint(path)
    assert ckpt.model_kwargs == {"num_classes": 7, "in_channels": 3} and ckpt.epoch == 2 and ckpt.phase == "sparse"
    assert set(ckpt.masks) == set(acdc.masks) and "data" not in ckpt.config
    assert all(torch.equal(a, b) for a, b in zip(build_model(ckpt).state_dict().values(),
                                                   model.state_dict().values()))
    with pytest.raises(AcdcError, match="model_kwargs"):
        acdc.save(tmp_path / "x.safetensors", arch="wrn-16-2")
    with pytest.raises(AcdcError, match="unknown model"):
        acdc.save(tmp_path / "x.safetensors", arch="resnet21")
    result = CliRunner().invoke(app, ["eval", str(path)])
    assert result.exit_code == 2 and "records no dataset" in result.stderr


def test_sparsity_and_flops_describe_the_model_now_even_after_edits_outside_a_step():
    """``p.data`` edits bump no version counter: the readings are computed at each call, never reused."""
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 1, bias=False), torch.nn.Flatten(),
                                torch.nn.Linear(16, 4, bias=False))  # 8 + 64 weights; the conv at 4 positions
    acdc = ACDC(model, torch.optim.SGD(model.parameters(), lr=0.1), **{**SHORT, "sparsity": 0.5})
    acdc.start_epoch(1)  # compressed
    acdc.count_flops((2, 2, 2))
    conv_kept, linear_kept = int(model[0].weight.count_nonzero()), int(model[2].weight.count_nonzero())
    assert acdc.sparsity() == 0.5 and acdc.flops().sparse == 4 * conv_kept + linear_kept
    model[0].weight.data.zero_()
    assert acdc.sparsity() == 1 - linear_kept / 72 and acdc.layer_sparsity()["0.weight"] == 1.0
    assert acdc.flops().sparse == linear_kept
