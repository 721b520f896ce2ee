"""GPTQ numerics: a deliberately plain, unblocked per-channel reference, error against RTN, edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from graphq.algorithms.gptq import HessianAccumulator, _inverse_cholesky_upper, gptq_quantize
from graphq.algorithms.rtn import compute_scales, integer_range, quantize_rtn

K, N, T = 256, 128, 2048


def make_inputs(k: int = K, t: int = T, seed: int = 0) -> np.ndarray:
    """Correlated channels (a random mixing) plus a few outlier channels, as in LLM activations."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
    x = rng.standard_normal((t, k)) @ mixing
    x[:, rng.choice(k, 4, replace=False)] *= 10.0
    return x.astype(np.float32)


def make_weight(k: int = K, n: int = N, seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((k, n)) * 0.05).astype(np.float32)


def hessian_of(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return 2.0 * x.T @ x / x.shape[0]


def output_error(x: np.ndarray, weight: np.ndarray, deq: np.ndarray) -> float:
    return float(np.sum((x.astype(np.float64) @ (weight.astype(np.float64) - deq.astype(np.float64))) ** 2))


def reference_gptq(weight, hessian, bits, group_size, symmetric, damp=0.01, act_order=False, static_groups=False):
    """Codes [K, N] and per-group (scale, zero) following the paper: one channel at a time, no blocking.

    H^-1 is a plain inverse and U its upper Cholesky factor; after channel t is rounded, every later channel
    is corrected at once. A group's grid is taken when its first channel comes up, from the current weights.
    """
    w = np.array(weight, dtype=np.float64)
    h = np.array(hessian, dtype=np.float64)
    k, n = w.shape
    gs = k if group_size == -1 else group_size
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    grids = {}

    def take_grid(g, rows):
        scale, zero = compute_scales(rows.astype(np.float32), bits, gs, symmetric)
        grids[g] = (scale[0], np.zeros(n, np.float32) if zero is None else zero[0].astype(np.float32))

    if static_groups:
        for g in range(-(-k // gs)):
            take_grid(g, w[g * gs : (g + 1) * gs])
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    h = h + damp * np.mean(np.diag(h)) * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(h[np.ix_(order, order)])).T
    wp = w[order]
    step_of = np.argsort(order)
    qmin, qmax = integer_range(bits, symmetric)
    codes = np.zeros((k, n), dtype=np.int64)
    for t in range(k):
        channel = order[t]
        g = channel // gs
        if g not in grids:
            take_grid(g, wp[step_of[g * gs : (g + 1) * gs]])
        scale, zero = grids[g]
        q = np.clip(np.round(wp[t].astype(np.float32) / scale) + zero, qmin, qmax)
        codes[channel] = q
        err = (wp[t] - (q - zero) * scale) / u[t, t]
        wp[t + 1 :] -= np.outer(u[t, t + 1 :], err)
    n_groups = -(-k // gs)
    scales = np.stack([grids[g][0] for g in range(n_groups)])
    zeros = None if symmetric else np.stack([grids[g][1] for g in range(n_groups)]).astype(np.uint8)
    return codes, scales, zeros


@pytest.fixture(scope="module")
def layer():
    x = make_inputs()
    return x, make_weight(), hessian_of(x)


def test_hessian_accumulator_streams_the_average():
    x = make_inputs(k=64, t=300)
    acc = HessianAccumulator()
    acc.add(x[:7].reshape(1, 7, 64))  # any leading shape counts as tokens
    acc.add(x[7:7])  # an empty batch changes nothing
    acc.add(x[7:250])
    acc.add(x[250:])
    assert acc.tokens == 300
    np.testing.assert_allclose(acc.hessian(), hessian_of(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        acc.add(np.zeros((3, 65), np.float32))
    with pytest.raises(ValueError):
        HessianAccumulator(64).hessian()


def test_inverse_cholesky_factor_matches_numpy():
    h = hessian_of(make_inputs(k=300, t=400)) + 0.1 * np.eye(300)  # > 128 so the block recursion is used
    upper = _inverse_cholesky_upper(h.copy())
    np.testing.assert_allclose(upper, np.linalg.cholesky(np.linalg.inv(h)).T, rtol=1e-8, atol=1e-10)
    assert np.all(np.tril(upper, -1) == 0)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_gptq_beats_rtn(layer, symmetric, group_size):
    x, weight, h = layer
    result, info = gptq_quantize(weight, h, 4, group_size, symmetric)
    rtn = quantize_rtn(weight, 4, group_size, symmetric)
    assert result.q.shape == weight.shape and result.scales.shape == rtn.scales.shape
    assert result.q.dtype == rtn.q.dtype and result.group_size == rtn.group_size
    ratio = output_error(x, weight, result.dequantize()) / output_error(x, weight, rtn.dequantize())
    assert ratio < 0.8  # about 0.63 on this data
    assert np.isfinite(info["loss"]) and info["loss"] > 0 and info["warnings"] == []
    # Outlier channels quantized first leave the most room to absorb their error: act_order helps a lot here.
    ordered, _ = gptq_quantize(weight, h, 4, group_size, symmetric, act_order=True)
    assert output_error(x, weight, ordered.dequantize()) / output_error(x, weight, rtn.dequantize()) < 0.4


@pytest.mark.parametrize(
    "group_size, symmetric, act_order, static_groups, block_size",
    [
        (32, True, False, False, 128),
        (32, False, False, False, 128),
        (128, True, False, False, 128),
        (-1, False, False, False, 128),
        (100, True, False, False, 128),  # K=256 is not a multiple: the last group has 56 channels
        (32, False, False, False, 7),  # blocks and groups misaligned
        (32, True, True, False, 128),
        (100, False, True, False, 48),
        (32, True, True, True, 128),
        (100, False, True, True, 128),
        (32, False, False, True, 128),
    ],
)
def test_blocked_matches_unblocked_reference(layer, group_size, symmetric, act_order, static_groups, block_size):
    _, weight, h = layer
    result, _ = gptq_quantize(
        weight, h, 4, group_size, symmetric, act_order=act_order, static_groups=static_groups, block_size=block_size
    )
    codes, scales, zeros = reference_gptq(
        weight, h, 4, group_size, symmetric, act_order=act_order, static_groups=static_groups
    )
    assert np.mean(result.q.astype(np.int64) == codes) > 0.999
    np.testing.assert_allclose(result.scales, scales, rtol=1e-5)
    if symmetric:
        assert result.zero_points is None
    else:
        assert np.mean(result.zero_points == zeros) > 0.999


@pytest.mark.parametrize("symmetric", [True, False])
def test_act_order_static_groups_keeps_the_standard_layout(layer, symmetric):
    x, weight, h = layer
    rtn = quantize_rtn(weight, 4, 32, symmetric)
    result, _ = gptq_quantize(weight, h, 4, 32, symmetric, act_order=True, static_groups=True)
    assert result.scales.shape == (K // 32, N) and result.n_groups == K // 32
    assert result.dequantize().shape == weight.shape
    # Static grids come from the original weight, group by group in channel order: exactly RTN's grids.
    np.testing.assert_array_equal(result.scales, rtn.scales)
    if not symmetric:
        np.testing.assert_array_equal(result.zero_points, rtn.zero_points)
    rtn_error = output_error(x, weight, rtn.dequantize())
    assert output_error(x, weight, result.dequantize()) / rtn_error < 0.4
    dynamic, _ = gptq_quantize(weight, h, 4, 32, symmetric, act_order=True)
    assert dynamic.scales.shape == (K // 32, N)
    assert output_error(x, weight, dynamic.dequantize()) / rtn_error < 0.4


@pytest.mark.parametrize("act_order", [False, True])
def test_k_not_divisible_by_group_size(act_order):
    x = make_inputs(k=200, t=1024, seed=3)
    weight = make_weight(k=200, n=48, seed=4)
    result, _ = gptq_quantize(weight, hessian_of(x), 4, 64, False, act_order=act_order)
    rtn = quantize_rtn(weight, 4, 64, False)
    assert result.scales.shape == rtn.scales.shape == (4, 48)
    assert result.dequantize().shape == (200, 48)
    assert output_error(x, weight, result.dequantize()) / output_error(x, weight, rtn.dequantize()) < 0.8


def test_diagonal_hessian_reduces_to_rtn():
    """Uncorrelated channels leave GPTQ nothing to compensate: codes and grids must be RTN's, bit for bit."""
    weight = make_weight(k=192, n=40, seed=5)
    h = np.diag(np.random.default_rng(6).uniform(0.5, 2.0, 192))
    for symmetric in (True, False):
        result, _ = gptq_quantize(weight, h, 4, 64, symmetric)
        rtn = quantize_rtn(weight, 4, 64, symmetric)
        np.testing.assert_array_equal(result.q, rtn.q)
        np.testing.assert_array_equal(result.scales, rtn.scales)
        if not symmetric:
            np.testing.assert_array_equal(result.zero_points, rtn.zero_points)


@pytest.mark.parametrize("bits", [3, 8])
def test_codes_stay_in_range(layer, bits):
    _, weight, h = layer
    for symmetric in (True, False):
        result, _ = gptq_quantize(weight, h, bits, 64, symmetric, act_order=True)
        qmin, qmax = integer_range(bits, symmetric)
        assert result.q.min() >= qmin and result.q.max() <= qmax


def test_rank_deficient_hessian_and_dead_channel():
    x = make_inputs(k=K, t=64, seed=7)  # 64 tokens for 256 channels: H has rank <= 64
    x[:, 10] = 0.0  # a channel never active in calibration
    weight = make_weight(seed=8)
    h = hessian_of(x)
    for kwargs in ({}, {"act_order": True}, {"act_order": True, "static_groups": True}):
        result, info = gptq_quantize(weight, h, 4, 32, False, n_samples=64, **kwargs)
        deq = result.dequantize()
        assert np.all(np.isfinite(deq)) and np.all(np.isfinite(result.scales))
        assert info["dead_channels"] == 1
        assert np.all(deq[10] == 0.0)
        assert any("never active" in w for w in info["warnings"])
        assert any("rank-deficient" in w for w in info["warnings"])
    # Without damping the factorization fails; damping is raised until it succeeds, and says so.
    result, info = gptq_quantize(weight, h, 4, 32, True, damp=0.0)
    assert np.all(np.isfinite(result.dequantize()))
    assert info["damp"] > 0
    assert any("not positive definite" in w for w in info["warnings"])


def test_deterministic_and_inputs_untouched(layer):
    _, weight, h = layer
    weight_before, h_before = weight.copy(), h.copy()
    first, info1 = gptq_quantize(weight, h, 4, 32, False, act_order=True)
    second, info2 = gptq_quantize(weight, h, 4, 32, False, act_order=True)
    np.testing.assert_array_equal(first.q, second.q)
    np.testing.assert_array_equal(first.scales, second.scales)
    np.testing.assert_array_equal(first.zero_points, second.zero_points)
    assert info1["loss"] == info2["loss"]
    np.testing.assert_array_equal(weight, weight_before)
    np.testing.assert_array_equal(h, h_before)


def test_rejects_bad_inputs(layer):
    _, weight, h = layer
    with pytest.raises(ValueError):
        gptq_quantize(weight, h[:-1, :-1], 4, 32, True)
    bad = h.copy()
    bad[0, 1] = np.nan
    with pytest.raises(ValueError):
        gptq_quantize(weight, bad, 4, 32, True)


def test_falls_back_to_rtn_when_no_damping_helps(layer, monkeypatch):
    import graphq.algorithms.gptq as gptq

    def never_positive_definite(h, out=None):
        raise np.linalg.LinAlgError("forced")

    monkeypatch.setattr(gptq, "_inverse_cholesky_upper", never_positive_definite)
    _, weight, h = layer
    result, info = gptq.gptq_quantize(weight, h, 4, 32, True)
    np.testing.assert_array_equal(result.q, quantize_rtn(weight, 4, 32, True).q)
    assert any("plain RTN" in w for w in info["warnings"]) and np.isfinite(info["damp"])


@pytest.mark.parametrize("act_order", [False, True])
def test_linears_sharing_an_input_can_be_quantized_as_one(layer, act_order):
    # quantize_region runs q/k/v (and gate/up) through GPTQ as one [K, N1+N2] weight; that must change no code.
    x, weight, h = layer
    other = np.random.default_rng(7).standard_normal((weight.shape[0], 24)).astype(np.float32)
    joined, _ = gptq_quantize(np.concatenate([weight, other], axis=1), h, 4, 32, False, act_order=act_order)
    for part, (start, stop) in ((weight, (0, weight.shape[1])), (other, (weight.shape[1], joined.shape[1]))):
        alone, _ = gptq_quantize(part, h, 4, 32, False, act_order=act_order)
        split = joined.output_columns(start, stop)
        np.testing.assert_array_equal(split.q, alone.q)
        np.testing.assert_array_equal(split.zero_points, alone.zero_points)
        np.testing.assert_allclose(split.scales, alone.scales, rtol=1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
def test_a_given_grid_is_kept_and_rounded_onto_with_feedback(layer, symmetric):
    """awq+gptq hands GPTQ AWQ's clipped grid: the scales and zero points are kept as given, the codes stay in
    range, and the error feedback still beats rounding to nearest on that grid."""
    from graphq.algorithms.awq import quantize_with_clip, search_awq_clip

    x, weight, h = layer
    clip, _ = search_awq_clip(x, weight, 3, 32, symmetric)
    grid = quantize_with_clip(weight, clip, 3, 32, symmetric)
    result, _ = gptq_quantize(weight, h, 3, 32, symmetric, grid=grid)
    np.testing.assert_array_equal(result.scales, grid.scales)
    if not symmetric:
        np.testing.assert_array_equal(result.zero_points, grid.zero_points)
    qmin, qmax = integer_range(3, symmetric)
    assert result.q.min() >= qmin and result.q.max() <= qmax
    assert output_error(x, weight, result.dequantize()) < 0.8 * output_error(x, weight, grid.dequantize())
    with pytest.raises(ValueError, match="given grid"):
        gptq_quantize(weight, h, 3, 64, symmetric, grid=grid)
