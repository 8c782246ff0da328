"""The training recipe beyond the reference's, as timm's train.py offers it: any torch.optim optimizer by name,
gradient clipping, an exponential moving average (EMA) of the weights, and mixup / cutmix with label smoothing.
Gradient accumulation is the loop's (loop.EpochSteps); RandAugment / TrivialAugment are the loaders'
(data/policies.py). Every one of them is off in the presets, which keep the reference's recipe.

The random draws here (mixup's and cutmix's) come from torch's global generator, which the loop seeds per
(seed, epoch, step, rank): a run resumed at any step draws what an uninterrupted one would.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from acdc_cli.engine import ACDC
from acdc_cli.sections import DataSettings, OptimSettings


def named_optimizer(params: Iterable[torch.Tensor], optim: OptimSettings) -> torch.optim.Optimizer:
    """``torch.optim.<optim.optimizer>`` with the run's LR and weight decay and ``optim.optimizer_args`` (lists become
    tuples: betas = [0.9, 0.95] is AdamW's betas=(0.9, 0.95)). The settings checked the name and the keys."""
    kind = getattr(torch.optim, optim.optimizer)
    args = {key: tuple(value) if isinstance(value, list) else value for key, value in optim.optimizer_args.items()}
    return kind(params, lr=optim.lr, weight_decay=optim.weight_decay, **args)


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float) -> torch.utils.hooks.RemovableHandle:
    """Clip the total 2-norm of the gradients to ``max_norm`` just before every optimizer step.

    A step pre-hook registered after the engine's: the gradients it sees are already masked (a pruned weight's
    gradient neither counts in the norm nor takes a share of it) and, under fp16, already unscaled
    (``GradScaler.step`` unscales before it calls ``optimizer.step``)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def clip(_optimizer: torch.optim.Optimizer, _args: object, _kwargs: object) -> None:
        nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

    return optimizer.register_step_pre_hook(clip)


class WeightEma:
    """An exponential moving average of a model: after each optimizer step, every floating tensor of its state dict
    (weights and batch-norm statistics, as timm's ModelEmaV2) moves to ``decay * ema + (1 - decay) * live``; integer
    buffers (batch-norm step counts) are copied. Its masks follow the model's: at every phase start the weights the
    model prunes are zeroed in the EMA too (:meth:`follow_masks`); within a compressed phase they stay exactly zero,
    since the model's own pruned weights are zero after every step and the average of zero and zero is zero."""

    def __init__(self, model: nn.Module, decay: float, engine: ACDC | None = None):
        self.model, self.decay, self.engine = model, decay, engine
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        # the tensors themselves (keep_vars), paired once: in-place updates and ``p.data = ...`` keep them current
        ema, live = self.module.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
        floats = [k for k, t in ema.items() if t.is_floating_point()]
        others = [k for k, t in ema.items() if not t.is_floating_point()]
        self._ema, self._live = [ema[k] for k in floats], [live[k] for k in floats]
        self._ema_ints, self._live_ints = [ema[k] for k in others], [live[k] for k in others]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self._ema, self._live, 1.0 - self.decay)
        if self._ema_ints:
            torch._foreach_copy_(self._ema_ints, self._live_ints)

    @torch.no_grad()
    def follow_masks(self) -> None:
        """Zero the EMA's copies of the weights the model prunes now (none in a dense phase)."""
        if self.engine is None or not self.engine.masks:
            return
        params = dict(self.module.named_parameters())
        names = list(self.engine.masks)
        torch._foreach_mul_([params[n] for n in names], [self.engine.masks[n] for n in names])

    @torch.no_grad()
    def copy_from_model(self) -> None:
        """Start the average at the model's current weights (a new run, or one started from a checkpoint)."""
        self.module.load_state_dict(self.model.state_dict())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)


def draw_mix(images: torch.Tensor, data: DataSettings) -> tuple[torch.Tensor, float | None]:
    """Mixup or cutmix of a batch with itself rolled by one (image i with image i - 1, as torchvision's v2 MixUp and
    CutMix pair them): returns the mixed images and the weight ``lam`` of each image's own label (None: not mixed).

    Mixup: ``lam * x + (1 - lam) * x_rolled`` with lam ~ Beta(mixup_alpha, mixup_alpha). Cutmix: a box of area
    ``(1 - lam)`` centred at a uniform point (clipped at the borders) comes from the rolled image, and lam is then the
    area of the image's own pixels. With both on, each batch uses one of the two with even odds."""
    mixup, cutmix = data.mixup_alpha, data.cutmix_alpha
    if not (mixup or cutmix):
        return images, None
    use_cutmix = cutmix > 0 and (mixup == 0 or bool(torch.rand(()) < 0.5))
    alpha = cutmix if use_cutmix else mixup
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    rolled = images.roll(1, 0)
    if not use_cutmix:
        return images * lam + rolled * (1.0 - lam), lam
    height, width = images.shape[-2:]
    cx, cy = int(torch.randint(width, ())), int(torch.randint(height, ()))
    half = 0.5 * math.sqrt(1.0 - lam)
    half_w, half_h = int(half * width), int(half * height)
    x1, x2 = max(cx - half_w, 0), min(cx + half_w, width)
    y1, y2 = max(cy - half_h, 0), min(cy + half_h, height)
    mixed = images.clone()
    mixed[..., y1:y2, x1:x2] = rolled[..., y1:y2, x1:x2]
    return mixed, 1.0 - (x2 - x1) * (y2 - y1) / (width * height)


def mixed_targets(labels: torch.Tensor, lam: float, num_classes: int) -> torch.Tensor:
    """The soft targets of a mixed batch: ``lam * one_hot(y) + (1 - lam) * one_hot(y_rolled)``."""
    own = F.one_hot(labels, num_classes).float()
    return own * lam + own.roll(1, 0) * (1.0 - lam)


def recipe_loss(logits: torch.Tensor, labels: torch.Tensor, lam: float | None, smoothing: float) -> torch.Tensor:
    """Cross-entropy with label smoothing ``smoothing`` (targets ``(1 - s) * one_hot + s / classes``), against the
    mixed targets when the batch was mixed (smoothing applies to them the same way)."""
    if lam is None:
        return F.cross_entropy(logits, labels, label_smoothing=smoothing)
    return F.cross_entropy(logits, mixed_targets(labels, lam, logits.shape[1]), label_smoothing=smoothing)
