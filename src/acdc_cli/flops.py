"""FLOPs as the AC/DC paper counts them (IST-DASLab/ACDC ``utils/flop_utils.py`` get_macs_sparse, called from
``policies/manager.py`` after every epoch).

A layer's cost is the multiply-accumulates of its Conv2d or Linear weight: output positions per image x non-zero
weights, so zeros in the weights are skipped. Only conv and linear layers count (BatchNorm, activations, pooling and
biases are left out: they are a fraction of a percent of a ResNet's total and do not depend on sparsity). Training
costs forward + backward = 3 x forward per image (backward = 2 x forward); a dense epoch costs the dense model's
forward, a compressed epoch its sparse model's. FLOPs here are multiply-accumulates: ResNet-50's 4.09 G per
224-pixel image is the usual "4.1 GFLOPs".

Typical use::

    positions = output_positions(model, (3, 224, 224))      # once: runs one forward pass
    flops = inference_flops(model, positions)                # every epoch: counts non-zeros only
    run = TrainingFlops().add_epoch(phase_kind, flops, images_seen_this_epoch)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from acdc_cli.errors import AcdcError
from acdc_cli.sections import MAX_IMAGE_SIDE

_COUNTED = (nn.Conv2d, nn.Linear)


def output_positions(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Output positions per image of every Conv2d and Linear module, by module name, from one forward pass of a
    single zero image of ``input_shape`` (channels, height, width).

    A conv's positions are its output height x width; a linear layer's are 1 for a (batch, features) input. A module
    called more than once adds up its calls. The pass runs in eval mode without gradients, so batch-norm statistics
    are not touched; each module's train/eval mode is restored afterwards.
    """
    names = {module: name for name, module in model.named_modules() if isinstance(module, _COUNTED)}
    positions = dict.fromkeys(names.values(), 0)

    def record(module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        # everything between the batch dimension and the output features/channels is a position
        shape = output.shape[2:] if isinstance(module, nn.Conv2d) else output.shape[1:-1]
        positions[names[module]] += math.prod(shape)

    modes = {module: module.training for module in model.modules()}
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    hooks = [module.register_forward_hook(record) for module in names]
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device, dtype=dtype))
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.training = training
    return positions


@dataclass(frozen=True)
class LayerFlops:
    name: str  # module name
    positions: int  # output positions per image
    weights: int  # weight elements
    nonzero: int  # non-zero weight elements

    @property
    def dense(self) -> int:
        return self.positions * self.weights

    @property
    def sparse(self) -> int:
        return self.positions * self.nonzero


def layer_flops(model: nn.Module, positions: dict[str, int]) -> list[LayerFlops]:
    """Per-layer multiply-accumulates per image of the model as it is now (``positions`` from
    :func:`output_positions`); layers the forward pass never reached cost nothing."""
    modules = dict(model.named_modules())
    weights = [modules[name].weight for name in positions]
    nonzero = torch.stack([torch.count_nonzero(w.detach()) for w in weights]).tolist() if weights else []
    return [LayerFlops(name, count, w.numel(), nz) for (name, count), w, nz in zip(positions.items(), weights, nonzero)]


@dataclass(frozen=True)
class InferenceFlops:
    dense: int  # multiply-accumulates per image with every weight
    sparse: int  # the same with zero weights skipped

    @property
    def ratio(self) -> float:
        """sparse / dense (1.0 for a model without counted layers)."""
        return self.sparse / self.dense if self.dense else 1.0

    def as_dict(self) -> dict[str, float]:
        return {"dense": self.dense, "sparse": self.sparse, "ratio": self.ratio}


def inference_flops(model: nn.Module, positions: dict[str, int]) -> InferenceFlops:
    """Per-image inference cost of the model as it is, dense and with its zeros skipped."""
    layers = layer_flops(model, positions)
    return InferenceFlops(sum(layer.dense for layer in layers), sum(layer.sparse for layer in layers))


def epoch_forward_flops(phase: str, flops: InferenceFlops) -> int:
    """Forward cost per image of an epoch: the dense model's in a dense phase, the sparse model's in a compressed
    one (the reference counts the model at the end of each epoch: all weights non-zero after a dense epoch)."""
    if phase == "dense":
        return flops.dense
    if phase == "sparse":
        return flops.sparse
    raise ValueError(f"unknown phase '{phase}' (dense, sparse)")


@dataclass(frozen=True)
class TrainingFlops:
    """Training cost of a run so far, beside the same run fully dense."""

    flops: int = 0  # forward + backward multiply-accumulates of the epochs added
    dense_flops: int = 0  # the same epochs at the dense model's cost

    @property
    def ratio(self) -> float:
        """flops / dense_flops: the mean over epochs (weighted by images) of 1 for a dense epoch and the sparse
        ratio for a compressed one (1.0 before any epoch)."""
        return self.flops / self.dense_flops if self.dense_flops else 1.0

    def add_epoch(self, phase: str, flops: InferenceFlops, images: int) -> TrainingFlops:
        """This cost plus one epoch of ``phase`` ("dense" | "sparse") over ``images`` training images."""
        per_image = 3 * epoch_forward_flops(phase, flops)  # forward + backward (2 x forward)
        return TrainingFlops(self.flops + per_image * images, self.dense_flops + 3 * flops.dense * images)


def weights_flops(positions: Mapping[str, int], weights: Mapping[str, torch.Tensor]) -> InferenceFlops:
    """Per-image cost of weights held by name (a state dict, a decoded export, an ONNX model's initializers): layer
    ``m`` of ``positions`` costs its positions x the elements (dense) or the non-zeros (sparse) of ``m.weight``."""
    missing = [name for name in positions if f"{name}.weight" not in weights]
    if missing:
        raise KeyError(f"no weight for layer {missing[0]}")
    dense = sparse = 0
    for name, count in positions.items():
        weight = weights[f"{name}.weight"]
        dense += count * weight.numel()
        sparse += count * int(torch.count_nonzero(weight))
    return InferenceFlops(dense, sparse)


def si(count: float) -> str:
    """A FLOPs count for people, in SI units: 4.09 G, 568.7 M, 1.6 E."""
    for unit in ("", "k", "M", "G", "T", "P", "E"):
        if abs(count) < 1000 or unit == "E":
            break
        count /= 1000
    return f"{count:.4g} {unit}".rstrip()


def check_input_shape(input_shape: Any) -> tuple[int, int, int]:
    """``input_shape`` as (channels, height, width) of positive whole numbers, each side at most MAX_IMAGE_SIDE:
    bounded before the zero image that measures the model is allocated."""
    if (not isinstance(input_shape, (tuple, list)) or len(input_shape) != 3
            or any(isinstance(v, bool) or not isinstance(v, int) for v in input_shape)):
        raise AcdcError(f"input_shape is {repr(input_shape)[:60]}, expected (channels, height, width)")
    channels, height, width = input_shape
    if not 1 <= channels <= 64 or not 1 <= height <= MAX_IMAGE_SIDE or not 1 <= width <= MAX_IMAGE_SIDE:
        raise AcdcError(f"input_shape {tuple(input_shape)} is out of bounds (channels 1..64, height and width "
                        f"1..{MAX_IMAGE_SIDE})")
    return channels, height, width
