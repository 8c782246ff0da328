"""The object that owns a model's masks: compute masks over the layers the rules (rules.py) select, keep pruned
weights at zero, restore."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from acdc_cli.errors import AcdcError
from acdc_cli.sparsity import masks as M
from acdc_cli.sparsity.rules import parse_nm, select_layers


class Sparsifier:
    """Owns one boolean mask per selected weight.

    ``masks`` is ``None`` in a dense (decompressed) phase. In a compressed phase pruned weights are zero, and the
    engine's optimizer hooks keep them there (engine.py): gradients masked before every step, momentum buffers
    masked when the masks change, weights re-masked after the step unless the optimizer provably leaves a zero
    weight with zero gradient and zero momentum at zero.
    """

    def __init__(self, model: nn.Module, include: list[str], exclude: list[str], scope: str, structure: str):
        self.model = model
        self.scope = scope
        self.nm = parse_nm(structure)
        self.rules = select_layers(model, include, exclude, self.nm)
        params = dict(model.named_parameters())
        self.params: dict[str, nn.Parameter] = {r.param: params[r.param] for r in self.rules if r.selected}
        self._weights = list(self.params.values())  # in the factors' order, for the per-step multi-tensor calls
        self.masks: dict[str, torch.Tensor] | None = None
        # the masks as multipliers in each weight's dtype and memory format (channels_last on CUDA): the foreach
        # kernels take their fast multi-tensor path only when both lists match
        self._factors: list[torch.Tensor] | None = None
        # the mask of the previous compressed phase, kept through dense phases to measure mask change
        self.previous: dict[str, torch.Tensor] | None = None
        # counts mask changes, so that the engine can tell whether the optimizer state was masked since the last one
        self.version = 0

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params.values())

    @torch.no_grad()
    def compress(self, sparsity: float) -> float | None:
        """Recompute masks from current magnitudes and zero the pruned weights. Returns the mask change."""
        if self.masks is not None:
            self.previous = self.masks
        new = M.compute_masks(dict(self.params), sparsity, self.scope, self.nm)
        change = self.mask_change(self.previous, new)
        self._hold(new)
        self.previous = None
        self.apply_to_weights()
        return change

    def _hold(self, masks: dict[str, torch.Tensor] | None) -> None:
        self.masks = masks
        self._factors = None
        self.version += 1
        if masks is not None:
            self._factors = [torch.empty_like(p).copy_(masks[n]) for n, p in self.params.items()]

    @torch.no_grad()
    def decompress(self) -> None:
        """All-ones masks: pruned weights restart from their current value, zero."""
        if self.masks is not None:
            self.previous = self.masks
            # masking leaves -0.0 where negative weights were pruned; checkpoints store +0.0. Restart every run
            # from +0.0 so that a run resumed from a checkpoint stays bit-identical to one that never stopped
            torch._foreach_add_([p.data for p in self.params.values()], 0.0)
        self._hold(None)

    def set_masks(self, masks: dict[str, torch.Tensor] | None) -> None:
        if masks is None:
            self._hold(None)
            return
        missing = set(self.params) - set(masks)
        if missing:
            raise AcdcError(f"checkpoint lacks masks for {sorted(missing)[0]}")
        self._hold({n: masks[n].to(device=p.device, dtype=torch.bool) for n, p in self.params.items()})
        self.apply_to_weights()

    def masks_fit(self, masks: dict[str, torch.Tensor], sparsity: float) -> bool:
        """Whether ``masks`` (e.g. from ``acdc prune``) are what this sparsifier's rules would hold at ``sparsity``:
        the same layers, and exact counts (global / per layer) or exactly N of every M."""
        if set(masks) != set(self.params) or any(masks[n].shape != p.shape for n, p in self.params.items()):
            return False
        kept = {n: masks[n].bool() for n in self.params}
        if self.nm is not None:
            n_keep, m = self.nm
            return all(bool((M.to_groups_layout(k).reshape(-1, m).sum(1) == n_keep).all()) for k in kept.values())
        if self.scope == "uniform":
            return all(int((~k).sum()) == M.pruned_count(k.numel(), sparsity) for k in kept.values())
        return sum(int((~k).sum()) for k in kept.values()) == M.pruned_count(self.numel, sparsity)

    @torch.no_grad()
    def apply_to_weights(self) -> None:
        if self._factors is None:
            return
        torch._foreach_mul_([p.data for p in self._weights], self._factors)

    @torch.no_grad()
    def apply_to_grads(self) -> None:
        if self._factors is None:
            return
        # zero_grad(set_to_none=True) gives new gradient tensors every step: one list of them, and the kept list of
        # factors as it is unless a weight got no gradient this step
        grads = [p.grad for p in self._weights]
        if all(g is not None for g in grads):
            torch._foreach_mul_(grads, self._factors)
            return
        pairs = [(g, f) for g, f in zip(grads, self._factors) if g is not None]
        if pairs:
            torch._foreach_mul_([g for g, _ in pairs], [f for _, f in pairs])

    @torch.no_grad()
    def apply_to_momentum(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero the momentum buffers (SGD's and RMSprop's ``momentum_buffer``) of the pruned weights. The Adam
        family's moment estimates are left alone: zeroing a second moment under an old bias-correction step count
        would make the weight's first updates after a restore several times too large."""
        if self._factors is None:
            return
        pairs = [(state["momentum_buffer"], f) for p, f in zip(self.params.values(), self._factors)
                 if isinstance((state := optimizer.state.get(p, {})).get("momentum_buffer"), torch.Tensor)]
        if pairs:
            torch._foreach_mul_([b for b, _ in pairs], [f for _, f in pairs])

    @staticmethod
    def mask_change(old: dict[str, torch.Tensor] | None, new: dict[str, torch.Tensor]) -> float | None:
        """Fraction of selected weights whose kept/pruned state differs between two masks."""
        if old is None:
            return None
        flipped = sum(int((old[n] != new[n]).sum()) for n in new)
        total = sum(m.numel() for m in new.values())
        return flipped / total

    def stats(self) -> dict[str, object]:
        """Overall and per-layer sparsity (zeros in the weights) over the selected weights."""
        params = list(self.params.items())
        # every layer's count on its device, then one read (a per-layer int() waited for the device once per layer);
        # count_nonzero is one kernel where (p == 0).sum() is two and a temporary
        nonzero = torch.stack([torch.count_nonzero(p.detach()) for _, p in params]).tolist() if params else []
        counts = [p.numel() - n for (_, p), n in zip(params, nonzero)]
        per_layer = {name: z / p.numel() for (name, p), z in zip(params, counts)}
        return {"sparsity": sum(counts) / max(self.numel, 1), "per_layer": per_layer}


def shown(value: Any) -> str:
    text = repr(value) if not isinstance(value, torch.Tensor) else f"a tensor of shape {list(value.shape)}"
    return text if len(text) <= 60 else text[:57] + "..."


def check_masks(masks: Any, params: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """``masks`` checked whole against the weights ``params`` they mask: one mask per weight and no other, each of
    its weight's shape, boolean or uint8 holding only 0 and 1 (a 2 or a 0.5 is not a mask: reading it as "keep"
    would trust a state acdc did not write). Returns them as booleans on their weights' devices."""
    if not isinstance(masks, Mapping):
        raise AcdcError(f"{what} is {shown(masks)}, expected a table of masks")
    for name, mask in masks.items():
        if name not in params:
            raise AcdcError(f"{what} has a mask for {shown(name)}, which the sparsity rules do not select")
        param = params[name]
        if not isinstance(mask, torch.Tensor) or mask.shape != param.shape:
            raise AcdcError(f"{what}[{name}] is {shown(mask)}, its weight is {list(param.shape)}")
        if mask.dtype not in (torch.bool, torch.uint8):
            raise AcdcError(f"{what}[{name}] is {str(mask.dtype).removeprefix('torch.')}, expected bool or 0/1 uint8")
        if mask.dtype == torch.uint8 and bool((mask > 1).any()):
            raise AcdcError(f"{what}[{name}] holds values other than 0 and 1")
    missing = sorted(n for n in params if n not in masks)
    if missing:
        raise AcdcError(f"{what} has no mask for {missing[0]} (one per selected weight)")
    checked = {}
    for name, param in params.items():
        mask = masks[name]
        checked[name] = mask.to(param.device, torch.bool)
    return checked
