"""Mask math against direct reference implementations (numpy, explicit loops) on random weights."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from acdc_cli.sparsity import masks as M


def reference_global(weights: dict[str, torch.Tensor], sparsity: float) -> dict[str, np.ndarray]:
    flat = np.concatenate([np.abs(w.numpy()).ravel() for w in weights.values()])
    k = int(round(sparsity * flat.size))
    keep = np.ones(flat.size, dtype=bool)
    keep[np.argsort(flat, kind="stable")[:k]] = False
    out, offset = {}, 0
    for name, w in weights.items():
        out[name] = keep[offset : offset + w.numel()].reshape(w.shape)
        offset += w.numel()
    return out


def reference_nm(weight: torch.Tensor, n: int, m: int) -> np.ndarray:
    w = np.abs(weight.numpy())
    keep = np.zeros(w.shape, dtype=bool)
    if w.ndim == 2:
        w, keep_view = w[:, :, None, None], keep[:, :, None, None]
    else:
        keep_view = keep
    out_ch, in_ch, kh, kw = w.shape
    for o in range(out_ch):
        for y in range(kh):
            for x in range(kw):
                for g in range(0, in_ch, m):
                    group = w[o, g : g + m, y, x]
                    # largest first; among equals the lower channel wins
                    order = sorted(range(m), key=lambda i: (-group[i], i))[:n]
                    for i in order:
                        keep_view[o, g + i, y, x] = True
    return keep


shapes = st.lists(
    st.tuples(st.integers(1, 6), st.integers(1, 6), st.sampled_from([1, 3])), min_size=1, max_size=4
)


@settings(max_examples=40, deadline=None)
@given(shapes=shapes, sparsity=st.floats(0.0, 0.99), seed=st.integers(0, 2**16), ties=st.booleans())
def test_global_mask_matches_reference(shapes, sparsity, seed, ties):
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for i, (o, c, k) in enumerate(shapes):
        w = torch.randn(o, c, k, k, generator=g)
        if ties:  # many equal magnitudes: only a deterministic tie rule gives exact agreement
            w = torch.randint(-2, 3, w.shape, generator=g).float()
        weights[f"l{i}.weight"] = w
    got = M.global_magnitude_masks(weights, sparsity)
    want = reference_global(weights, sparsity)
    total = sum(w.numel() for w in weights.values())
    pruned = sum(int((~m).sum()) for m in got.values())
    assert pruned == int(round(sparsity * total))
    for name in weights:
        assert got[name].dtype == torch.bool and got[name].shape == weights[name].shape
        np.testing.assert_array_equal(got[name].numpy(), want[name])


@pytest.mark.parametrize("sparsity", [0.3, 0.9, 0.99])
def test_nan_weights_rank_last_and_counts_stay_exact(sparsity):
    """A diverged weight (NaN) is the last to be pruned, and the count stays exact even when NaNs must go."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(20, 5, generator=g)
    w.view(-1)[torch.randperm(100, generator=g)[:5]] = float("nan")
    got = M.global_magnitude_masks({"w": w}, sparsity)["w"]
    assert int((~got).sum()) == round(sparsity * 100)
    np.testing.assert_array_equal(got.numpy(), reference_global({"w": w}, sparsity)["w"])


@settings(max_examples=30, deadline=None)
@given(shapes=shapes, sparsity=st.floats(0.0, 0.99), seed=st.integers(0, 2**16))
def test_uniform_mask_prunes_each_layer_exactly(shapes, sparsity, seed):
    g = torch.Generator().manual_seed(seed)
    weights = {f"l{i}": torch.randn(o, c, k, k, generator=g) for i, (o, c, k) in enumerate(shapes)}
    got = M.uniform_magnitude_masks(weights, sparsity)
    for name, w in weights.items():
        assert int((~got[name]).sum()) == int(round(sparsity * w.numel()))
        np.testing.assert_array_equal(got[name].numpy(), reference_global({name: w}, sparsity)[name])


def test_global_threshold_is_shared_across_layers():
    big = torch.full((10,), 5.0)
    small = torch.linspace(0.1, 1.0, 10)
    masks = M.global_magnitude_masks({"big": big, "small": small}, 0.5)
    assert masks["big"].all() and not masks["small"].any()


@settings(max_examples=25, deadline=None)
@given(
    out_ch=st.integers(1, 4),
    groups=st.integers(1, 3),
    k=st.sampled_from([1, 3]),
    nm=st.sampled_from([(2, 4), (1, 4), (2, 8), (1, 2)]),
    seed=st.integers(0, 2**16),
    ties=st.booleans(),
)
def test_nm_mask_matches_reference(out_ch, groups, k, nm, seed, ties):
    n, m = nm
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_ch, groups * m, k, k, generator=g)
    if ties:
        w = torch.randint(-1, 2, w.shape, generator=g).float()
    got = M.nm_mask(w, n, m)
    np.testing.assert_array_equal(got.numpy(), reference_nm(w, n, m))
    # exactly n kept in every group of m consecutive input channels
    per_group = got.permute(0, 2, 3, 1).reshape(-1, m).sum(1)
    assert (per_group == n).all()
    assert M.nm_valid(w * got, n, m)


def test_nm_linear_groups_run_along_in_features():
    w = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0, 0.0, 9.0, 8.0]])
    mask = M.nm_mask(w, 2, 4)
    assert mask.tolist() == [[False, True, True, False, False, False, True, True]]
    np.testing.assert_array_equal(M.nm_mask(torch.randn(3, 8), 2, 4).numpy().sum(1), [4, 4, 4])


def test_nm_rejects_incompatible_channels_and_bad_nm():
    with pytest.raises(ValueError, match="multiple of 4"):
        M.nm_mask(torch.randn(8, 3, 3, 3), 2, 4)
    with pytest.raises(ValueError):
        M.nm_mask(torch.randn(8, 4), 4, 4)
    assert not M.nm_valid(torch.ones(2, 4), 2, 4)
    assert M.nm_valid(torch.tensor([[1.0, 0.0, 2.0, 0.0]]), 2, 4)


def test_pruned_count_rejects_out_of_range():
    with pytest.raises(ValueError):
        M.pruned_count(10, 1.0)
    with pytest.raises(ValueError):
        M.pruned_count(10, -0.1)
    assert M.pruned_count(1000, 0.95) == 950


def test_groups_layout_round_trip():
    w = torch.randn(5, 8, 3, 2)
    permuted = M.to_groups_layout(w)
    assert permuted.shape == (5, 3, 2, 8)
    assert torch.equal(M.from_groups_layout(permuted), w)


def test_compute_masks_dispatches_each_scope():
    g = torch.Generator().manual_seed(0)
    weights = {"small": torch.randn(4, 8, generator=g) * 0.01, "big": torch.randn(4, 8, generator=g)}
    uniform = M.compute_masks(weights, 0.75, "uniform")
    assert [int((~uniform[n]).sum()) for n in weights] == [24, 24]
    together = M.compute_masks(weights, 0.75, "global")
    assert [int((~together[n]).sum()) for n in weights] == [32, 16]  # every small weight goes first
    with pytest.raises(ValueError, match="unknown scope"):
        M.compute_masks(weights, 0.75, "layerwise")
