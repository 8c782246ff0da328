"""Property tests of the sparse encodings (compressed-tensors layouts), checked against direct numpy references."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from acdc_cli.sparsity import formats as F

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FAST = settings(max_examples=40, deadline=None)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bits, so comparisons see -0.0 and +0.0 as different."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _sparse(shape, density: float, seed: int, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    w[torch.rand(shape, generator=g) > density] = 0.0
    w = w.to(dtype)
    if w.numel() > 1:
        w.view(-1)[0] = -0.0  # a stored -0.0 must survive the round trip as -0.0
    return w


shapes = st.one_of(
    st.tuples(st.integers(1, 9), st.integers(1, 40)),  # Linear (O, I)
    st.tuples(st.integers(1, 6), st.integers(1, 9), st.integers(1, 3), st.integers(1, 3)),  # Conv2d (O, I, kh, kw)
    st.tuples(st.integers(1, 5), st.integers(1, 7), st.integers(1, 4)),  # Conv1d (O, I, k)
)


@FAST
@given(shape=shapes, seed=st.integers(0, 10_000))
def test_rows_put_input_channels_innermost_and_invert(shape, seed):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    rows = F.to_rows(w)
    out_ch, in_ch, k = shape[0], shape[1], int(np.prod(shape[2:], dtype=int))
    assert rows.shape == (out_ch, k * in_ch)
    reference = w.numpy().reshape(out_ch, in_ch, k).transpose(0, 2, 1).reshape(out_ch, -1)
    assert np.array_equal(rows.numpy(), reference)
    assert torch.equal(F.from_rows(rows, shape), w)


@FAST
@given(rows=st.integers(1, 6), cols=st.integers(1, 30), seed=st.integers(0, 10_000))
def test_bitmask_packing_is_numpy_packbits_little_per_row(rows, cols, seed):
    keep = torch.rand((rows, cols), generator=torch.Generator().manual_seed(seed)) < 0.4
    packed = F.pack_bitmask(keep)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, -(-cols // 8))
    assert np.array_equal(packed.numpy(), np.packbits(keep.numpy(), axis=-1, bitorder="little"))
    assert torch.equal(F.unpack_bitmask(packed, (rows, cols)), keep)


def test_bitmask_bit_order_is_lsb_first():
    keep = torch.tensor([[True, False, False, False, False, False, False, False, True, True]])
    assert F.pack_bitmask(keep).tolist() == [[1, 3]]


@FAST
@given(shape=shapes, density=st.floats(0.0, 1.0), seed=st.integers(0, 10_000), dtype=st.sampled_from(DTYPES))
def test_sparse_bitmask_round_trip_is_bitwise(shape, density, seed, dtype):
    w = _sparse(shape, density, seed, dtype)
    rows = F.to_rows(w)
    keep = F.bit_nonzero(rows)
    parts = F.encode_bitmask(rows, keep)
    assert parts["bitmask"].dtype == torch.uint8 and parts["compressed"].dim() == 1
    assert parts["shape"].dtype == torch.int64 and parts["shape"].tolist() == list(rows.shape)
    assert parts["compressed"].numel() == int(keep.sum())
    counts = keep.sum(dim=1)
    assert parts["row_offsets"].tolist() == (torch.cumsum(counts, 0) - counts).tolist()
    back = F.from_rows(F.decode_bitmask(parts["compressed"], parts["bitmask"], parts["shape"]), shape)
    assert back.dtype == dtype and torch.equal(_bits(back), _bits(w))


def _random_24(out_ch: int, in_ch: int, k: int, seed: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A (O, I, k, k) weight and an exact 2:4 mask along input channels; some kept weights are 0."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand((out_ch, k, k, in_ch // 4, 4), generator=g)
    chosen = scores.argsort(dim=-1)[..., :2]
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, chosen, True)
    mask = mask.reshape(out_ch, k, k, in_ch).permute(0, 3, 1, 2).contiguous()
    w = torch.randn((out_ch, in_ch, k, k), generator=g) * mask
    w[mask & (torch.rand(w.shape, generator=g) < 0.1)] = 0.0
    return (w + 0.0).to(dtype), mask


@FAST
@given(out_ch=st.integers(1, 6), groups=st.integers(1, 4), k=st.integers(1, 3), seed=st.integers(0, 10_000),
       dtype=st.sampled_from(DTYPES))
def test_sparse_24_keeps_exactly_the_mask_and_round_trips(out_ch, groups, k, seed, dtype):
    w, mask = _random_24(out_ch, 4 * groups, k, seed, dtype)
    rows, mask_rows = F.to_rows(w), F.to_rows(mask)
    keep = F.select_24(rows, mask_rows)
    assert torch.equal(keep, mask_rows)  # "chosen by the mask": a kept 0 is stored, a pruned position is not
    parts = F.encode_24(rows, keep)
    assert parts["compressed"].shape == (out_ch, rows.shape[1] // 2)
    assert parts["shape"].shape == (2, 1) and parts["shape"].flatten().tolist() == list(rows.shape)
    unpacked = np.unpackbits(parts["bitmask"].numpy(), axis=-1, count=rows.shape[1], bitorder="little")
    assert (unpacked.reshape(-1, 4).sum(axis=1) == 2).all()
    back = F.from_rows(F.decode_24(parts["compressed"], parts["bitmask"], parts["shape"]), w.shape)
    assert torch.equal(_bits(back), _bits(w))


@FAST
@given(rows=st.integers(1, 5), groups=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_select_24_without_mask_keeps_every_nonzero_then_lowest_columns(rows, groups, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn((rows, 4 * groups), generator=g)
    nonzero = torch.zeros_like(values, dtype=torch.bool)
    for r in range(rows):
        for start in range(0, 4 * groups, 4):
            count = int(torch.randint(0, 3, (1,), generator=g))
            nonzero[r, start + torch.randperm(4, generator=g)[:count]] = True
    values = values * nonzero + 0.0
    keep = F.select_24(values)
    assert bool((keep | ~nonzero).all())
    assert (keep.reshape(-1, 4).sum(dim=1) == 2).all()
    for group_keep, group_nz in zip(keep.reshape(-1, 4).tolist(), nonzero.reshape(-1, 4).tolist()):
        fillers = [i for i in range(4) if group_keep[i] and not group_nz[i]]
        free = [i for i in range(4) if not group_nz[i]]
        assert fillers == free[: len(fillers)]


def test_select_24_refuses_three_nonzeros_in_a_group():
    with pytest.raises(ValueError, match="more than 2"):
        F.select_24(torch.tensor([[1.0, 2.0, 3.0, 0.0]]))
    with pytest.raises(ValueError, match="multiple of 4"):
        F.select_24(torch.ones(2, 6))


def test_encoders_refuse_values_outside_the_mask():
    rows = torch.tensor([[1.0, 0.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match="outside the mask"):
        F.encode_24(rows, torch.tensor([[True, True, False, False]]))
    with pytest.raises(ValueError, match="outside the mask"):
        F.encode_bitmask(rows, torch.tensor([[True, False, True, False]]))


def test_bit_nonzero_keeps_negative_zero():
    t = torch.tensor([0.0, -0.0, 1.0, -2.0])
    for dtype in DTYPES:
        assert F.bit_nonzero(t.to(dtype)).tolist() == [False, True, True, True]


@FAST
@given(n=st.integers(1, 50), m=st.sampled_from([2, 4, 8]), seed=st.integers(0, 10_000))
def test_group_counts_equal_a_plain_sum(n, m, seed):
    flags = torch.rand((n, m), generator=torch.Generator().manual_seed(seed)) < 0.5
    assert F.group_counts(flags, m).tolist() == flags.sum(dim=1).tolist()


def test_nm_check_along_input_channels():
    w, _ = _random_24(3, 8, 3, seed=1, dtype=torch.float32)
    assert F.nm_check(w, 2, 4) is True
    w[0, 0:3, 1, 1] = 1.0  # three of the first four input channels at one (out, kh, kw)
    assert F.nm_check(w, 2, 4) is False
    assert F.nm_check(torch.ones(4, 3, 3, 3), 2, 4) is None  # 3 input channels cannot be 2:4
    # 2:4 along the flattened (I, kh, kw) order would be wrong: this weight is 2:4 only along input channels
    along_channels = torch.zeros(1, 4, 2, 2)
    along_channels[0, :2] = 1.0
    assert F.nm_check(along_channels, 2, 4) is True


def test_select_24_keeps_values_before_the_mask_and_fills_a_short_mask():
    rows = torch.tensor([[0.0, 0.0, 0.0, 5.0, 1.0, 0.0, 0.0, 0.0]])
    # the mask keeps two zeros of the first group but not its value; it keeps one place of the second group
    mask = torch.tensor([[True, True, False, False, False, False, False, True]])
    keep = F.select_24(rows, mask)
    assert keep.tolist() == [[True, False, False, True, True, False, False, True]]
    # a mask that covers every value but keeps one place of a group is filled up to two, not taken as it is
    short = F.select_24(torch.tensor([[0.0, 0.0, 0.0, 5.0]]), torch.tensor([[False, False, False, True]]))
    assert short.tolist() == [[True, False, False, True]]


def test_stored_bytes_count_bytes_not_elements():
    parts = {"shape": torch.zeros(3, dtype=torch.int64), "bitmask": torch.zeros(5, dtype=torch.uint8),
             "compressed": torch.zeros(4, dtype=torch.bfloat16)}
    assert F.stored_bytes(parts) == 3 * 8 + 5 + 4 * 2
