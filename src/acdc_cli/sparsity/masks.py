"""Pure mask math: magnitude masks (global, uniform) and N:M masks along input channels.

Every function takes weights and returns boolean masks (True = kept). Counts are exact: ``round(sparsity * n)``
weights are pruned, ties broken deterministically (lower flat index pruned first), and thresholds come from a sort,
never ``kthvalue`` (tens of times slower on GPU).
"""

from __future__ import annotations

import torch


def pruned_count(numel: int, sparsity: float) -> int:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    return int(round(sparsity * numel))


def _mask_from_scores(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Flat boolean mask that drops the ``k`` smallest scores; equal scores drop in index order (lower first).

    The k-th smallest score is the threshold: everything below it goes, and of the scores equal to it, the first
    ``k - #below`` in index order. Only sorted values are needed (no scatter of sort indices), and nothing is read
    back to the host. NaN scores rank above every number.
    """
    flat = scores.flatten()
    if k <= 0:
        return torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    flat = torch.nan_to_num(flat, nan=float("inf"))
    threshold = torch.sort(flat).values[k - 1]
    below = flat < threshold
    tied = flat == threshold
    room = k - below.sum()
    return ~(below | (tied & (torch.cumsum(tied, 0) <= room)))


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Mask of one tensor pruning exactly ``round(sparsity * numel)`` smallest-|w| entries."""
    k = pruned_count(weight.numel(), sparsity)
    return _mask_from_scores(weight.detach().abs().float(), k).view(weight.shape)


def global_magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold over |w| of all tensors together; exactly ``round(sparsity * total)`` pruned overall."""
    if not weights:
        return {}
    names = list(weights)
    flat = torch.cat([weights[n].detach().abs().float().flatten() for n in names])
    mask = _mask_from_scores(flat, pruned_count(flat.numel(), sparsity))
    out, offset = {}, 0
    for name in names:
        w = weights[name]
        out[name] = mask[offset : offset + w.numel()].view(w.shape)
        offset += w.numel()
    return out


def uniform_magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Every tensor pruned to the same sparsity, each with its own threshold."""
    return {name: magnitude_mask(w, sparsity) for name, w in weights.items()}


def to_groups_layout(weight: torch.Tensor) -> torch.Tensor:
    """(O, I, *k) -> (O, *k, I): the input-channel axis last, so N:M groups are contiguous along rows."""
    if weight.dim() <= 2:
        return weight
    return weight.permute(0, *range(2, weight.dim()), 1)


def from_groups_layout(permuted: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_groups_layout`."""
    if permuted.dim() <= 2:
        return permuted
    d = permuted.dim()
    return permuted.permute(0, d - 1, *range(1, d - 1))


def nm_compatible(weight: torch.Tensor, m: int) -> bool:
    """A layer can be N:M only if its per-group input channels (dim 1) are a multiple of M."""
    return weight.dim() >= 2 and weight.shape[1] % m == 0


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest |w| in every group of ``m`` consecutive input channels at fixed (out, kh, kw)."""
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
    if not nm_compatible(weight, m):
        raise ValueError(f"input channels {tuple(weight.shape)[1:2]} are not a multiple of {m}")
    groups = to_groups_layout(weight.detach().abs().float()).reshape(-1, m)
    # stable descending sort keeps the lower channel index among equal magnitudes
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, order[:, :n], True)
    permuted_shape = to_groups_layout(weight).shape
    return from_groups_layout(keep.view(permuted_shape)).contiguous()


def nm_valid(weight: torch.Tensor, n: int, m: int) -> bool:
    """True if every group of ``m`` input channels holds at most ``n`` non-zeros."""
    if not nm_compatible(weight, m):
        return False
    groups = to_groups_layout(weight.detach()).reshape(-1, m)
    return bool(((groups != 0).sum(dim=1) <= n).all())


def compute_masks(
    weights: dict[str, torch.Tensor],
    sparsity: float,
    scope: str = "global",
    nm: tuple[int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Masks for all selected weights under one rule set."""
    if nm is not None:
        return {name: nm_mask(w, *nm) for name, w in weights.items()}
    if scope == "global":
        return global_magnitude_masks(weights, sparsity)
    if scope == "uniform":
        return uniform_magnitude_masks(weights, sparsity)
    raise ValueError(f"unknown scope {scope!r}")
