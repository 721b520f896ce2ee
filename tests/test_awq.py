"""AWQ math: scale search never loses to RTN, folding is exact, clip search helps heavy tails, RTN conventions."""

from __future__ import annotations

import numpy as np
import pytest

from graphq.algorithms.awq import (
    ChannelMagnitude,
    ChannelRange,
    InputGram,
    activation_channel_magnitude,
    awq_scales_for_ratio,
    clip_weight,
    fold_scales_into_norm,
    gram_diagonal_blocks,
    quantize_with_clip,
    scale_diagonal_blocks,
    scale_weight_columns,
    scale_weight_rows,
    scaled_quantization_error,
    search_awq_clip,
    search_awq_scales,
)
from graphq.algorithms.rtn import compute_scales, quantize_rtn

K = 128


def make_inputs(t: int = 512, outliers: bool = True, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, K)).astype(np.float32)
    if outliers:
        x[:, [3, 40, 77, 100]] *= 30.0  # a few salient channels, as after an LLM's norms
    return x


def make_weights(n_out=(96, 64), seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((K, n)) * 0.05).astype(np.float32) for n in n_out]


def output_error(x, weight, deq) -> float:
    return float(np.sum((x.astype(np.float64) @ (weight.astype(np.float64) - deq.astype(np.float64))) ** 2))


def test_channel_magnitude_streams_mean_abs():
    x = make_inputs(t=300)
    magnitude = ChannelMagnitude()
    magnitude.add(x[:100].reshape(2, 50, K))
    magnitude.add(x[100:])
    assert magnitude.tokens == 300
    np.testing.assert_allclose(magnitude.mean(), np.abs(x.astype(np.float64)).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(activation_channel_magnitude([x[:10], x[10:]]), magnitude.mean(), rtol=1e-12)
    with pytest.raises(ValueError):
        ChannelMagnitude().mean()


def test_channel_range_streams_min_max():
    x = make_inputs(t=300)
    stream = ChannelRange()
    for chunk in (x[:7], x[7:200].reshape(1, -1, K), x[200:]):
        stream.add(chunk)
    low, high = stream.ranges()
    np.testing.assert_array_equal(low, x.min(axis=0))
    np.testing.assert_array_equal(high, x.max(axis=0))
    with pytest.raises(ValueError, match="channels"):
        stream.add(np.zeros((2, K + 1)))
    with pytest.raises(ValueError):
        ChannelRange().ranges()


@pytest.mark.parametrize("symmetric", [False, True])
def test_static_activation_scoring(symmetric):
    """With ``act_range`` (static W4A8) the error is || x W - Q_a(x / s) Q_w(s W) ||^2 with Q_a the per-tensor int8
    grid over the range of x / s, computed directly here; the search then minimises that error (never above
    ratio 0's, nor above the weight-only search's scales scored the same way), and the extremes of the range,
    not just the sample's, set the grid."""
    from graphq.algorithms.grid import fake_quantize_range

    x = make_inputs(t=256)
    x[0, 3] = 400.0  # an attention-sink-like token: the calibration range sees it, the search sample may not
    weights = make_weights()
    act_range = (x.min(axis=0), x.max(axis=0))
    sample = x[1:]
    s = awq_scales_for_ratio(np.abs(sample).mean(axis=0), 0.5)
    xq = fake_quantize_range(sample / s, float((act_range[0] / s).min()), float((act_range[1] / s).max()))
    direct = sum(np.sum((sample @ w - xq @ quantize_rtn(w * s[:, None], 4, 32, symmetric).dequantize()) ** 2,
                        dtype=np.float64) for w in weights)
    got = scaled_quantization_error(sample, weights, s, 4, 32, symmetric, act_range)
    assert got == pytest.approx(direct, rel=1e-5)
    assert got > scaled_quantization_error(sample, weights, s, 4, 32, symmetric)  # the input grid costs too
    plain, _ = search_awq_scales(sample, weights, 4, 32, symmetric)
    scales, info = search_awq_scales(sample, weights, 4, 32, symmetric, act_range=act_range)
    assert info["error"] <= info["error_rtn"]
    assert info["error"] <= scaled_quantization_error(sample, weights, plain, 4, 32, symmetric, act_range)
    assert info["error_rtn"] == pytest.approx(
        scaled_quantization_error(sample, weights, np.ones(K, np.float32), 4, 32, symmetric, act_range))
    # The sink's range: without it the same scales would look cheaper (a finer activation grid).
    narrow = (sample.min(axis=0), sample.max(axis=0))
    assert scaled_quantization_error(sample, weights, scales, 4, 32, symmetric, narrow) < info["error"]


def test_smoothquant_candidates_join_the_static_search():
    """Rare spikes (a channel huge on a few tokens) set the per-tensor range but barely move mean |x|: SmoothQuant's
    max-based scales, scored on the same grids, beat every AWQ ratio there and win; without act_range refused."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, K)).astype(np.float32)
    x[::50, 5], x[::70, 60] = 300.0, -200.0
    weights = make_weights()
    act_range = (x.min(axis=0), x.max(axis=0))
    _, awq_only = search_awq_scales(x, weights, 4, 32, False, act_range=act_range)
    scales, info = search_awq_scales(x, weights, 4, 32, False, act_range=act_range, smooth_alphas=(0.2, 0.4, 0.6))
    assert info["smooth_alpha"] in (0.2, 0.4, 0.6) and info["ratio"] is None
    assert info["error"] < awq_only["error"]
    assert info["error"] == pytest.approx(scaled_quantization_error(x, weights, scales, 4, 32, False, act_range))
    with pytest.raises(ValueError, match="act_range"):
        search_awq_scales(x, weights, 4, 32, False, smooth_alphas=(0.5,))


def test_ratio_zero_is_exactly_rtn():
    x, weights = make_inputs(), make_weights()
    ones = awq_scales_for_ratio(np.abs(x).mean(axis=0), 0.0)
    np.testing.assert_array_equal(ones, np.ones(K, np.float32))
    for weight in weights:
        np.testing.assert_array_equal(scale_weight_rows(weight, ones), weight)
    expected = sum(output_error(x, w, quantize_rtn(w, 4, 32, True).dequantize()) for w in weights)
    assert scaled_quantization_error(x, weights, ones, 4, 32, True) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
def test_scale_search_never_worse_than_rtn(symmetric, group_size):
    weights = make_weights()
    for outliers in (False, True):
        x = make_inputs(outliers=outliers, seed=2)
        scales, info = search_awq_scales(x, weights, 4, group_size, symmetric)
        assert scales.shape == (K,) and scales.dtype == np.float32 and np.all(scales > 0)
        assert info["error"] <= info["error_rtn"] == info["errors"][0]
        assert info["error"] == pytest.approx(
            scaled_quantization_error(x, weights, scales, 4, group_size, symmetric), rel=1e-6
        )
        if outliers:
            assert info["error"] < 0.8 * info["error_rtn"] and info["ratio"] > 0
            assert scales[[3, 40, 77, 100]].min() > np.median(scales)
    x = make_inputs(seed=2)
    _, info = search_awq_scales(x, weights, 4, group_size, symmetric, duo_scaling=True)
    assert info["error"] <= info["error_rtn"]


def test_scale_search_uses_given_magnitude():
    x, weights = make_inputs(), make_weights()
    magnitude = np.ones(K)  # flat magnitude: every grid point is s = 1
    scales, info = search_awq_scales(x, weights, 4, 32, True, x_magnitude=magnitude)
    np.testing.assert_allclose(scales, 1.0, rtol=1e-6)
    assert info["error"] == pytest.approx(info["error_rtn"], rel=1e-6)


def test_folding_is_exact_in_float():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, K)).astype(np.float32)
    s = awq_scales_for_ratio(np.abs(make_inputs()).mean(axis=0), 0.7)
    weight = make_weights()[0]
    reference = x.astype(np.float64) @ weight.astype(np.float64)

    # Consumer rows times s, its input divided by s.
    folded = (x / s).astype(np.float32) @ scale_weight_rows(weight, s)
    np.testing.assert_allclose(folded, reference, rtol=1e-4, atol=1e-5)

    # RMSNorm gain divided by s.
    gain = rng.uniform(0.5, 1.5, K).astype(np.float32)
    normed = x / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + 1e-6)
    expected = (normed * gain).astype(np.float64) @ weight.astype(np.float64)
    got = (normed * fold_scales_into_norm(gain, s)) @ scale_weight_rows(weight, s)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)

    # A previous linear (with bias) producing the input: its output columns divided by s.
    previous = (rng.standard_normal((32, K)) * 0.1).astype(np.float32)
    bias = rng.standard_normal(K).astype(np.float32)
    h = rng.standard_normal((64, 32)).astype(np.float32)
    expected = (h.astype(np.float64) @ previous + bias) @ weight.astype(np.float64)
    new_previous, new_bias = scale_weight_columns(previous, s, bias)
    got = (h @ new_previous + new_bias) @ scale_weight_rows(weight, s)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert new_previous.dtype == np.float32 and new_bias.dtype == np.float32
    assert scale_weight_columns(previous, s)[1] is None


def heavy_tailed_weight(k: int = K, n: int = 96, seed: int = 4) -> np.ndarray:
    return (np.random.default_rng(seed).standard_t(df=2.0, size=(k, n)) * 0.02).astype(np.float32)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 48, -1])  # 48 does not divide K=128
def test_clip_search_reduces_output_error(symmetric, group_size):
    x = make_inputs(outliers=False, seed=5)
    weight = heavy_tailed_weight()
    clip, info = search_awq_clip(x, weight, 4, group_size, symmetric)
    n_groups = 1 if group_size == -1 else -(-K // group_size)
    assert clip.low.shape == clip.high.shape == clip.shrink.shape == (n_groups, weight.shape[1])
    assert np.all(clip.low <= clip.high) and np.all(clip.shrink <= 1.0) and np.all(clip.shrink >= 0.5)
    assert info["error"] < info["error_noclip"]
    clipped = quantize_with_clip(weight, clip, 4, group_size, symmetric)
    rtn = quantize_rtn(weight, 4, group_size, symmetric)
    assert clipped.scales.shape == rtn.scales.shape and clipped.q.dtype == rtn.q.dtype
    assert output_error(x, weight, clipped.dequantize()) < output_error(x, weight, rtn.dequantize())
    # The grids follow RTN's own rules on the clamped weight.
    scales, zeros = compute_scales(clip_weight(weight, clip), 4, clipped.group_size, symmetric)
    np.testing.assert_array_equal(clipped.scales, scales)
    if not symmetric:
        np.testing.assert_array_equal(clipped.zero_points, zeros)


@pytest.mark.parametrize("symmetric", [True, False])
def test_no_clipping_is_exactly_rtn(symmetric):
    x = make_inputs(seed=6)
    weight = heavy_tailed_weight(seed=7)
    clip, info = search_awq_clip(x, weight, 4, 48, symmetric, max_shrink=0.0)
    assert np.all(clip.shrink == 1.0) and info["error"] == info["error_noclip"]
    np.testing.assert_array_equal(clip_weight(weight, clip), weight)
    got = quantize_with_clip(weight, clip, 4, 48, symmetric)
    rtn = quantize_rtn(weight, 4, 48, symmetric)
    np.testing.assert_array_equal(got.q, rtn.q)
    np.testing.assert_array_equal(got.scales, rtn.scales)
    if not symmetric:
        np.testing.assert_array_equal(got.zero_points, rtn.zero_points)
    with pytest.raises(ValueError):
        quantize_with_clip(weight, clip, 4, 32, symmetric)


def test_clip_search_subsamples_tokens():
    x = make_inputs(t=2000, seed=8)
    _, info = search_awq_clip(x, heavy_tailed_weight(), 4, 32, True, max_tokens=256)
    assert info["tokens"] == 256


def test_input_gram_streams_and_skips_wide_inputs():
    x = make_inputs(t=300)
    gram = InputGram()
    for chunk in (x[:7], x[7:200].reshape(1, -1, K), x[200:]):
        gram.add(chunk)
    assert gram.tokens == 300
    exact = x.astype(np.float64).T @ x / 300
    np.testing.assert_allclose(gram.gram(), exact, rtol=1e-5, atol=1e-6 * np.abs(exact).max())
    # The worker path (partial terms merged in order) gives the same bits as add.
    merged = InputGram()
    for chunk in (x[:7], x[7:200], x[200:]):
        merged.merge(merged.partial(chunk), len(chunk))
    np.testing.assert_array_equal(merged.gram(), gram.gram())
    wide = InputGram(max_channels=K - 1)
    wide.add(x)
    assert wide.gram() is None and InputGram().gram() is None


@pytest.mark.parametrize("symmetric", [True, False])
def test_gram_scores_the_same_error_as_every_token(symmetric):
    """The Gram matrix of all tokens scores a candidate as the mean output error over those tokens, so the scale
    search picks the same ratio as one over every token and the clip search the same factors, without the tokens."""
    x, weights = make_inputs(t=400, seed=9), make_weights()
    gram = InputGram()
    gram.add(x)
    g = gram.gram()
    s = awq_scales_for_ratio(np.abs(x).mean(axis=0), 0.6)
    assert scaled_quantization_error(None, weights, s, 4, 32, symmetric, gram=g) == pytest.approx(
        scaled_quantization_error(x, weights, s, 4, 32, symmetric) / len(x), rel=1e-4)
    by_tokens, info_tokens = search_awq_scales(x, weights, 4, 32, symmetric)
    by_gram, info_gram = search_awq_scales(None, weights, 4, 32, symmetric, x_magnitude=np.abs(x).mean(axis=0, dtype=np.float64),
                                           gram=g)
    assert info_gram["ratio"] == info_tokens["ratio"] and info_tokens["ratio"] > 0
    np.testing.assert_allclose(info_gram["errors"], np.array(info_tokens["errors"]) / len(x), rtol=1e-4)
    np.testing.assert_array_equal(by_gram, by_tokens)
    with pytest.raises(ValueError, match="x_magnitude and gram"):
        search_awq_scales(None, weights, 4, 32, symmetric, gram=g)
    weight = heavy_tailed_weight(seed=10)
    clip_tokens, _ = search_awq_clip(x, weight, 4, 48, symmetric, max_tokens=len(x))
    clip_gram, info = search_awq_clip(None, weight, 4, 48, symmetric, gram=g)
    assert info["tokens"] is None and info["error"] < info["error_noclip"]
    assert np.mean(clip_gram.shrink == clip_tokens.shrink) > 0.98  # float rounding may split a near tie
    with pytest.raises(ValueError, match="gram"):
        search_awq_clip(None, weight, 4, 48, symmetric, gram=g[:-1, :-1])


@pytest.mark.parametrize("symmetric", [True, False])
def test_coarse_to_fine_search_matches_the_whole_grid(symmetric):
    """Scoring every 4th candidate and then the ones around the best finds the ratio scoring the whole grid finds
    (the error is unimodal along it), with 12 of the 20 ratios scored; per group and channel the clip error is
    jagged along its grid, so a few choices differ, for a total error within a percent of the whole grid's."""
    x, weights = make_inputs(seed=11), make_weights()
    full, info_full = search_awq_scales(x, weights, 4, 32, symmetric, coarse_step=1)
    fast, info_fast = search_awq_scales(x, weights, 4, 32, symmetric)
    assert info_fast["ratio"] == info_full["ratio"] and info_full["ratio"] > 0
    np.testing.assert_array_equal(fast, full)
    scored = ~np.isnan(info_fast["errors"])
    assert scored.sum() <= 12 and not np.isnan(info_full["errors"]).any()
    np.testing.assert_array_equal(np.array(info_fast["errors"])[scored], np.array(info_full["errors"])[scored])
    weight = heavy_tailed_weight(seed=12)
    clip_full, full_info = search_awq_clip(x, weight, 4, 32, symmetric, coarse_step=1)
    clip_fast, fast_info = search_awq_clip(x, weight, 4, 32, symmetric)
    assert np.mean(clip_fast.shrink == clip_full.shrink) > 0.9 and len(np.unique(clip_full.shrink)) > 3
    assert full_info["error"] <= fast_info["error"] <= full_info["error"] * 1.01
    assert fast_info["error_noclip"] == full_info["error_noclip"]


def exact_blocks(x: np.ndarray, group_size: int) -> np.ndarray:
    k = x.shape[1]
    n_groups = -(-k // group_size)
    padded = np.zeros((len(x), n_groups * group_size))
    padded[:, :k] = x
    by_group = padded.reshape(len(x), n_groups, group_size)
    return np.einsum("tgi,tgj->gij", by_group, by_group) / len(x)


def test_input_gram_keeps_the_diagonal_blocks_of_wide_inputs():
    """An input too wide for its whole Gram keeps the diagonal blocks every group size below 128 needs, streamed and
    merged like the whole one; a narrow input gives the same blocks cut from its whole Gram."""
    rng = np.random.default_rng(20)
    x = (rng.standard_normal((250, 300)) * rng.uniform(0.1, 5.0, 300)).astype(np.float32)
    wide, narrow = InputGram(max_channels=256), InputGram()
    for chunk in (x[:60], x[60:]):
        wide.add(chunk)
        narrow.add(chunk)
    assert wide.gram() is None and narrow.gram() is not None
    for group_size in (32, 64, 128):
        exact = exact_blocks(x, group_size)
        assert wide.diagonal_blocks(group_size, 300).shape == exact.shape == (-(-300 // group_size), group_size, group_size)
        for kept in (wide.diagonal_blocks(group_size, 300), narrow.diagonal_blocks(group_size, 300)):
            np.testing.assert_allclose(kept, exact, rtol=1e-4, atol=1e-5 * np.abs(exact).max())
        np.testing.assert_array_equal(narrow.diagonal_blocks(group_size, 300),
                                      gram_diagonal_blocks(narrow.gram(), group_size))
    assert wide.diagonal_blocks(48, 300) is None and wide.diagonal_blocks(-1, 300) is None  # not kept
    np.testing.assert_array_equal(narrow.diagonal_blocks(-1, 300)[0], narrow.gram())  # per channel: one whole group
    assert narrow.diagonal_blocks(48, 300).shape == (7, 48, 48)
    assert InputGram().diagonal_blocks(32, 300) is None
    s = rng.uniform(0.5, 2.0, 300).astype(np.float32)
    np.testing.assert_allclose(scale_diagonal_blocks(exact_blocks(x, 64), s), exact_blocks(x / s, 64), rtol=1e-4,
                               atol=1e-6 * np.abs(exact_blocks(x / s, 64)).max())


@pytest.mark.parametrize("symmetric", [True, False])
def test_block_diagonal_scoring_is_each_groups_own_output_error(symmetric):
    """With the Gram's diagonal blocks a candidate scores sum_g ||x_g D_g||^2 / T, each weight group's share of the
    output error over every token (cross-group terms left out); the search still finds the salient channels' ratio,
    and the clip search scores exactly as with the whole Gram."""
    x, weights = make_inputs(t=400, seed=21), make_weights()
    gram = InputGram()
    gram.add(x)
    blocks = gram.diagonal_blocks(32, K)
    s = awq_scales_for_ratio(np.abs(x).mean(axis=0), 0.5)
    expected = 0.0
    for weight in weights:
        diff = weight - quantize_rtn(weight * s[:, None], 4, 32, symmetric).dequantize() / s[:, None]
        for g in range(K // 32):
            rows = slice(32 * g, 32 * (g + 1))
            expected += float(np.sum((x[:, rows].astype(np.float64) @ diff[rows]) ** 2)) / len(x)
    assert scaled_quantization_error(None, weights, s, 4, 32, symmetric, gram_blocks=blocks) == pytest.approx(
        expected, rel=1e-4)
    magnitude = np.abs(x).mean(axis=0, dtype=np.float64)
    _, info = search_awq_scales(None, weights, 4, 32, symmetric, x_magnitude=magnitude, gram_blocks=blocks)
    assert info["ratio"] > 0 and info["error"] < info["error_rtn"]
    weight = heavy_tailed_weight(seed=22)
    by_gram, info_gram = search_awq_clip(None, weight, 4, 32, symmetric, gram=gram.gram())
    by_blocks, info_blocks = search_awq_clip(None, weight, 4, 32, symmetric, gram_blocks=blocks)
    np.testing.assert_array_equal(by_blocks.shrink, by_gram.shrink)
    assert info_blocks["error"] == info_gram["error"]
    with pytest.raises(ValueError, match="do not cover"):
        search_awq_scales(None, weights, 4, 32, symmetric, x_magnitude=magnitude, gram_blocks=blocks[:-1])
    with pytest.raises(ValueError, match="in groups of 64"):
        search_awq_scales(None, weights, 4, 64, symmetric, x_magnitude=magnitude, gram_blocks=blocks)


@pytest.mark.parametrize("symmetric", [True, False])
def test_clipped_fake_quantize_is_rtn_of_the_clamped_weight_bit_for_bit(symmetric):
    from graphq.algorithms.awq import _clip_grouped, _clipped_fake_quantize
    from graphq.algorithms.grid import fake_quantize_groups, grouped

    weight = heavy_tailed_weight(seed=23)
    weight[:, 5] = np.abs(weight[:, 5])  # a channel of one sign: its grid starts at 0
    weight[:, 6] = 0.0
    groups = grouped(weight, 48)  # a partial last group: zero padding
    base_low, base_high = (-np.abs(groups).max(axis=1), np.abs(groups).max(axis=1)) if symmetric else (
        groups.min(axis=1), groups.max(axis=1))
    for factor in (1.0, 0.85, 0.5, np.linspace(0.5, 1.0, groups.shape[2])[None, :]):
        low, high = (base_low * factor).astype(np.float32), (base_high * factor).astype(np.float32)
        np.testing.assert_array_equal(_clipped_fake_quantize(groups, low, high, 4, symmetric),
                                      fake_quantize_groups(_clip_grouped(groups, low, high), 4, symmetric))
