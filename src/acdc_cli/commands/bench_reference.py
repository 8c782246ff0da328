"""The AC/DC reference code's training step (IST-DASLab/ACDC), rebuilt as ``acdc bench``'s baseline.

What the reference does per step in a compressed phase, element by element (file names are the reference's):

- ``utils/masking_utils.py``: ``get_wrapped_model`` wraps *every* Conv2d and Linear in a ``WrappedLayer`` whose
  ``forward`` re-masks the weight (``weight.data *= weight_mask``; and the bias, where its mask is still the all-ones
  buffer of a layer no pruner owns) before the layer's own forward, and registers a gradient hook
  ``grad.mul(weight_mask)`` on every weight (all-ones masks for the layers left dense);
- ``policies/trainers.py``: ``zero_grad()``, a forward in fp32 (no autocast unless fp16 was asked for), the loss
  summed onto ``0.``, the training accuracy read with ``.item()`` (host sync one), ``loss.backward()`` and the step of
  ``optimization/sgd.py``: a Python loop over the parameters, one tensor at a time;
- ``policies/manager.py``: the regularizers' sum (none: ``0.``) added to the loss, ``loss.item()`` for the epoch loss
  (host sync two), then ``Pruner.after_parameter_optimization``: the pruned layers' weights re-masked again; on CUDA
  the model runs inside ``nn.DataParallel`` over one GPU, with cudnn autotuning at PyTorch's default (off).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from acdc_cli.config import Settings

ELEMENTS = (
    "fp32, NCHW, eager",
    "every Conv2d/Linear weight re-masked before its forward (WrappedLayer)",
    "gradient-mask hook on every Conv2d/Linear weight",
    "per-tensor SGD (a Python loop over the parameters)",
    "pruned weights re-masked after the step",
    "two host syncs per step (train accuracy .item(), loss .item())",
)

CUDA_ELEMENTS = ("nn.DataParallel over one GPU, cudnn autotuning off",)


def elements(device: torch.device) -> list[str]:
    """The reference step's elements that ``acdc bench`` reproduces on ``device``, for its output."""
    return list(ELEMENTS + (CUDA_ELEMENTS if device.type == "cuda" else ()))


class ReferenceSGD(torch.optim.Optimizer):
    """The reference's SGD (``optimization/sgd.py``): PyTorch's SGD of its day, one parameter at a time."""

    def __init__(self, params, lr: float, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            weight_decay, momentum = group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad
                if weight_decay != 0:
                    d_p = d_p.add(p, alpha=weight_decay)
                if momentum != 0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        buf = state["momentum_buffer"] = torch.clone(d_p).detach()
                    else:
                        buf = state["momentum_buffer"]
                        buf.mul_(momentum).add_(d_p, alpha=1 - group["dampening"])
                    d_p = d_p.add(buf, alpha=momentum) if group["nesterov"] else buf
                p.add_(d_p, alpha=-group["lr"])
        return None


class ReferenceStep:
    """One training step of the reference on ``model`` with its weights masked by ``masks`` (bool, by parameter
    name; the layers without one stay dense, with the all-ones masks the reference gives them)."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor], settings: Settings, device: torch.device):
        self.model = model
        self.pruned: list[tuple[torch.Tensor, torch.Tensor]] = []
        for name, module in model.named_modules():
            if not isinstance(module, (nn.Conv2d, nn.Linear)):
                continue
            key = f"{name}.weight" if name else "weight"
            selected = key in masks
            weight_mask = masks[key].to(module.weight.dtype) if selected else torch.ones_like(module.weight)
            # a pruner sets the bias mask of its layers to None; the others keep their all-ones buffer
            bias_mask = None if selected or module.bias is None else torch.ones_like(module.bias)
            module.register_forward_pre_hook(
                lambda m, args, weight_mask=weight_mask, bias_mask=bias_mask: _remask(m, weight_mask, bias_mask))
            module.weight.register_hook(lambda grad, mask=weight_mask: grad.mul(mask))
            if selected:
                self.pruned.append((module.weight, weight_mask))
        self.net = nn.DataParallel(model, device_ids=[device.index or 0]) if device.type == "cuda" else model
        o = settings.optim
        self.optimizer = ReferenceSGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                                      nesterov=o.nesterov and o.momentum > 0)
        self.epoch_loss = 0.0
        self.correct = 0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.model.train()
        self.optimizer.zero_grad()
        output = self.net(images)
        loss = 0.0
        loss += F.cross_entropy(output, labels)
        pred = output.argmax(dim=1, keepdim=True)
        self.correct += pred.eq(labels.view_as(pred)).sum().item()
        loss = torch.sum(loss)
        loss = loss + 0.0  # the regularizers' sum: none are configured
        self.epoch_loss += loss.item() * images.shape[0]
        loss.backward()
        self.optimizer.step()
        for weight, mask in self.pruned:
            weight.data *= mask


def _remask(module: nn.Module, weight_mask: torch.Tensor, bias_mask: torch.Tensor | None) -> None:
    if bias_mask is not None:
        module.bias.data *= bias_mask
    module.weight.data *= weight_mask
