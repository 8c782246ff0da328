"""The post-backward step: one gradient-mask pass and ``SGD(fused=True)``, no weight mask after it.

The engine masks the pruned weights' momentum once per mask change, so SGD's update of a pruned weight (zero
gradient, zero momentum, zero weight) is exactly zero and the post-step weight mask is skipped for ``torch.optim.SGD``.
Checked here against the previous path (gradient mask + foreach SGD + weight mask, the reference's semantics) step by
step, through mask changes, restores, optimizer state loads and GradScaler skips; any other optimizer keeps the
post-step mask, and AdamW shows why it must.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from acdc_cli import ACDC
from acdc_cli.config import load_settings
from acdc_cli.engine import reset_momentum, step_keeps_zeros
from acdc_cli.models import create
from acdc_cli.sparsity import masks as M
from acdc_cli.sparsity.sparsifier import Sparsifier
from acdc_cli.training import runtime
from acdc_cli.training.loop import build_optimizer

SPARSITY = 0.8
# dense 0, compressed 1, decompressed 2 (momentum reset: "restore"), final compressed 3
SCHEDULE = dict(epochs=4, sparsity=SPARSITY, warmup_epochs=1, compressed_epochs=1, decompressed_epochs=1,
                final_compressed_epochs=1)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create("tiny-test", num_classes=10)


def _batches(epoch: int, count: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(epoch)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(count)]


def _backward(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x, y) -> None:
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def _momentum(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> torch.Tensor:
    return optimizer.state[param]["momentum_buffer"]


class PreviousPath:
    """The step before the fused one, as the engine's hooks ran it: gradient mask, foreach SGD, weight mask. Its
    momentum is never masked: a pruned weight's momentum decays, and the weight mask undoes what it moves."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                                         weight_decay=5e-4, foreach=True)
        self.sparsifier = Sparsifier(model, ["*"], [], "global", "unstructured")

    def step(self, x, y) -> None:
        _backward(self.model, self.optimizer, x, y)
        self.sparsifier.apply_to_grads()
        self.optimizer.step()
        self.sparsifier.apply_to_weights()


def test_fused_step_equals_the_previous_path_and_never_re_masks_weights(one_thread, monkeypatch):
    settings = load_settings(overrides=["model.name='tiny-test'", "optim.lr=0.05", "optim.momentum=0.9",
                                        "optim.nesterov=true", "optim.weight_decay=5e-4"])
    model = _model()
    optimizer = build_optimizer(model, settings)
    assert optimizer.defaults["fused"] is True and not optimizer.defaults["foreach"]
    acdc = ACDC(model, optimizer, **SCHEDULE)
    previous = PreviousPath(copy.deepcopy(model))
    weight_masks = []
    monkeypatch.setattr(acdc.sparsifier, "apply_to_weights",
                        lambda real=acdc.sparsifier.apply_to_weights: weight_masks.append(1) or real())
    params, old_params = dict(model.named_parameters()), dict(previous.model.named_parameters())
    pruned_momentum_moved = False
    for epoch in range(SCHEDULE["epochs"]):
        phase = acdc.start_epoch(epoch)
        if phase.kind == "sparse":
            previous.sparsifier.compress(SPARSITY)
            assert all(torch.equal(acdc.masks[n], m) for n, m in previous.sparsifier.masks.items())
        else:
            previous.sparsifier.decompress()
            if epoch == 2:
                reset_momentum(previous.optimizer)  # what "restore" does at the start of a decompressed phase
        masked_at_start = len(weight_masks)
        for x, y in _batches(epoch):
            _backward(model, optimizer, x, y)
            optimizer.step()
            previous.step(x, y)
            # the fused kernel may round a few elements differently (a 10-element bias differed by 2e-9 here)
            for name, param in params.items():
                torch.testing.assert_close(param, old_params[name], rtol=1e-5, atol=1e-7)
            if phase.kind != "sparse":
                continue
            for name, mask in acdc.masks.items():
                assert torch.count_nonzero(params[name].detach()[~mask]) == 0
                assert torch.count_nonzero(params[name].grad[~mask]) == 0
                assert torch.count_nonzero(_momentum(optimizer, params[name])[~mask]) == 0
                pruned_momentum_moved |= bool(_momentum(previous.optimizer, old_params[name])[~mask].any())
        # the engine masked the weights once, when the masks changed (start_epoch), never after a step
        assert len(weight_masks) == masked_at_start
    # the previous path's pruned momentum was live: the fused path's zeros are the masking's doing
    assert pruned_momentum_moved
    assert acdc.sparsity() == M.pruned_count(acdc.sparsifier.numel, SPARSITY) / acdc.sparsifier.numel


@pytest.mark.parametrize("how", ["sparsifier", "optimizer_state"])
def test_momentum_is_masked_whenever_it_may_be_stale(one_thread, how):
    """Masks set on the sparsifier directly (bypassing start_epoch), or an optimizer state loaded after the masks
    (a resume): the next step masks the momentum first, so pruned weights stay exactly zero."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01, fused=True)
    acdc = ACDC(model, optimizer, **SCHEDULE)
    acdc.start_epoch(0)
    for x, y in _batches(0):
        _backward(model, optimizer, x, y)
        optimizer.step()
    if how == "sparsifier":
        acdc.sparsifier.compress(SPARSITY)
    else:
        acdc.start_epoch(1)
        stale = copy.deepcopy(optimizer.state_dict())
        for state in stale["state"].values():
            state["momentum_buffer"].fill_(1.0)  # momentum everywhere, the pruned weights' too
        optimizer.load_state_dict(stale)
    params = dict(model.named_parameters())
    assert any(_momentum(optimizer, params[n])[~m].any() for n, m in acdc.masks.items())
    for x, y in _batches(1):
        _backward(model, optimizer, x, y)
        optimizer.step()
        for name, mask in acdc.masks.items():
            assert torch.count_nonzero(params[name].detach()[~mask]) == 0
            assert torch.count_nonzero(_momentum(optimizer, params[name])[~mask]) == 0
    assert acdc.sparsity() == M.pruned_count(acdc.sparsifier.numel, SPARSITY) / acdc.sparsifier.numel


def test_a_gradient_scaler_gets_foreach_sgd_and_its_skipped_steps_change_nothing(one_thread):
    """fp16 (an enabled GradScaler) gets foreach SGD, not fused: a fused SGD whose first step the scaler skips
    (common at fp16's initial scale) creates its momentum buffers with torch.empty_like and leaves them unwritten
    (torch 2.14's _fused_sgd), and the next step reads that memory. With foreach a skipped step is not called at all;
    an infinite gradient at a pruned weight is seen by the scaler before the mask could turn it into NaN."""
    model = _model()
    params = dict(model.named_parameters())
    kernel = runtime.sgd_kernel(list(params.values()), scaled=True)
    assert kernel == {"foreach": True}
    optimizer = torch.optim.SGD(params.values(), lr=0.1, momentum=0.9, **kernel)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    acdc = ACDC(model, optimizer, **SCHEDULE)
    acdc.start_epoch(1)
    name, mask = next(iter(acdc.masks.items()))
    (x, y), *rest = _batches(1)
    optimizer.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    params[name].grad[~mask] = float("inf")
    before = {n: p.detach().clone() for n, p in params.items()}
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(before[n], p) for n, p in params.items()) and not optimizer.state
    assert scaler.get_scale() == 2.0**7  # the skip was seen
    for x, y in rest:
        optimizer.zero_grad()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        scaler.step(optimizer)
        scaler.update()
    for n, m in acdc.masks.items():
        assert torch.count_nonzero(params[n].detach()[~m]) == 0
    assert not torch.equal(before[name][mask], params[name].detach()[mask])  # the kept weights trained


class _MySGD(torch.optim.SGD):
    pass


def _adamw(params):
    return torch.optim.AdamW(params, lr=0.01, weight_decay=0.05)


@pytest.mark.parametrize(("make", "keeps"), [
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, fused=True), True),
    (lambda p: torch.optim.SGD(p, lr=0.1, foreach=False, maximize=True), True),
    (lambda p: torch.optim.SGD(p, lr=torch.tensor(0.1)), False),  # checking a tensor would sync with the device
    (lambda p: torch.optim.SGD(p, lr=float("inf")), False),  # inf x 0 is NaN
    (lambda p: _MySGD(p, lr=0.1), False),  # a subclass may change the update
    (_adamw, False),
    (lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.9), False),
])
def test_only_plain_sgd_with_finite_numbers_skips_the_weight_mask(make, keeps):
    assert step_keeps_zeros(make(_model().parameters())) is keeps


def test_adamw_keeps_the_post_step_mask_because_it_needs_it(one_thread, monkeypatch):
    """AdamW moves a pruned weight off zero through its first moment (left unmasked: see
    Sparsifier.apply_to_momentum); the post-step mask puts it back, and without it the weight would stay moved."""
    import acdc_cli.engine as engine_module

    results = {}
    for post_mask in (True, False):
        model = _model()
        optimizer = _adamw(model.parameters())
        acdc = ACDC(model, optimizer, **SCHEDULE)
        if not post_mask:
            monkeypatch.setattr(engine_module, "step_keeps_zeros", lambda optimizer: True)
        for epoch in (0, 1):
            acdc.start_epoch(epoch)
            for x, y in _batches(epoch):
                _backward(model, optimizer, x, y)
                optimizer.step()
        params = dict(model.named_parameters())
        results[post_mask] = sum(int(torch.count_nonzero(params[n].detach()[~m])) for n, m in acdc.masks.items())
    assert results[True] == 0 and results[False] > 0


def test_sgd_kernel_is_fused_where_the_device_has_one():
    assert runtime.sgd_kernel([torch.zeros(2)]) == {"fused": True}  # the CPU has fused SGD
    assert runtime.sgd_kernel([torch.zeros(2)], scaled=True) == {"foreach": True}
    assert runtime.sgd_kernel([torch.zeros(2), torch.zeros(2, device="meta")]) == {"foreach": True}
    assert runtime.sgd_kernel([torch.zeros(2, dtype=torch.int64)]) == {"foreach": True}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_step_on_cuda_equals_the_previous_path(monkeypatch):
    """On CUDA: acdc's optimizer is SGD(fused=True), foreach under fp16's GradScaler; through a compression on a
    channels_last model, pruned weights, their gradients and momentum are exactly zero after every step with no
    weight mask after it, and the weights follow the previous path's (gradient mask + foreach SGD + weight mask) to
    rounding (fp32, TF32 off, so that a last-bit difference of the kernels is not amplified; bf16 autocast with
    acdc's own step is tests/gpu/test_gpu.py)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # matmuls are fp32 by PyTorch's default
    cuda = torch.device("cuda")
    settings = load_settings(overrides=["model.name='wrn-10-2'", "optim.lr=0.05", "optim.momentum=0.9",
                                        "optim.nesterov=true", "optim.weight_decay=5e-4"])
    torch.manual_seed(0)
    model = create("wrn-10-2", num_classes=10).to(cuda).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, settings)
    assert optimizer.defaults["fused"] is True
    fp16 = settings.model_copy(update={"runtime": settings.runtime.model_copy(update={"amp": "fp16"})})
    assert build_optimizer(copy.deepcopy(model), fp16).defaults["foreach"] is True
    acdc = ACDC(model, optimizer, **SCHEDULE)
    previous = PreviousPath(copy.deepcopy(model))
    weight_masks = []
    monkeypatch.setattr(acdc.sparsifier, "apply_to_weights",
                        lambda real=acdc.sparsifier.apply_to_weights: weight_masks.append(1) or real())
    params, old_params = dict(model.named_parameters()), dict(previous.model.named_parameters())
    g = torch.Generator(device=cuda).manual_seed(0)
    batches = [(torch.randn(32, 3, 32, 32, device=cuda, generator=g).contiguous(memory_format=torch.channels_last),
                torch.randint(0, 10, (32,), device=cuda, generator=g)) for _ in range(3)]
    for epoch in range(2):
        phase = acdc.start_epoch(epoch)
        if phase.kind == "sparse":
            previous.sparsifier.compress(SPARSITY)
            assert all(torch.equal(acdc.masks[n], m) for n, m in previous.sparsifier.masks.items())
        masked = len(weight_masks)
        for index, (x, y) in enumerate(batches):
            torch.manual_seed(index)  # the same dropout draws in both
            _backward(model, optimizer, x, y)
            optimizer.step()
            torch.manual_seed(index)
            previous.step(x, y)
            for name, param in params.items():
                torch.testing.assert_close(param, old_params[name], rtol=1e-4, atol=1e-6)
            for name, mask in acdc.masks.items():
                assert int(torch.count_nonzero(params[name].detach()[~mask])) == 0
                assert int(torch.count_nonzero(params[name].grad[~mask])) == 0
                assert int(torch.count_nonzero(_momentum(optimizer, params[name])[~mask])) == 0
        assert len(weight_masks) == masked
    assert acdc.sparsity() == M.pruned_count(acdc.sparsifier.numel, SPARSITY) / acdc.sparsifier.numel


def _ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest |a - b| in units in the last place of ``a`` (float32)."""
    a, b = a.detach(), b.detach()
    ulp = torch.nextafter(a.abs(), torch.tensor(float("inf"))) - a.abs()
    return float(((a - b).abs() / ulp).max())


def test_one_fused_step_is_within_one_ulp_of_the_previous_path_from_the_same_state(one_thread):
    """What the fused step equals, exactly: from the same weights and (masked) momentum, one step of the fused path
    leaves every weight within 1 ulp and every momentum value within 2 ulps of the previous path's (the fused
    kernel rounds ``momentum * b + d`` and the update once where foreach rounds each operation), and pruned
    weights exactly zero in both. Over many steps the two paths drift apart by these roundings only."""
    settings = load_settings(overrides=["model.name='tiny-test'", "optim.lr=0.05", "optim.momentum=0.9",
                                        "optim.nesterov=true", "optim.weight_decay=5e-4"])
    model = _model()
    optimizer = build_optimizer(model, settings)
    acdc = ACDC(model, optimizer, **SCHEDULE)
    previous = PreviousPath(copy.deepcopy(model))
    params, old_params = dict(model.named_parameters()), dict(previous.model.named_parameters())
    worst_weight = worst_momentum = 0.0
    rounded = False
    for epoch in range(SCHEDULE["epochs"]):
        phase = acdc.start_epoch(epoch)
        if phase.kind == "sparse":
            previous.sparsifier.compress(SPARSITY)
        else:
            previous.sparsifier.decompress()
        for x, y in _batches(epoch, 6):
            with torch.no_grad():  # the same state on both sides
                for name, param in params.items():
                    old_params[name].copy_(param)
                    if param in optimizer.state:
                        previous.optimizer.state[old_params[name]]["momentum_buffer"] = _momentum(optimizer,
                                                                                                  param).clone()
            _backward(model, optimizer, x, y)
            optimizer.step()
            previous.step(x, y)
            for name, param in params.items():
                worst_weight = max(worst_weight, _ulps(param, old_params[name]))
                worst_momentum = max(worst_momentum, _ulps(_momentum(optimizer, param),
                                                           _momentum(previous.optimizer, old_params[name])))
                rounded |= not torch.equal(_momentum(optimizer, param), _momentum(previous.optimizer,
                                                                                    old_params[name]))
            for name, mask in acdc.masks.items():
                assert torch.count_nonzero(params[name].detach()[~mask]) == 0
                assert torch.count_nonzero(old_params[name].detach()[~mask]) == 0
    assert worst_weight <= 1 and worst_momentum <= 2
    assert rounded  # the paths really differ in rounding: the bound is what holds, not bit-equality
