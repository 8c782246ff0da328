"""The public engine refuses what the CLI refuses: a save onto a device node or a folder, non-finite weights, engine
states whose masks, epoch or mask change acdc could not have written, a negative epoch size, and input shapes
outside what a model measures. Each is one AcdcError that leaves the engine (and the disk) as they were."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from acdc_cli import ACDC
from acdc_cli.errors import AcdcError
from acdc_cli.models import create
from acdc_cli.sections import MAX_IMAGE_SIDE

SHORT = dict(epochs=6, sparsity=0.7, warmup_epochs=1, compressed_epochs=1, decompressed_epochs=1,
             final_compressed_epochs=2)


def _engine() -> tuple[torch.nn.Module, ACDC]:
    torch.manual_seed(0)
    model = create("tiny-test", num_classes=10)
    acdc = ACDC(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), **SHORT)
    return model, acdc


def _sparse_state() -> tuple[ACDC, dict]:
    """An engine in its first compressed phase (epoch 1) and its state."""
    _, acdc = _engine()
    acdc.start_epoch(0)
    acdc.start_epoch(1)
    return acdc, acdc.state_dict()


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and len(message) < 300
    return message


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_save_refuses_a_device_node_and_leaves_it_a_device(tmp_path):
    _, acdc = _engine()
    with pytest.raises(AcdcError) as exc:
        acdc.save("/dev/full", arch="tiny-test")
    assert _one_line(exc) == "cannot save to /dev/full: it exists and is not a regular file"
    assert Path("/dev/full").is_char_device()
    folder = tmp_path / "a-folder"
    folder.mkdir()
    with pytest.raises(AcdcError, match="it exists and is not a regular file"):
        acdc.save(folder, arch="tiny-test")
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_save_refuses_non_finite_weights_and_writes_nothing(tmp_path, bad):
    model, acdc = _engine()
    name = next(n for n, p in model.named_parameters() if n.endswith("bias"))
    with torch.no_grad():
        dict(model.named_parameters())[name][0] = bad
    with pytest.raises(AcdcError) as exc:
        acdc.save(tmp_path / "m.safetensors", arch="tiny-test")
    assert _one_line(exc) == f"cannot save: {name} holds non-finite values (inf or NaN); the model has diverged"
    assert list(tmp_path.iterdir()) == []


def _first(masks: dict) -> str:
    return next(iter(masks))


@pytest.mark.parametrize("field,damage,expected", [
    ("masks", lambda m, n: {**m, n: torch.full_like(m[n], 2, dtype=torch.uint8)}, r"masks\[.*\] holds values other"),
    ("masks", lambda m, n: {**m, n: torch.full_like(m[n], 0.5, dtype=torch.float32)}, r"is float32, expected bool"),
    ("masks", lambda m, n: {**m, "no.such.weight": m[n]}, "has a mask for 'no.such.weight', which the sparsity"),
    ("masks", lambda m, n: {k: v for k, v in m.items() if k != n}, "has no mask for"),
    ("masks", lambda m, n: {**m, n: m[n][:1]}, r"is a tensor of shape \[1, "),
    ("masks", lambda m, n: "all", "is 'all', expected a table of masks"),
    ("previous_masks", lambda m, n: {n: m[n]}, "previous_masks has no mask for"),
    ("previous_masks", lambda m, n: {k: torch.full_like(v, 2, dtype=torch.uint8) for k, v in m.items()},
     "holds values other than 0 and 1"),
    ("previous_masks", lambda m, n: {k: v.float() for k, v in m.items()}, "is float32, expected bool"),
], ids=["mask-2", "mask-half", "unknown-layer", "partial", "wrong-shape", "not-a-table", "previous-partial",
        "previous-all-2", "previous-float"])
def test_load_state_dict_refuses_masks_acdc_does_not_write(field, damage, expected):
    _, state = _sparse_state()
    masks = {k: v.clone() for k, v in state["masks"].items()}
    # loaded into an engine still in its dense warm-up: a partial load would change its epoch, phase or masks
    _, acdc = _engine()
    acdc.start_epoch(0)
    before = acdc.state_dict()
    assert not _same(before, state)
    with pytest.raises(AcdcError, match=expected) as exc:
        acdc.load_state_dict({**state, field: damage(masks, _first(masks))})
    _one_line(exc)
    assert _same(acdc.state_dict(), before)  # refused whole: nothing of the state was taken


def _same(a, b) -> bool:
    """Equal nested state: tensors by value, everything else by ==."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("field,value,expected", [
    ("mask_change", "x", "mask_change is 'x', expected none or a fraction 0..1"),
    ("mask_change", math.nan, "mask_change is nan, expected none or a fraction 0..1"),
    ("mask_change", 1.5, "mask_change is 1.5, expected none or a fraction 0..1"),
    ("mask_change", True, "mask_change is True, expected none or a fraction 0..1"),
    ("epoch", -7, r"epoch is -7, expected none or an epoch of this plan \(0 to 5\)"),
    ("epoch", 6, r"epoch is 6, expected none or an epoch of this plan"),
    ("epoch", 1.0, r"epoch is 1.0, expected none or an epoch of this plan"),
    ("phase", {"start": 1}, "which is not in this plan"),
])
def test_load_state_dict_refuses_a_bad_epoch_or_mask_change(field, value, expected):
    acdc, state = _sparse_state()
    with pytest.raises(AcdcError, match=expected) as exc:
        acdc.load_state_dict({**state, field: value})
    _one_line(exc)
    assert acdc.state_dict()["epoch"] == 1


def test_load_state_dict_takes_uint8_masks_as_booleans():
    acdc, state = _sparse_state()
    _, other = _engine()
    other.load_state_dict({**state, "masks": {k: v.to(torch.uint8) for k, v in state["masks"].items()}})
    assert all(m.dtype == torch.bool and torch.equal(m, state["masks"][k]) for k, m in other.masks.items())


@pytest.mark.parametrize("images", [-5, 1.5, True, "10"])
def test_end_epoch_refuses_what_is_not_a_count_of_images(images):
    _, acdc = _engine()
    acdc.count_flops((3, 8, 8))
    acdc.start_epoch(0)
    with pytest.raises(AcdcError, match=r"end_epoch\(images\): images is .*, expected a whole number >= 0"):
        acdc.end_epoch(images)
    assert acdc.train_flops.flops == 0 and acdc.train_flops.dense_flops == 0
    acdc.end_epoch(0)
    assert acdc.train_flops.flops == 0


@pytest.mark.parametrize("shape,expected", [
    ((3, 0, 0), r"input_shape \(3, 0, 0\) is out of bounds"),
    ((3, 100000, 100000), rf"input_shape \(3, 100000, 100000\) is out of bounds \(channels 1..64, height and width "
                          rf"1..{MAX_IMAGE_SIDE}\)"),
    ((3, 8), r"input_shape is \(3, 8\), expected \(channels, height, width\)"),
    ((3, 8.0, 8), r"expected \(channels, height, width\)"),
    ((5, 8, 8), r"the model does not take images of shape \(5, 8, 8\)"),
])
def test_count_flops_bounds_the_input_before_allocating(shape, expected):
    _, acdc = _engine()
    with pytest.raises(AcdcError, match=expected) as exc:
        acdc.count_flops(shape)
    _one_line(exc)
    with pytest.raises(RuntimeError, match="call count_flops"):
        acdc.flops()
