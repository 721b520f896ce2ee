"""RTN numerics against a deliberately plain numpy reference (one loop over groups, one formula per line)."""

from __future__ import annotations

import numpy as np
import pytest

from graphq.algorithms.rtn import integer_range, quantize_rtn


def reference_rtn(weight: np.ndarray, bits: int, group_size: int, symmetric: bool):
    """(q, scales, zero_points) for a [K, N] float32 weight, group by group along K, written out longhand."""
    weight = np.asarray(weight, dtype=np.float32)
    k, n = weight.shape
    if group_size == -1:
        group_size = k
    starts = list(range(0, k, group_size))
    q = np.zeros((k, n), dtype=np.int64)
    scales = np.zeros((len(starts), n), dtype=np.float32)
    zero_points = None if symmetric else np.zeros((len(starts), n), dtype=np.int64)
    for g, start in enumerate(starts):
        block = weight[start : start + group_size]  # the last group may be shorter
        if symmetric:
            # The value of largest magnitude (first one on ties) maps to -2^(b-1); the scale takes its sign.
            qmax = 2 ** (bits - 1) - 1
            qmin = -(2 ** (bits - 1))
            scale = np.zeros(n, dtype=np.float32)
            for col in range(n):
                extreme = np.float32(0.0)
                for value in block[:, col]:
                    if abs(value) > abs(extreme):
                        extreme = value
                scale[col] = np.float32(1.0) if extreme == 0 else extreme / np.float32(qmin)
            q[start : start + group_size] = np.clip(np.round(block / scale), qmin, qmax)
        else:
            qmax = 2**bits - 1
            low = np.minimum(block.min(axis=0), np.float32(0.0))
            high = np.maximum(block.max(axis=0), np.float32(0.0))
            scale = (high - low) / np.float32(qmax)
            scale = np.where(scale == 0, np.float32(1.0), scale).astype(np.float32)
            zp = np.clip(np.round(-low / scale), 0, qmax)
            q[start : start + group_size] = np.clip(np.round(block / scale) + zp, 0, qmax)
            zero_points[g] = zp
        scales[g] = scale
    return q, scales, zero_points


def reference_dequantize(q, scales, zero_points, group_size, k):
    if group_size == -1:
        group_size = k
    out = np.zeros(q.shape, dtype=np.float64)
    for g in range(scales.shape[0]):
        rows = slice(g * group_size, min((g + 1) * group_size, k))
        zp = 0 if zero_points is None else zero_points[g].astype(np.float64)
        out[rows] = (q[rows].astype(np.float64) - zp) * scales[g].astype(np.float64)
    return out


def make_weight(k: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    # A few outliers, an all-positive and an all-negative column (asymmetric ranges must still include 0).
    weight[rng.integers(0, k, 4), rng.integers(0, n, 4)] *= 20
    weight[:, 0] = np.abs(weight[:, 0]) + 0.01
    weight[:, 1] = -np.abs(weight[:, 1]) - 0.01
    return weight


CASES = [
    # (K, group_size): divisible, not divisible (partial last group), group larger than K, per-channel
    (64, 16),
    (64, 32),
    (96, 32),
    (72, 32),
    (72, 16),
    (256, 128),
    (200, 128),
    (72, 128),
    (64, -1),
    (72, -1),
]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("k,group_size", CASES)
def test_rtn_matches_reference(k, group_size, bits, symmetric):
    n = 24
    weight = make_weight(k, n, seed=k * 1000 + max(group_size, 0) + bits)
    qw = quantize_rtn(weight, bits, group_size, symmetric)
    ref_q, ref_scales, ref_zp = reference_rtn(weight, bits, group_size, symmetric)

    n_groups = -(-k // (k if group_size == -1 else group_size))
    assert qw.shape == (k, n)
    assert qw.n_groups == n_groups
    assert qw.scales.shape == (n_groups, n)
    assert qw.symmetric is symmetric
    assert qw.bits == bits
    np.testing.assert_array_equal(qw.scales, ref_scales)
    np.testing.assert_array_equal(qw.q.astype(np.int64), ref_q)
    qmin, qmax = integer_range(bits, symmetric)
    assert qw.q.min() >= qmin and qw.q.max() <= qmax
    if symmetric:
        assert qw.zero_points is None
        assert qw.q.dtype == np.int8
    else:
        assert qw.q.dtype == np.uint8
        assert qw.zero_points.shape == (n_groups, n)
        np.testing.assert_array_equal(qw.zero_points.astype(np.int64), ref_zp)
        assert qw.zero_points.max() <= qmax

    dequantized = qw.dequantize()
    assert dequantized.dtype == np.float32
    assert dequantized.shape == (k, n)
    expected = reference_dequantize(ref_q, ref_scales, ref_zp, group_size, k)
    np.testing.assert_allclose(dequantized, expected, rtol=1e-6, atol=1e-9)
    # The quantization really happened: values live on a grid, not a copy of the input.
    assert not np.array_equal(dequantized, weight)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("k,group_size", [(64, 32), (72, 32), (96, 128), (64, -1)])
def test_rounding_error_is_at_most_half_a_step(k, group_size, bits, symmetric):
    """Every value that is not clipped dequantizes within scale/2 of itself."""
    n = 16
    weight = make_weight(k, n, seed=7 + k + bits)
    qw = quantize_rtn(weight, bits, group_size, symmetric)
    scale = qw.expand(qw.scales).astype(np.float64)
    error = np.abs(qw.dequantize().astype(np.float64) - weight.astype(np.float64))

    step = np.abs(scale)
    qmin, qmax = integer_range(bits, symmetric)
    unclipped = np.round(weight / qw.expand(qw.scales))
    if not symmetric:
        unclipped = unclipped + qw.expand(qw.zero_points)
    inside = (unclipped >= qmin) & (unclipped <= qmax)
    # With the extreme value on -2^(b-1) (sym) or a rounded zero point (asym), only a sliver at one end of a range
    # can round past the grid.
    assert inside.mean() > 0.95
    if symmetric:
        assert np.all(unclipped[~inside] == qmax + 1)  # only the opposite-sign end, by one level
        # The value of largest magnitude in each group is reproduced (it sits exactly on -2^(b-1)).
        dequantized = qw.dequantize()
        for g in range(qw.n_groups):
            rows = slice(g * qw.group_size, (g + 1) * qw.group_size)
            idx = np.abs(weight[rows]).argmax(axis=0)
            cols = np.arange(n)
            np.testing.assert_allclose(dequantized[rows][idx, cols], weight[rows][idx, cols], rtol=1e-6)
            np.testing.assert_array_equal(qw.q[rows][idx, cols], qmin)
    bound = step / 2 * (1 + 1e-5) + 1e-12
    assert np.all(error[inside] <= bound[inside]), float((error - bound)[inside].max())
    # A clipped value is off by at most one step more than that.
    assert np.all(error <= step * 1.5 * (1 + 1e-5))
    # The error is not trivially zero: the bound is being exercised.
    assert error[inside].max() > 0.2 * step[inside].min()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_all_zero_group_has_no_nan(bits, symmetric):
    k, n, group_size = 64, 8, 32
    weight = make_weight(k, n, seed=3)
    weight[:32, 2] = 0.0  # one whole group of column 2
    weight[:, 5] = 0.0  # both groups of column 5
    qw = quantize_rtn(weight, bits, group_size, symmetric)
    assert np.all(np.isfinite(qw.scales)) and np.all(qw.scales != 0)
    dequantized = qw.dequantize()
    assert np.all(np.isfinite(dequantized))
    np.testing.assert_array_equal(dequantized[:32, 2], 0.0)
    np.testing.assert_array_equal(dequantized[:, 5], 0.0)
    if symmetric:
        np.testing.assert_array_equal(qw.q[:, 5], 0)
    else:
        np.testing.assert_array_equal(qw.q[:, 5], qw.zero_points[0, 5])
    ref_q, ref_scales, ref_zp = reference_rtn(weight, bits, group_size, symmetric)
    np.testing.assert_array_equal(qw.q.astype(np.int64), ref_q)
    # The other groups are quantized normally.
    assert np.abs(dequantized[32:, 2] - weight[32:, 2]).max() <= abs(qw.scales[1, 2]) * (1 + 1e-5)


def test_zero_is_exact_and_range_includes_it():
    """Asymmetric ranges are widened to include zero, so zero weights dequantize to exactly zero."""
    weight = make_weight(64, 8, seed=11)
    weight[::5] = 0.0
    qw = quantize_rtn(weight, 4, 32, symmetric=False)
    np.testing.assert_array_equal(qw.dequantize()[::5], 0.0)
    # Column 0 is all positive: its zero point is 0 and its scale spans [0, max].
    np.testing.assert_array_equal(qw.zero_points[:, 0], 0)
    np.testing.assert_allclose(qw.scales[:, 0], weight.reshape(2, 32, 8)[:, :, 0].max(axis=1) / 15, rtol=1e-6)
    # Column 1 is all negative: its zero point is 15 and its scale spans [min, 0].
    np.testing.assert_array_equal(qw.zero_points[:, 1], 15)


def test_per_channel_equals_one_group_of_k():
    weight = make_weight(72, 8, seed=5)
    a = quantize_rtn(weight, 4, -1, symmetric=False)
    b = quantize_rtn(weight, 4, 72, symmetric=False)
    assert a.group_size == 72 and a.n_groups == 1
    np.testing.assert_array_equal(a.q, b.q)
    np.testing.assert_array_equal(a.scales, b.scales)


def test_rejects_non_matrix():
    with pytest.raises(ValueError):
        quantize_rtn(np.zeros((4, 4, 4), dtype=np.float32), 4, 32, True)
