"""The AC/DC engine: one object that drives a model's masks through a phase plan from inside any training loop.

A user's loop gains two lines, the construction and ``start_epoch``; ``acdc train`` drives its own loop through the
same object::

    acdc = ACDC(model, optimizer, epochs=100, sparsity=0.9)
    for epoch in range(100):
        phase = acdc.start_epoch(epoch)   # at a phase boundary: prune or restore, and reset momentum per the policy
        for x, y in loader:
            ...; optimizer.step()         # step hooks zero pruned gradients before and pruned weights after

FLOPs as the paper counts them are optional: ``acdc.count_flops((3, 32, 32))`` once, ``acdc.end_epoch(images)`` after
each epoch, and ``acdc.metrics()`` carries the inference and cumulative training cost beside the sparsity.

The masking runs in ``optimizer.register_step_pre_hook`` / ``register_step_post_hook``, so it holds for any
``torch.optim`` optimizer, under a ``GradScaler`` (a skipped step changes nothing: an unfused optimizer's step is not
called, a fused one is called with ``found_inf`` and updates nothing), and for DistributedDataParallel or
``torch.compile`` wrappers (the engine works on the module inside them, whose names checkpoints keep).

After backward the pre-hook masks the gradients in one multi-tensor pass (and, the first step after the masks
changed or the optimizer's state was loaded, the pruned weights' momentum buffers and the weights). For
``torch.optim.SGD`` that is all: the step then leaves every pruned weight exactly at zero (see
:func:`step_keeps_zeros`), so acdc's own ``SGD(fused=True)`` step is two passes over the weights instead of three.
It is not bit-identical to the unfused path (gradient mask, foreach SGD, weight mask): from the same state one fused
step leaves every weight within 1 ulp and every momentum value within 2 ulps of it (the fused kernel rounds once where
foreach rounds each operation), pruned weights exactly zero in both (tests/engine/test_fused_step.py).
Any other optimizer also gets the post-hook, which re-masks the weights after its step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import torch
from pydantic import ValidationError
from torch import nn

from acdc_cli.config import Settings, format_validation_error, merge_layer, preset_path, read_toml
from acdc_cli.errors import AcdcError
from acdc_cli.files.checkpoint import STATE_FORMAT, Checkpoint, host_copy, save_checkpoint
from acdc_cli.files.jsonio import FORMAT_VERSION, check_format_version
from acdc_cli.flops import (
    InferenceFlops,
    TrainingFlops,
    check_input_shape,
    inference_flops,
    output_positions,
)
from acdc_cli.models import create, lookup
from acdc_cli.models.registry import check_fit
from acdc_cli.sections import DataSettings
from acdc_cli.sparsity.rules import LayerRule
from acdc_cli.sparsity.schedule import Phase, momentum_resets, phase_at, plan
from acdc_cli.sparsity.sparsifier import Sparsifier, check_masks, shown

ResetPolicy = Literal["restore", "every", "never"]

# the constructor's keywords and the settings they set (from_preset takes the same ones as overrides)
_KEYWORDS: dict[str, tuple[str, str]] = {
    "epochs": ("schedule", "epochs"),
    "sparsity": ("sparsity", "target"),
    "warmup_epochs": ("schedule", "warmup_epochs"),
    "compressed_epochs": ("schedule", "compressed_epochs"),
    "decompressed_epochs": ("schedule", "decompressed_epochs"),
    "final_decompressed_epochs": ("schedule", "final_decompressed_epochs"),
    "final_compressed_epochs": ("schedule", "final_compressed_epochs"),
    "structure": ("sparsity", "structure"),
    "scope": ("sparsity", "scope"),
    "include": ("sparsity", "include"),
    "exclude": ("sparsity", "exclude"),
    "reset_momentum": ("schedule", "reset_momentum"),
}

# optimizer state that carries momentum: SGD's and RMSprop's momentum buffers; the Adam family's moment estimates
_MOMENT_BUFFERS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_inf")


class ACDC:
    """AC/DC for a model and its optimizer: dense warm-up, alternating compressed / decompressed phases, an optional
    final dense phase, then the final compressed phase (Peste et al., NeurIPS 2021).

    Args:
        model: the model, plain or wrapped in DistributedDataParallel / ``torch.compile``.
        optimizer: any ``torch.optim`` optimizer over the model's parameters.
        epochs: length of the run; ``start_epoch`` takes ``0 .. epochs - 1``.
        sparsity: fraction of the selected weights pruned in compressed phases (N:M structures imply 1 - N/M).
        warmup_epochs: dense epochs before the first compressed phase.
        compressed_epochs / decompressed_epochs: length of each compressed / decompressed phase of the alternation.
        final_decompressed_epochs: a dense phase before the final compressed one (0: none).
        final_compressed_epochs: length of the final compressed phase.
        structure: ``"unstructured"`` or N:M such as ``"2:4"`` (N kept of every M consecutive input channels).
        scope: ``"global"`` (one magnitude threshold over all selected weights) or ``"uniform"`` (per layer).
        include / exclude: glob patterns over module names; the weights of the Conv2d and Linear modules they
            select are pruned.
        reset_momentum: when the optimizer's momentum (for Adam-type optimizers: the moment estimates and the
            step count of the bias correction) is zeroed: ``"restore"`` at the start of each decompressed phase
            that follows a compressed one (the reference), ``"every"`` at every phase change, ``"never"``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        epochs: int,
        sparsity: float = 0.9,
        warmup_epochs: int = 10,
        compressed_epochs: int = 5,
        decompressed_epochs: int = 5,
        final_decompressed_epochs: int = 0,
        final_compressed_epochs: int = 15,
        structure: str = "unstructured",
        scope: Literal["global", "uniform"] = "global",
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
        reset_momentum: ResetPolicy = "restore",
    ) -> None:
        values = {
            "epochs": epochs, "sparsity": sparsity, "warmup_epochs": warmup_epochs,
            "compressed_epochs": compressed_epochs, "decompressed_epochs": decompressed_epochs,
            "final_decompressed_epochs": final_decompressed_epochs, "final_compressed_epochs": final_compressed_epochs,
            "structure": structure, "scope": scope, "include": include, "exclude": exclude,
            "reset_momentum": reset_momentum,
        }
        self._setup(model, optimizer, _settings({"schedule": {"method": "acdc"}}, values))

    @classmethod
    def from_preset(cls, preset: str, model: nn.Module, optimizer: torch.optim.Optimizer, **overrides: Any) -> ACDC:
        """The schedule and sparsity rules of a preset (``acdc presets`` lists them; its optimizer, learning rate
        and data settings are the loop's own business), with the constructor's keywords as overrides."""
        unknown = sorted(set(overrides) - set(_KEYWORDS))
        if unknown:
            raise TypeError(f"ACDC.from_preset() got an unexpected keyword argument '{unknown[0]}'")
        base = read_toml(preset_path(preset))
        base["preset"] = preset
        return cls.from_settings(_settings(base, overrides), model, optimizer)

    @classmethod
    def from_settings(cls, settings: Settings, model: nn.Module, optimizer: torch.optim.Optimizer) -> ACDC:
        """The engine for resolved acdc settings (any ``schedule.method``: acdc, gmp or dense); ``acdc train``'s way
        in."""
        engine = cls.__new__(cls)
        engine._setup(model, optimizer, settings)
        return engine

    def _setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, settings: Settings) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.settings = settings
        self.model = unwrap(model)
        self.optimizer = optimizer
        sp = settings.sparsity
        self.sparsifier = Sparsifier(self.model, sp.include, sp.exclude, sp.scope, sp.structure)
        optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not any(id(p) in optimized for p in self.sparsifier.params.values()):
            raise AcdcError("the optimizer updates none of the weights the sparsity rules select; build the ACDC "
                            "engine with the optimizer of this model")
        self._plan = tuple(plan(settings))
        self._resets = momentum_resets(list(self._plan), settings.schedule.reset_momentum)
        self._phase: Phase | None = None
        self._epoch: int | None = None
        self._held: dict[str, torch.Tensor] | None = None
        # fraction of the selected weights whose kept/pruned state flipped when the current compressed phase began,
        # against the previous compressed phase's masks; None in dense phases and at the first compressed one
        self.mask_change: float | None = None
        # the sparsifier's mask version whose masks the optimizer's momentum buffers hold; None: not known to hold
        # any (masks changed, or the optimizer's state was replaced since)
        self._masked_version: int | None = None
        self._positions: dict[str, int] | None = None  # output positions per counted layer, once count_flops ran
        # the training cost of the epochs passed to end_epoch
        self._train_flops = TrainingFlops()
        # whether the optimizer's step leaves pruned weights at zero by itself (step_keeps_zeros): checked at each
        # start_epoch and optimizer state load, not at every step; False (re-mask after the step) until then
        self._step_keeps_zeros = False
        self._hooks = [optimizer.register_step_pre_hook(self._before_step),
                       optimizer.register_step_post_hook(self._after_step),
                       optimizer.register_load_state_dict_post_hook(self._after_optimizer_load)]

    # ------------------------------------------------------------------------------------------------------------
    # the loop's calls

    def start_epoch(self, epoch: int) -> Phase:
        """Call at the start of every epoch. At a phase boundary (or on the first call, wherever it is) this prunes
        to the phase's sparsity (a compressed phase: masks recomputed from the current magnitudes, pruned weights
        set to zero) or restores (a dense phase: every weight trains again, pruned ones from zero), then zeroes
        momentum as ``reset_momentum`` says. Returns the epoch's phase (``kind``, ``sparsity``, ``start``,
        ``end``)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            raise TypeError(f"epoch must be an int, got {type(epoch).__name__}")
        if not 0 <= epoch < self._plan[-1].end:
            raise ValueError(f"epoch {epoch} is outside the plan (epochs 0 to {self._plan[-1].end - 1})")
        phase = phase_at(list(self._plan), epoch)
        if phase != self._phase:
            self._enter(phase, reset=epoch == phase.start and epoch in self._resets)
        self._epoch = epoch
        self._step_keeps_zeros = step_keeps_zeros(self.optimizer)
        return phase

    def _enter(self, phase: Phase, reset: bool) -> None:
        held, self._held = self._held, None
        self.mask_change = None
        if phase.kind == "sparse":
            if held is not None:
                self.sparsifier.set_masks(held)
            else:
                self.mask_change = self.sparsifier.compress(phase.sparsity)
        else:
            self.sparsifier.decompress()
        if reset:
            reset_momentum(self.optimizer)
        self._mask_state()
        self._phase = phase

    def _mask_state(self) -> None:
        """Pruned weights and their momentum to zero, once per mask change (or optimizer state load)."""
        self.sparsifier.apply_to_momentum(self.optimizer)
        self.sparsifier.apply_to_weights()
        self._masked_version = self.sparsifier.version

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # masks set on the sparsifier directly, or an optimizer state loaded, since the last step
        if self._masked_version != self.sparsifier.version:
            self._mask_state()
        self.sparsifier.apply_to_grads()  # neither momentum nor Adam's moments see a pruned weight's gradient

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._step_keeps_zeros:
            self.sparsifier.apply_to_weights()  # weight decay and momentum cannot move a pruned weight off zero

    def _after_optimizer_load(self, optimizer: torch.optim.Optimizer) -> None:
        self._masked_version = None  # its momentum buffers come from elsewhere: mask them before the next step
        self._step_keeps_zeros = step_keeps_zeros(optimizer)  # and its hyperparameters too

    def use_masks(self, masks: Mapping[str, torch.Tensor], epoch: int) -> bool:
        """Let ``start_epoch(epoch)`` enter its compressed phase with ``masks`` (say, from ``acdc prune``) instead of
        computing its own. Returns False, and changes nothing, when that epoch is dense or the masks are not what
        these rules would hold at its sparsity (other layers, other counts, not N of every M)."""
        phase = phase_at(list(self._plan), epoch)
        if phase.kind != "sparse" or not self.sparsifier.masks_fit(dict(masks), phase.sparsity):
            return False
        self._held = dict(masks)
        return True

    def count_flops(self, input_shape: tuple[int, ...]) -> None:
        """Count FLOPs from now on, for images of ``input_shape`` (channels, height, width): one forward pass of a
        zero image, in eval mode without gradients, finds each conv and linear layer's output positions.
        :meth:`metrics` then reports ``inference_flops`` and, with :meth:`end_epoch`, ``train_flops``."""
        shape = check_input_shape(input_shape)
        try:
            self._positions = output_positions(self.model, shape)
        except RuntimeError as exc:  # too small for the model's pooling, or channels it does not take
            detail = str(exc).splitlines()[0][:160] if str(exc) else exc.__class__.__name__
            raise AcdcError(f"the model does not take images of shape {shape}: {detail}") from None

    def end_epoch(self, images: int) -> None:
        """Add an epoch that trained ``images`` images (all ranks together) to the training FLOPs, at the cost of
        the model as it is now: dense in a dense phase, with its zeros skipped in a compressed one (as the
        reference counts after every epoch). Needs :meth:`count_flops`."""
        if self._positions is None:
            raise RuntimeError("call count_flops(input_shape) before end_epoch")
        if self._phase is None:
            raise RuntimeError("end_epoch before any start_epoch")
        if isinstance(images, bool) or not isinstance(images, int) or images < 0:
            raise AcdcError(f"end_epoch(images): images is {images!r}, expected a whole number >= 0")
        self._train_flops = self._train_flops.add_epoch(self._phase.kind, self.flops(), images)

    def flops(self) -> InferenceFlops:
        """Multiply-accumulates per image of the model as it is now, dense and with its zeros skipped. Needs
        :meth:`count_flops`."""
        if self._positions is None:
            raise RuntimeError("call count_flops(input_shape) before flops")
        return inference_flops(self.model, self._positions)

    @property
    def train_flops(self) -> TrainingFlops:
        """The training cost of the epochs passed to :meth:`end_epoch` (``flops``, ``dense_flops``, ``ratio``)."""
        return self._train_flops

    def remove_hooks(self) -> None:
        """Detach the engine from the optimizer: its steps no longer mask anything."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # ------------------------------------------------------------------------------------------------------------
    # what the loop can read

    @property
    def plan(self) -> tuple[Phase, ...]:
        """Every phase of the run in order, each with ``start`` (first epoch), ``end`` (exclusive), ``kind``
        ("dense" / "sparse") and ``sparsity``."""
        return self._plan

    @property
    def prunable(self) -> Mapping[str, nn.Parameter]:
        """The weights the sparsity rules select, by name (read-only): what the masks cover and sparsity counts."""
        return MappingProxyType(self.sparsifier.params)

    @property
    def rules(self) -> tuple[LayerRule, ...]:
        """What the sparsity rules decided for every Conv2d / Linear weight: ``module``, ``param``, ``selected`` and
        the ``reason`` (why a layer is left dense)."""
        return tuple(self.sparsifier.rules)

    @property
    def phase(self) -> Phase | None:
        """The phase of the last ``start_epoch`` (None before the first)."""
        return self._phase

    @property
    def masks(self) -> Mapping[str, torch.Tensor]:
        """Read-only: weight name -> boolean mask (True = kept), empty in dense phases. Do not modify the tensors."""
        return MappingProxyType(self.sparsifier.masks or {})

    def sparsity(self) -> float:
        """Zeros among the selected weights now, as a fraction."""
        return float(self.sparsifier.stats()["sparsity"])

    def layer_sparsity(self) -> dict[str, float]:
        """Zeros per selected weight, as fractions."""
        return dict(self.sparsifier.stats()["per_layer"])

    def metrics(self) -> dict[str, Any]:
        """The engine's share of an epoch's metrics row: phase, target and measured sparsity, mask change; once
        :meth:`count_flops` ran also ``inference_flops`` (per image, the model as it is now), ``inference_flops_ratio``
        (to the dense model), ``train_flops`` (the epochs so far) and ``train_flops_ratio`` (to the same epochs
        dense)."""
        phase = self._phase
        sparse = phase is not None and phase.kind == "sparse"
        row = {
            "phase": phase.kind if phase is not None else None,
            "target_sparsity": phase.sparsity if phase is not None else None,
            "sparsity": self.sparsity(),
            "mask_change": self.mask_change if sparse else None,
        }
        if self._positions is not None:
            now, run = self.flops(), self._train_flops
            row.update(inference_flops=now.sparse, inference_flops_ratio=now.ratio, train_flops=run.flops,
                       train_flops_ratio=run.ratio)
        return row

    # ------------------------------------------------------------------------------------------------------------
    # state for the user's own checkpoints, and acdc checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything ``load_state_dict`` needs to continue the plan where it stopped: the current phase and
        epoch, the masks and the previous compressed phase's masks, the training FLOPs so far. Tensors and plain data
        only (``torch.save`` / ``torch.load(weights_only=True)``); the tensors are the live ones, as in
        ``nn.Module.state_dict``."""
        return {
            "format": STATE_FORMAT,
            "format_version": FORMAT_VERSION,
            "epoch": self._epoch,
            "phase": self._phase.as_dict() if self._phase is not None else None,
            "masks": dict(self.sparsifier.masks) if self.sparsifier.masks is not None else None,
            "previous_masks": dict(self.sparsifier.previous) if self.sparsifier.previous is not None else None,
            "mask_change": self.mask_change,
            "train_flops": {"flops": self._train_flops.flops, "dense_flops": self._train_flops.dense_flops},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output: the masks are applied to the weights and the next
        ``start_epoch`` of the same phase changes nothing. A state from another plan is an AcdcError."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise AcdcError("not an ACDC engine state (expected the output of ACDC.state_dict())")
        check_format_version(state.get("format_version"), "the engine state")
        # everything is checked before anything is set: a refused state leaves the engine as it was
        phase = state.get("phase")
        current = None
        if phase is not None:
            try:
                current = Phase(**phase) if isinstance(phase, Mapping) else None
            except TypeError:
                current = None
            if current not in self._plan:
                raise AcdcError(f"the engine state is at phase {shown(phase)}, which is not in this plan")
        epoch = state.get("epoch")
        if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)
                                  or not 0 <= epoch < self._plan[-1].end):
            raise AcdcError(f"the engine state's epoch is {shown(epoch)}, expected none or an epoch of this plan "
                            f"(0 to {self._plan[-1].end - 1})")
        change = state.get("mask_change")
        if change is not None and (isinstance(change, bool) or not isinstance(change, (int, float))
                                   or not 0 <= change <= 1):
            raise AcdcError(f"the engine state's mask_change is {shown(change)}, expected none or a fraction 0..1")
        masks, previous = state.get("masks"), state.get("previous_masks")
        if (current is not None and current.kind == "sparse") != (masks is not None):
            raise AcdcError("the engine state's masks do not match its phase")
        params = self.sparsifier.params
        masks = check_masks(masks, params, "the engine state's masks") if masks is not None else None
        previous = check_masks(previous, params, "the engine state's previous_masks") if previous is not None else None
        flops = _training_flops(state.get("train_flops"))
        self.sparsifier.set_masks(masks)
        self.sparsifier.previous = previous
        self._phase, self._epoch, self._held = current, epoch, None
        self.mask_change = float(change) if change is not None else None
        self._train_flops = flops

    def save(self, path: str | Path, *, arch: str, data: str | Mapping[str, Any] | None = None,
             model_kwargs: Mapping[str, Any] | None = None, metrics: Mapping[str, Any] | None = None) -> Path:
        """Write the model as an acdc checkpoint (weights, masks, metadata) that ``acdc eval / prune / export /
        inspect`` and ``acdc train --from`` read like one of their own.

        Args:
            arch: the model's acdc name, which rebuilds it: ``"torchvision:resnet18"``, ``"timm:<name>"`` or a
                built-in name.
            data: the dataset, as acdc data settings (``"cifar10"`` or ``{"name": "cifar10", "dir": ...}``), so
                that ``acdc eval`` can rebuild it; without it, eval has nothing to evaluate on.
            model_kwargs: the constructor arguments (default: ``num_classes`` and ``in_channels`` read from the
                model's last Linear and first Conv2d); checked by building the model on the meta device.
            metrics: numbers to record beside the weights (shown by ``acdc inspect``).
        Returns the path written.
        """
        path = Path(path)
        if path.exists() and not path.is_file():
            raise AcdcError(f"cannot save to {path}: it exists and is not a regular file")
        weights = dict(self.model.state_dict())
        for name, tensor in weights.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise AcdcError(f"cannot save: {name} holds non-finite values (inf or NaN); the model has diverged")
        kwargs = dict(model_kwargs) if model_kwargs is not None else self._model_kwargs(arch)
        with torch.device("meta"):
            built = create(arch, **kwargs)
        hint = "; pass model_kwargs={'num_classes': N, ...} to name the constructor arguments"
        try:
            check_fit(built.state_dict(), weights, f"the model saved as {arch} {kwargs}")
        except AcdcError as exc:
            raise AcdcError(f"{exc}{hint}") from None
        config = self.settings.model_dump(mode="json")
        config["model"] = {**config["model"], "name": arch}
        config.pop("data")
        if data is not None:
            try:
                chosen = DataSettings(**({"name": data} if isinstance(data, str) else dict(data)))
            except ValidationError as exc:
                raise AcdcError(format_validation_error(exc).replace("setting ", "setting data.", 1)) from None
            config["data"] = chosen.model_dump(mode="json")
        phase = self._phase
        ckpt = Checkpoint(
            weights=host_copy(weights),
            masks=host_copy(dict(self.sparsifier.masks or {})),
            arch=arch,
            model_kwargs=kwargs,
            config=config,
            epoch=self._epoch + 1 if self._epoch is not None else 0,
            phase=phase.kind if phase is not None else "dense",
            metrics=dict(metrics or {}),
            extra={"kind": "api", "preset": self.settings.preset},
        )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AcdcError(f"cannot save to {path}: {exc.strerror or exc.__class__.__name__}") from None
        save_checkpoint(path, ckpt)
        return path

    def _model_kwargs(self, arch: str) -> dict[str, Any]:
        entry, _ = lookup(arch)
        convs = [m for m in self.model.modules() if isinstance(m, nn.Conv2d)]
        linears = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
        if linears:
            num_classes = linears[-1].out_features
        elif convs:
            num_classes = convs[-1].out_channels
        else:
            raise AcdcError(f"cannot tell the number of classes of this {arch}: pass model_kwargs={{'num_classes': N}}")
        return {"num_classes": num_classes, "in_channels": convs[0].in_channels if convs else entry.in_channels}


def _training_flops(saved: Any) -> TrainingFlops:
    """The training FLOPs of a state."""
    if not isinstance(saved, Mapping) or not all(type(saved.get(k)) is int and saved[k] >= 0
                                                  for k in ("flops", "dense_flops")):
        raise AcdcError("the engine state's train_flops is malformed (expected non-negative integers flops and "
                        "dense_flops)")
    return TrainingFlops(saved["flops"], saved["dense_flops"])


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel and ``torch.compile`` wrappers (any nesting)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


_SGD_HYPERPARAMETERS = ("lr", "momentum", "dampening", "weight_decay")


def step_keeps_zeros(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` provably leaves a weight that is exactly zero, with a zero gradient and a zero
    momentum buffer (or none yet), exactly zero; the engine then skips re-masking the weights after the step.

    True for ``torch.optim.SGD`` itself (foreach, fused or per-tensor, any momentum, dampening, Nesterov, maximize)
    while its hyperparameters are finite Python numbers: its update is ``w -= lr * d`` with ``d = g + wd * w`` and,
    with momentum, ``b = momentum * b + (1 - dampening) * d`` (``d + momentum * b`` for Nesterov). With ``g``, ``w``
    and ``b`` all zero every term is a finite number times zero, so ``w`` stays zero (perhaps as -0.0, which every
    kernel multiplies and adds like +0.0 and checkpoints store as +0.0). A subclass may change the update, a tensor
    hyperparameter could not be checked without a device sync, and the Adam family divides by a second-moment
    estimate and decays weights by its own rule: all of those keep the post-step mask."""
    if type(optimizer) is not torch.optim.SGD:
        return False
    for group in optimizer.param_groups:
        for key in _SGD_HYPERPARAMETERS:
            value = group.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return False
    return True


def reset_momentum(optimizer: torch.optim.Optimizer) -> int:
    """Zero the momentum of every parameter in place; returns how many parameters had some.

    SGD's and RMSprop's ``momentum_buffer`` are zeroed. The Adam family's moment estimates (``exp_avg``,
    ``exp_avg_sq``, ``max_exp_avg_sq``, Adamax's ``exp_inf``) are zeroed and its step count restarts (NAdam's
    ``mu_product`` too), so that the bias correction treats the next step as a first one, as a fresh optimizer
    would: zeroed moments with an old step count would make the next updates several times too large. Second
    moments without a bias correction (RMSprop's ``square_avg``, Adagrad's ``sum``) are scale estimates, not
    momentum, and are kept.

    Assigning ``optimizer.state = {}`` or resetting a copy does nothing on current PyTorch; the buffers live in
    ``optimizer.state[param]`` and must be zeroed where they are.
    """
    count = 0
    for state in optimizer.state.values():
        buffers = [state[key] for key in _MOMENT_BUFFERS if isinstance(state.get(key), torch.Tensor)]
        if not buffers:
            continue
        for buffer in buffers:
            buffer.zero_()
        if "exp_avg" in state:
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                step.zero_()
            elif step is not None:
                state["step"] = 0
            if isinstance(state.get("mu_product"), torch.Tensor):
                state["mu_product"].fill_(1.0)
        count += 1
    return count


def _settings(base: dict[str, Any], values: Mapping[str, Any]) -> Settings:
    """``base`` (a preset's TOML, or nothing) with the engine's keywords set; a bad value is a one-line AcdcError
    that names the keyword."""
    keywords: dict[str, Any] = {}
    for keyword, value in values.items():
        section, key = _KEYWORDS[keyword]
        if isinstance(value, (tuple, list)):
            value = list(value)
        keywords.setdefault(section, {})[key] = value
    try:
        # a layer over the preset: structure="2:4" replaces the preset's unstructured target, as --set does
        return Settings(**merge_layer(base, keywords))
    except ValidationError as exc:
        message = format_validation_error(exc)
        for keyword, (section, key) in _KEYWORDS.items():
            message = message.replace(f"{section}.{key}", keyword)
        raise AcdcError(message) from None
