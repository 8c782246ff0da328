"""Properties of the fast training step that the GPU relies on, checked on the CPU: the step never makes the host
wait for the device, masks stay exact under bf16 autocast, channels_last and torch.compile, and the on-device
augmentation really is a padded random crop plus a horizontal flip."""

from __future__ import annotations

import math

import pytest
import torch
from cli_helpers import needs_cpp_compiler
from torch.utils._python_dispatch import TorchDispatchMode

from acdc_cli.commands.bench import RepeatedBatch
from acdc_cli.config import load_settings
from acdc_cli.data.tensor_loader import TensorLoader
from acdc_cli.engine import ACDC
from acdc_cli.models import create
from acdc_cli.sparsity import masks as M
from acdc_cli.training import runtime
from acdc_cli.training.distributed import DistInfo
from acdc_cli.training.loop import EpochSteps, build_optimizer, train_epoch

CPU = torch.device("cpu")

# ops that copy a device value to the host (or need its size there) on CUDA: each one makes the host wait for all
# queued GPU work
_HOST_WAITS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal",
               "aten::masked_select", "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim",
               "aten::repeat_interleave"}
_INDEXING = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}


class HostWaits(TorchDispatchMode):
    """Records every op that would synchronize the host with a CUDA device; boolean-mask indexing counts too
    (it is a nonzero inside)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in _HOST_WAITS:
            self.seen.append(name)
        elif name in _INDEXING and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool
                                       for t in args[1] if t is not None):
            self.seen.append(f"{name} (boolean index)")
        return func(*args, **(kwargs or {}))


def _setup(overrides: list[str], model_name: str = "tiny-test", structure: str = "unstructured"):
    settings = load_settings(overrides=[f"model.name='{model_name}'", f"sparsity.structure='{structure}'",
                                        "optim.label_smoothing=0.1", *overrides])
    torch.manual_seed(0)
    model = create(model_name, num_classes=10, dropout=0.3 if model_name == "tiny-test" else None)
    return settings, model


def _masked_optimizer(model, settings):
    """The training optimizer with the engine's masking hooks, and the engine's sparsifier (whose masks they
    apply)."""
    optimizer = build_optimizer(model, settings)
    return optimizer, ACDC.from_settings(settings, model, optimizer).sparsifier


def _pruned_weights_and_grads_zero(model, masks) -> tuple[bool, bool]:
    params = dict(model.named_parameters())
    weights = all(int(torch.count_nonzero(params[n].detach()[~m])) == 0 for n, m in masks.items())
    grads = all(int(torch.count_nonzero(params[n].grad[~m])) == 0 for n, m in masks.items())
    return weights, grads


def test_training_step_never_waits_for_the_host(one_thread):
    """Every op of the steps (augmenting loader, forward, loss, backward, mask multiplies, optimizer, the on-device
    metric sums) runs without a device-to-host read; the epoch's three sums are read once, after the last step."""
    settings, model = _setup([])
    optimizer, sparsifier = _masked_optimizer(model, settings)
    sparsifier.compress(0.8)
    g = torch.Generator().manual_seed(0)
    loader = TensorLoader(torch.randint(0, 256, (96, 3, 8, 8), generator=g, dtype=torch.uint8),
                          torch.randint(0, 10, (96,), generator=g), 16, (0.5,) * 3, (0.25,) * 3,
                          shuffle=True, augment=True, pad=2)
    per_step: list[int] = []
    with HostWaits() as waits:
        steps = EpochSteps(model, loader, optimizer, settings, epoch=0, device=CPU)
        for _ in steps:
            per_step.append(len(waits.seen))
        stats = steps.stats()
    assert per_step == [0] * 6, waits.seen
    assert waits.seen == ["aten::_local_scalar_dense"] * 3  # first bad step, loss sum, top-1 count: once an epoch
    assert stats["train_loss"] > 0
    assert sparsifier.stats()["sparsity"] == M.pruned_count(sparsifier.numel, 0.8) / sparsifier.numel


def test_the_host_wait_detector_sees_what_it_looks_for():
    x = torch.arange(6.0)
    with HostWaits() as waits:
        x.sum().item()
        x[x > 2]
        torch.nonzero(x)
        x * 2  # not a wait
    assert waits.seen == ["aten::_local_scalar_dense", "aten::index (boolean index)", "aten::nonzero"]


@pytest.mark.parametrize(("structure", "sparsity"), [("unstructured", 0.6), ("2:4", 0.5)])
def test_masks_exact_under_bf16_autocast_and_channels_last(one_thread, structure, sparsity):
    """acdc's step inside bf16 autocast on a channels_last model: pruned weights and their gradients are exactly
    zero, 2:4 groups hold 2 of 4, the weights stay fp32 and channels_last, and the mask multipliers match the
    weights' layout (the foreach fast path)."""
    settings, model = _setup([], structure=structure)
    model.to(memory_format=torch.channels_last)
    optimizer, sparsifier = _masked_optimizer(model, settings)
    x = torch.randn(16, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,))
    train_epoch(model, RepeatedBatch(x, y, 2), optimizer, settings, device=CPU)
    sparsifier.compress(sparsity)
    masks = {n: m.clone() for n, m in sparsifier.masks.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = train_epoch(model, RepeatedBatch(x, y, 4), optimizer, settings, device=CPU)
    assert math.isfinite(stats["train_loss"])
    weights_zero, grads_zero = _pruned_weights_and_grads_zero(model, masks)
    assert weights_zero and grads_zero
    assert all(torch.equal(sparsifier.masks[n], m) for n, m in masks.items())
    params = dict(model.named_parameters())
    if structure == "2:4":
        assert all(M.nm_valid(params[n].detach(), 2, 4) for n in masks)
    else:
        assert sum(int((~m).sum()) for m in masks.values()) == M.pruned_count(sparsifier.numel, sparsity)
    for name, factor in zip(sparsifier.params, sparsifier._factors):
        weight = params[name]
        assert weight.dtype == torch.float32 and factor.dtype == torch.float32
        assert factor.stride() == weight.stride()
        if weight.dim() == 4:
            assert weight.is_contiguous(memory_format=torch.channels_last)
    # a kept weight still learns
    assert any(int(torch.count_nonzero(params[n].grad[m])) > 0 for n, m in masks.items())


@needs_cpp_compiler
def test_compiled_step_keeps_masks_exact_and_matches_eager(one_thread):
    """torch.compile through prepare_model (inductor on the CPU; ~20 s to compile): the same losses as the eager
    step from the same weights, pruned weights and gradients exactly zero, no recompilation when the masks change,
    and checkpoints keep the model's own names."""
    import copy

    from torch._dynamo.utils import counters

    settings, eager_model = _setup(["runtime.compile=true"], model_name="digits-cnn")
    compiled_model = copy.deepcopy(eager_model)
    names = list(eager_model.state_dict())
    net = runtime.prepare_model(compiled_model, settings, DistInfo(0, 1, 0, CPU))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)
    runs = {}
    torch._dynamo.reset()
    counters.clear()
    for label, model, step_net in (("eager", eager_model, eager_model), ("compiled", compiled_model, net)):
        optimizer, sparsifier = _masked_optimizer(model, settings)
        dense = train_epoch(step_net, RepeatedBatch(x, y, 2), optimizer, settings, device=CPU)
        sparsifier.compress(0.9)
        masks = {n: m.clone() for n, m in sparsifier.masks.items()}
        sparse = train_epoch(step_net, RepeatedBatch(x, y, 3), optimizer, settings, device=CPU)
        runs[label] = (dense["train_loss"], sparse["train_loss"], masks, model)
    graphs_after_masks = counters["stats"]["unique_graphs"]
    eager, compiled = runs["eager"], runs["compiled"]
    assert compiled[0] == pytest.approx(eager[0], rel=1e-4) and compiled[1] == pytest.approx(eager[1], rel=1e-4)
    assert all(torch.equal(compiled[2][n], eager[2][n]) for n in eager[2])  # the same weights pruned
    assert _pruned_weights_and_grads_zero(compiled_model, compiled[2]) == (True, True)
    assert sum(int((~m).sum()) for m in compiled[2].values()) == M.pruned_count(
        sum(m.numel() for m in compiled[2].values()), 0.9)
    for a, b in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    assert graphs_after_masks >= 1
    sparsifier.decompress()
    train_epoch(net, RepeatedBatch(x, y, 1), optimizer, settings, device=CPU)
    assert counters["stats"]["unique_graphs"] == graphs_after_masks  # masks live outside the graph
    assert list(compiled_model.state_dict()) == names


# ----------------------------------------------------------------------------------------------------------------
# the GPU-resident loader's augmentation


def _loader(images, labels, **kw) -> TensorLoader:
    return TensorLoader(images, labels, 8, (0.0,) * 3, (1 / 255,) * 3, **kw)  # normalize() then returns the pixels


def test_augmentation_is_a_padded_crop_then_maybe_a_flip():
    g = torch.Generator().manual_seed(0)
    n, pad = 40, 2
    images = torch.randint(1, 256, (n, 3, 6, 6), generator=g, dtype=torch.uint8)  # no zero pixels: padding shows
    loader = _loader(images, torch.arange(n), augment=True, pad=pad)
    padded = torch.nn.functional.pad(images, (pad,) * 4)
    offsets, flipped = set(), 0
    for out, labels in loader:
        for pixels, index in zip(out.round().to(torch.uint8), labels.tolist()):
            hits = [(dy, dx, flip) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for flip in (0, 1)
                    if torch.equal(pixels, padded[index, :, dy:dy + 6, dx:dx + 6].flip(2) if flip
                                   else padded[index, :, dy:dy + 6, dx:dx + 6])]
            assert hits, f"image {index} is no crop of its padded original"
            offsets.add(hits[0][:2])
            flipped += hits[0][2]
    assert len(offsets) > 10  # of 25 possible
    assert 8 <= flipped <= 32  # about half of 40


def test_augmentation_depends_on_the_epoch_only_and_resumes_mid_epoch():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (30, 3, 6, 6), generator=g, dtype=torch.uint8)
    loader = _loader(images, torch.arange(30), augment=True, shuffle=True, seed=4)
    loader.set_epoch(2)
    first = [x for x, _ in loader]
    again = [x for x, _ in loader]
    tail = [x for x, _ in loader.iterate(start_batch=2)]
    loader.set_epoch(3)
    other = [x for x, _ in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert len(tail) == 2 and all(torch.equal(a, b) for a, b in zip(first[2:], tail))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    plain = _loader(images, torch.arange(30))
    assert torch.equal(next(iter(plain))[0], images[:8].float())  # augment off: the pixels as stored
