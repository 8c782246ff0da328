"""Pure encodings of sparse weights in the compressed-tensors layouts (``sparse-bitmask``, ``sparse-24-bitmask``).

acdc lays a weight out in one of two ways before encoding it:

- ``rows`` (the default): a weight (O, I, *k) is laid out as (O, *k, I) and flattened to (O, prod(k) * I) rows, so
  that N:M groups of consecutive input channels are contiguous within a row (the layout N:M masks use). Compact, and
  the only layout 2:4 can use; a reader needs the recorded shape and layout to rebuild a conv weight.
- ``native``: the weight keeps its own shape (O, I, kh, kw), as compressed-tensors' own ``sparse-bitmask`` compressor
  stores an N-D tensor; its decompressor then returns the conv weight itself. The bitmask is packed along the last
  dimension only, so a 1x1 conv spends a byte per weight on it.

Then, as in compressed-tensors:

- ``bitmask``: uint8 (*leading, ceil(last / 8)), each row of the last dimension packed on its own with
  ``numpy.packbits(..., bitorder="little")``;
- ``compressed``: the kept values in row-major order: 1-D for ``sparse-bitmask``, (rows, cols / 2) for 2:4;
- ``shape``: int64, the encoded tensor's shape: 1-D for ``sparse-bitmask`` and (2, 1) for ``sparse-24-bitmask``;
- ``row_offsets`` (``sparse-bitmask`` only): int64 index into ``compressed`` where each row (each index of the first
  dimension, i.e. each output channel) starts.

"Kept" is a bit pattern, not a value test: a stored -0.0 stays -0.0, so decode(encode(w)) is bitwise equal to ``w``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from acdc_cli.sparsity.masks import from_groups_layout, to_groups_layout

BITMASK = "sparse-bitmask"
BITMASK_24 = "sparse-24-bitmask"
ROWS = "rows"
NATIVE = "native"
CONV_LAYOUTS = (ROWS, NATIVE)


def layout_name(shape: tuple[int, ...] | list[int], conv_layout: str = ROWS) -> str:
    """How a weight of this shape is stored: "OI" (Linear); in rows "OHWI" (Conv2d), "OkI" (Conv1d)...; native
    "OIHW", "OIk"..."""
    if len(shape) == 2:
        return "OI"
    if conv_layout == NATIVE:
        return "OIHW" if len(shape) == 4 else "OI" + "k" * (len(shape) - 2)
    if len(shape) == 4:
        return "OHWI"
    return "O" + "k" * (len(shape) - 2) + "I"


def is_rows_layout(layout: str, shape: tuple[int, ...] | list[int]) -> bool:
    """Whether a weight of ``shape`` stored as ``layout`` went through :func:`to_rows` (so :func:`from_rows`
    restores it)."""
    return layout == layout_name(shape, ROWS)


def to_rows(weight: torch.Tensor) -> torch.Tensor:
    """(O, I, *k) -> (O, prod(k) * I) with the input channels innermost."""
    if weight.dim() < 2:
        raise ValueError(f"only weights of 2 or more dimensions have rows, got shape {tuple(weight.shape)}")
    # the column count spelled out: -1 is ambiguous for a layer of no weights
    return to_groups_layout(weight).reshape(weight.shape[0], math.prod(weight.shape[1:])).contiguous()


def from_rows(rows: torch.Tensor, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Inverse of :func:`to_rows` for a tensor of the original ``shape``."""
    shape = tuple(int(s) for s in shape)
    permuted = (shape[0], *shape[2:], shape[1])
    return from_groups_layout(rows.reshape(permuted)).contiguous()


_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bit_nonzero(t: torch.Tensor) -> torch.Tensor:
    """True wherever the stored bits are not all zero (so -0.0 counts as a value to keep)."""
    if t.is_floating_point():
        return t.view(_SAME_WIDTH_INT[t.element_size()]) != 0
    return t != 0


def group_counts(flags: torch.Tensor, m: int) -> torch.Tensor:
    """True entries in every group of ``m`` consecutive elements (row-major), as a flat int tensor.

    Adds the ``m`` columns of the (groups, m) view one by one: a reduction over a last dimension this short is
    several times slower in PyTorch.
    """
    groups = flags.reshape(-1, m).to(torch.uint8)
    counts = groups[:, 0].to(torch.int32)
    for j in range(1, m):
        counts += groups[:, j]
    return counts


def nm_check(weight: torch.Tensor, n: int, m: int) -> bool | None:
    """At most ``n`` non-zeros in every group of ``m`` input channels at fixed (out, kh, kw); None when the input
    channels are not a multiple of ``m`` (the layer cannot be N:M at all)."""
    if weight.dim() < 2 or weight.shape[1] % m:
        return None
    return bool((group_counts(to_rows(weight) != 0, m) <= n).all())


def pack_bitmask(keep: torch.Tensor) -> torch.Tensor:
    """Bool (*lead, n) -> uint8 (*lead, ceil(n / 8)), little bit order within each byte, each row of the last
    dimension packed apart."""
    if keep.dim() < 1:
        raise ValueError("a bitmask needs at least one dimension")
    packed = np.packbits(keep.cpu().numpy().astype(np.uint8), axis=-1, bitorder="little")
    return torch.from_numpy(packed)


def unpack_bitmask(packed: torch.Tensor, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Inverse of :func:`pack_bitmask` for a mask of ``shape``."""
    shape = tuple(int(s) for s in shape)
    expected = (*shape[:-1], math.ceil(shape[-1] / 8)) if shape else None
    if packed.dtype != torch.uint8 or tuple(packed.shape) != expected:
        raise ValueError(f"bitmask of shape {tuple(packed.shape)} ({packed.dtype}) does not fit shape {shape}")
    bits = np.unpackbits(packed.cpu().numpy(), axis=-1, count=shape[-1], bitorder="little")
    return torch.from_numpy(bits.astype(bool))


def _check_mask(values: torch.Tensor, keep: torch.Tensor, dims: int | None = None) -> None:
    if (values.dim() < 2 or (dims is not None and values.dim() != dims) or keep.shape != values.shape
            or keep.dtype != torch.bool):
        shape = "a 2-D tensor" if dims == 2 else "a tensor of 2 or more dimensions"
        raise ValueError(f"expected {shape} and a bool mask of the same shape")


def encode_bitmask(values: torch.Tensor, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """``sparse-bitmask`` of a tensor of 2 or more dimensions (2-D rows, or a weight in its own shape): every
    position outside ``keep`` must hold (+)0."""
    _check_mask(values, keep)
    if bool((bit_nonzero(values) & ~keep).any()):
        raise ValueError("a position outside the mask holds a non-zero value")
    counts = keep.reshape(keep.shape[0], math.prod(keep.shape[1:])).sum(dim=1)  # -1 is ambiguous with no weights
    return {
        "shape": torch.tensor(list(values.shape), dtype=torch.int64),
        "compressed": values[keep].contiguous(),
        "bitmask": pack_bitmask(keep),
        "row_offsets": (torch.cumsum(counts, 0) - counts).to(torch.int64),
    }


def decode_bitmask(compressed: torch.Tensor, bitmask: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """Dense tensor (of the encoded shape) from a ``sparse-bitmask`` encoding."""
    dims = [int(v) for v in shape.flatten().tolist()]
    keep = unpack_bitmask(bitmask, dims)
    if int(keep.sum()) != compressed.numel():
        raise ValueError(f"bitmask holds {int(keep.sum())} kept positions for {compressed.numel()} values")
    out = torch.zeros(dims, dtype=compressed.dtype)
    out[keep] = compressed.flatten()
    return out


def select_24(rows: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Exactly 2 kept positions in every group of 4 consecutive columns.

    Non-zero values are always kept; the remaining places go to positions the mask keeps, then to the lowest column.
    A group with more than 2 non-zeros cannot be 2:4 and raises ValueError.
    """
    if rows.dim() != 2 or rows.shape[1] % 4:
        raise ValueError(f"2:4 needs a multiple of 4 columns, got shape {tuple(rows.shape)}")
    nonzero = bit_nonzero(rows)
    if bool((group_counts(nonzero, 4) > 2).any()):
        raise ValueError("a group of 4 holds more than 2 non-zeros")
    if mask is not None and bool((group_counts(mask, 4) == 2).all()) and not bool((nonzero & ~mask).any()):
        return mask.clone()  # an exact 2:4 mask (what N:M pruning makes) that covers every value
    nonzero = nonzero.reshape(-1, 4)
    priority = 2 * nonzero.to(torch.int8)
    if mask is not None:
        priority += mask.reshape(-1, 4).to(torch.int8)
    # stable descending sort: among equal priorities the lower column wins
    order = torch.sort(priority, dim=1, descending=True, stable=True).indices
    keep = torch.zeros_like(nonzero)
    keep.scatter_(1, order[:, :2], True)
    return keep.reshape(rows.shape)


def encode_24(rows: torch.Tensor, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """``sparse-24-bitmask`` of a 2-D tensor: ``keep`` has exactly 2 of every 4 columns (see :func:`select_24`)."""
    _check_mask(rows, keep, dims=2)
    if rows.shape[1] % 4 or bool((group_counts(keep, 4) != 2).any()):
        raise ValueError("a 2:4 mask keeps exactly 2 of every 4 columns")
    if bool((bit_nonzero(rows) & ~keep).any()):
        raise ValueError("a position outside the mask holds a non-zero value")
    r, c = rows.shape
    return {
        "shape": torch.tensor([r, c], dtype=torch.int64).reshape(-1, 1),
        "compressed": rows[keep].reshape(r, c // 2).contiguous(),
        "bitmask": pack_bitmask(keep),
    }


def decode_24(compressed: torch.Tensor, bitmask: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """Dense 2-D tensor from a ``sparse-24-bitmask`` encoding."""
    rows, cols = (int(v) for v in shape.flatten().tolist())
    if tuple(compressed.shape) != (rows, cols // 2):
        raise ValueError(f"2:4 values have shape {tuple(compressed.shape)}, expected {(rows, cols // 2)}")
    return decode_bitmask(compressed, bitmask, shape)


def stored_bytes(parts: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())
