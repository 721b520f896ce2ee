"""Anti-outlier smoothing math (pure numpy): SmoothQuant scales, Outlier Suppression+ shift and scale, alpha search.

A few input channels of an LLM's linears carry activations 10-100x larger than the rest, so one per-tensor int8
activation scale wastes most of its levels on them. Smoothing rewrites a group of linears sharing an input x as

    x W + b  ==  ((x - z) / s) (diag(s) W) + (b + z W)

with a per-input-channel scale s > 0 (and, for OS+, a shift z), which moves the outliers' magnitude from the
activations into the weights (quantized per output channel, where it hurts less). The graph plumbing that folds
1/s and z into the producer of x lives in ``graphq.passes.smooth``; this module computes s, z and the alpha.

- SmoothQuant (Xiao et al., 2023): ``s_k = max|x_k|^alpha / max|W_k|^(1 - alpha)``, max|W_k| over every output
  channel of every linear reading x. alpha = 0.5 balances activation and weight ranges.
- OS+ (Wei et al., 2023): ``z_k = (max x_k + min x_k) / 2`` centres each channel (asymmetric channels, e.g. after
  LayerNorm biases, stop wasting half the range), then the scale. Choice made here: the SmoothQuant formula applied
  to the shifted range, ``s_k = ((max x_k - min x_k) / 2)^alpha / max|W_k|^(1 - alpha)``, with the same alpha
  search, rather than the OS+ paper's search of one clipping threshold t (s_k = max(1, range_k / t)). Both put the
  outlier channels' excess into the weights; the formula shares the search and the tests with SmoothQuant, and with
  alpha searched per group it covers the paper's intent (one knob per group chosen by output error).
- ``search_alpha`` tries alpha on a grid and keeps the one with the lowest output error of the whole group after
  fake quantization on exactly the grids the emitters use (``graphq.algorithms.grid``): weights on each linear's
  own ``WeightGrid`` (default W8A8's int8 per output channel, symmetric, the extreme on -128; a W4A8 layer's int4
  per-group grid, so the search sees that scaling a weight row up coarsens its whole group); activations
  per-tensor asymmetric (256 levels, zero point),
  or per token symmetric (absmax / 127) for W8A8 dynamic; per-tensor range = min/max over all calibration data (the statistics'
  channel min/max, transformed) widened to include 0, as onnxruntime's QuantizeLinear needs.

Example (no graph needed)::

    import numpy as np
    from graphq.algorithms.smoothing import InputChannelStats, search_alpha, smoothing_factors

    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 64)).astype(np.float32)
    x[:, 5] *= 50.0                                   # an outlier channel
    weights = [rng.standard_normal((64, 32)).astype(np.float32) * 0.05]
    stats = InputChannelStats.from_rows(x)
    alpha, info = search_alpha(stats, weights, "smoothquant")
    shift, scale = smoothing_factors(stats, weights, "smoothquant", alpha)
    x_smooth = (x - shift) / scale                    # what the smoothed graph feeds the linears
    w_smooth = weights[0] * scale[:, None]            # x @ W == x_smooth @ w_smooth (+ shift @ W)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from graphq.algorithms.grid import fake_quantize_per_token, fake_quantize_range, fake_quantize_weight

METHODS = ("smoothquant", "os+")
DEFAULT_ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(21))  # 0.0, 0.05, ..., 1.0
COARSE_ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(11))  # the default search's first pass
FINE_ALPHA_STEP = 0.05
# Scales are clamped to this range: a channel the calibration never saw active, or whose weights are all zero,
# must not get a zero or infinite scale (it would turn the folded norm weight into inf or 0).
_SCALE_MIN = 1e-5
_SCALE_MAX = 1e5


@dataclass(frozen=True)
class WeightGrid:
    """The grid a linear's weight will be rounded onto: ``bits``, ``group_size`` input channels per scale (-1: per
    output channel), ``symmetric``. The alpha search scores each linear on its own grid (RTN, the weight stage's
    starting point): int8 per channel for W8A8, int4 per group for W4A8, where smoothing's large scales cost more."""

    bits: int = 8
    group_size: int = -1
    symmetric: bool = True

    def fake_quantize(self, weight_kn: np.ndarray) -> np.ndarray:
        return fake_quantize_weight(weight_kn, self.bits, self.group_size, self.symmetric)

    def describe(self) -> str:
        group = "per channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"int{self.bits} {group} {'sym' if self.symmetric else 'asym'}"


INT8_PER_CHANNEL = WeightGrid()


@dataclass
class InputChannelStats:
    """Calibration statistics of one linear input x [..., K]: per-channel min/max over every token seen, and a
    bounded sample of input rows ``tokens`` [T, K] that the alpha search evaluates the output error on."""

    channel_min: np.ndarray
    channel_max: np.ndarray
    tokens: np.ndarray

    def __post_init__(self) -> None:
        self.channel_min = np.asarray(self.channel_min, dtype=np.float32).reshape(-1)
        self.channel_max = np.asarray(self.channel_max, dtype=np.float32).reshape(-1)
        k = self.channel_min.shape[0]
        self.tokens = np.asarray(self.tokens, dtype=np.float32).reshape(-1, k)
        if self.channel_max.shape != (k,):
            raise ValueError(f"channel_min has {k} channels but channel_max has {self.channel_max.shape[0]}")
        if np.any(self.channel_min > self.channel_max):
            raise ValueError("channel_min exceeds channel_max for some channels")

    @property
    def channels(self) -> int:
        return int(self.channel_min.shape[0])

    def absmax(self) -> np.ndarray:
        """max |x| per channel [K]."""
        return np.maximum(np.abs(self.channel_min), np.abs(self.channel_max))

    @classmethod
    def from_rows(
        cls, chunks: np.ndarray | Iterable[np.ndarray], max_tokens: int = 512, seed: int = 0
    ) -> "InputChannelStats":
        """Statistics of input rows given as one array or as chunks [..., K] (see ``ChannelStatsAccumulator``)."""
        if isinstance(chunks, np.ndarray):
            chunks = [chunks]
        accumulator = ChannelStatsAccumulator(max_tokens, seed)
        for chunk in chunks:
            accumulator.add(chunk)
        return accumulator.result()

    def transformed(self, shift: np.ndarray, scale: np.ndarray) -> "InputChannelStats":
        """The statistics of (x - shift) / scale, the input the smoothed linears read (scale > 0)."""
        shift = np.asarray(shift, dtype=np.float64)
        scale = np.asarray(scale, dtype=np.float64)
        return InputChannelStats(
            ((self.channel_min - shift) / scale).astype(np.float32),
            ((self.channel_max - shift) / scale).astype(np.float32),
            ((self.tokens - shift) / scale).astype(np.float32),
        )


class ChannelStatsAccumulator:
    """Streams input rows into per-channel min/max and a seeded uniform sample of at most ``max_tokens`` rows
    (reservoir sampling), so calibration never keeps more than the sample; ``result()`` -> InputChannelStats."""

    def __init__(self, max_tokens: int = 512, seed: int = 0) -> None:
        self.max_tokens = max_tokens
        self.rng = np.random.default_rng(seed)
        self.low: np.ndarray | None = None
        self.high: np.ndarray | None = None
        self.reservoir: np.ndarray | None = None
        self.seen = 0

    def add(self, chunk: np.ndarray) -> None:
        rows = np.asarray(chunk, dtype=np.float32)
        rows = rows.reshape(-1, rows.shape[-1])
        if self.low is None:
            self.low, self.high = rows.min(axis=0), rows.max(axis=0)
            self.reservoir = np.empty((0, rows.shape[1]), dtype=np.float32)
        elif rows.shape[1] != self.low.shape[0]:
            raise ValueError(f"expected {self.low.shape[0]} input channels, got {rows.shape[1]}")
        else:
            self.low = np.minimum(self.low, rows.min(axis=0))
            self.high = np.maximum(self.high, rows.max(axis=0))
        # Algorithm R, vectorised per chunk: row number i (0-based) replaces a random slot with probability
        # max_tokens / (i + 1), so every row seen so far is kept with equal probability.
        free = max(0, self.max_tokens - len(self.reservoir))
        if free:
            self.reservoir = np.concatenate([self.reservoir, rows[:free]])
        if len(rows) > free:
            positions = self.seen + free + np.arange(len(rows) - free)
            slots = (self.rng.random(len(positions)) * (positions + 1)).astype(np.int64)
            keep = slots < self.max_tokens
            self.reservoir[slots[keep]] = rows[free:][keep]
        self.seen += len(rows)

    def result(self) -> InputChannelStats:
        if self.low is None:
            raise ValueError("no activations were given")
        return InputChannelStats(self.low.copy(), self.high.copy(), self.reservoir.copy())


def weight_absmax(weights_kn: Sequence[np.ndarray]) -> np.ndarray:
    """max |W[k, n]| per input channel k [K], over every output column of every linear sharing the input."""
    if not weights_kn:
        raise ValueError("need at least one weight")
    k = np.shape(weights_kn[0])[0]
    if any(np.shape(w)[0] != k for w in weights_kn):
        raise ValueError("all weights must share the input dimension K")
    return np.max([np.abs(np.asarray(w, dtype=np.float32)).max(axis=1) for w in weights_kn], axis=0)


def smoothquant_scales(act_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """s = max|x|^alpha / max|W|^(1 - alpha) per input channel [K] (float32).

    A channel whose activations or weights are all zero gets s = 1: there is nothing to balance, and the
    formula would give 0 or inf there. The rest is clamped to [1e-5, 1e5]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    a = np.asarray(act_absmax, dtype=np.float64)
    w = np.asarray(w_absmax, dtype=np.float64)
    if a.shape != w.shape:
        raise ValueError(f"activation statistics have {a.shape} channels, weights {w.shape}")
    dead = (a <= 0) | (w <= 0) | ~np.isfinite(a) | ~np.isfinite(w)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.power(np.where(dead, 1.0, a), alpha) / np.power(np.where(dead, 1.0, w), 1.0 - alpha)
    s = np.where(dead, 1.0, np.clip(s, _SCALE_MIN, _SCALE_MAX))
    return s.astype(np.float32)


def os_plus_shift(channel_min: np.ndarray, channel_max: np.ndarray) -> np.ndarray:
    """OS+ channel shift z = (max + min) / 2 [K]: the shifted channel is symmetric around 0."""
    low = np.asarray(channel_min, dtype=np.float64)
    high = np.asarray(channel_max, dtype=np.float64)
    return ((high + low) / 2.0).astype(np.float32)


def os_plus_scales(
    channel_min: np.ndarray, channel_max: np.ndarray, w_absmax: np.ndarray, alpha: float
) -> np.ndarray:
    """OS+ scale: the SmoothQuant formula on the shifted range, max|x - z| = (max - min) / 2."""
    half_range = (np.asarray(channel_max, dtype=np.float64) - np.asarray(channel_min, dtype=np.float64)) / 2.0
    return smoothquant_scales(half_range, w_absmax, alpha)


def smoothing_factors(
    stats: InputChannelStats, weights_kn: Sequence[np.ndarray], method: str, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """(shift z, scale s), both [K] float32, for a group of linears sharing the input; z = 0 for SmoothQuant."""
    w_max = weight_absmax(weights_kn)
    if w_max.shape[0] != stats.channels:
        raise ValueError(f"statistics have {stats.channels} channels, weights {w_max.shape[0]} input rows")
    if method == "smoothquant":
        return np.zeros(stats.channels, dtype=np.float32), smoothquant_scales(stats.absmax(), w_max, alpha)
    if method == "os+":
        return (
            os_plus_shift(stats.channel_min, stats.channel_max),
            os_plus_scales(stats.channel_min, stats.channel_max, w_max, alpha),
        )
    raise ValueError(f"unknown smoothing method {method!r}; expected one of {', '.join(METHODS)}")


def w8a8_output_error(
    stats: InputChannelStats,
    weights_kn: Sequence[np.ndarray],
    shift: np.ndarray,
    scale: np.ndarray,
    weight_bits: int = 8,
    per_token: bool = False,
    weight_grids: Sequence[WeightGrid] | None = None,
) -> float:
    """Relative output error of the group after smoothing by (shift, scale) and W8A8 fake quantization:

        sum_linears ||x W - (Q_a(x') Q_w(W') + z W)||^2 / sum_linears ||x W||^2,  x' = (x - z)/s,  W' = diag(s) W

    on ``stats.tokens``; since x W == x' W' + z W exactly, the error is ||(x W - z W) - Q_a(x') Q_w(W')||^2. The
    activation range is the per-tensor min/max of x' over all calibration data (from the channel min/max), or with
    ``per_token`` each token's own min/max (dynamic per-token activations). ``weight_grids`` (one per linear)
    replaces the int8 per-channel weight grid of ``weight_bits`` bits."""
    products = GroupProducts(stats, weights_kn, weight_grids)
    return products.error(shift, scale, weight_bits, per_token)


class GroupProducts:
    """The float outputs x W of a group on the token sample, computed once: every error evaluation (each alpha,
    the unsmoothed baseline) then pays one product, Q_a(x') Q_w(W'), per linear. ``weight_grids``: each linear's
    weight grid (``WeightGrid``); None: int8 per output channel (or ``weight_bits`` per channel, see ``error``)."""

    def __init__(self, stats: InputChannelStats, weights_kn: Sequence[np.ndarray],
                 weight_grids: Sequence[WeightGrid] | None = None) -> None:
        self.stats = stats
        self.weights = [np.asarray(w, dtype=np.float32) for w in weights_kn]
        if weight_grids is not None and len(weight_grids) != len(self.weights):
            raise ValueError(f"{len(weight_grids)} weight grids for {len(self.weights)} weights")
        self.grids = list(weight_grids) if weight_grids is not None else None
        # float32 products: their rounding (~1e-7 relative) is far below the int8 error being measured.
        self.outputs = [stats.tokens @ w for w in self.weights]
        self.norm = sum(float(np.sum(np.square(y, dtype=np.float64))) for y in self.outputs)

    def error(
        self, shift: np.ndarray, scale: np.ndarray, weight_bits: int = 8, per_token: bool = False
    ) -> float:
        smoothed = self.stats.transformed(shift, scale)
        if per_token:
            xq = fake_quantize_per_token(smoothed.tokens)
        else:
            low, high = float(smoothed.channel_min.min()), float(smoothed.channel_max.max())
            xq = fake_quantize_range(smoothed.tokens, low, high)
        z = np.asarray(shift, dtype=np.float32)
        s = np.asarray(scale, dtype=np.float32)[:, None]
        error = 0.0
        grids = self.grids or [WeightGrid(bits=weight_bits)] * len(self.weights)
        for w, y, grid in zip(self.weights, self.outputs, grids):
            wq = grid.fake_quantize(w * s)
            target = y - z @ w if z.any() else y
            error += float(np.sum(np.square(target - xq @ wq, dtype=np.float64)))
        return error / max(self.norm, 1e-30)


def search_alpha(
    stats: InputChannelStats,
    weights_kn: Sequence[np.ndarray],
    method: str = "smoothquant",
    grid: Sequence[float] | None = None,
    weight_bits: int = 8,
    per_token: bool = False,
    weight_grids: Sequence[WeightGrid] | None = None,
) -> tuple[float, dict]:
    """The alpha with the lowest ``w8a8_output_error`` of the group (ties keep the smaller alpha).

    With ``grid`` given, every value of it is tried. By default the search is coarse to fine: 0.0, 0.1, ..., 1.0,
    then the two points 0.05 either side of the best, i.e. the 0.05 grid's resolution at 13 evaluations instead of
    21 (the error is smooth in alpha; each evaluation costs one [tokens, K] x [K, N] product per linear).
    ``per_token`` measures the error under dynamic per-token activation quantization instead of per-tensor.
    ``weight_grids`` (one ``WeightGrid`` per linear) scores each weight on the grid it will be rounded onto.

    ``info``: 'alpha', 'error' (at that alpha), 'error_unsmoothed' (s = 1, z = 0: plain W8A8), 'alphas' and
    'errors' (every alpha tried, ascending). Deterministic: no randomness beyond the given token sample."""
    if len(stats.tokens) == 0:
        raise ValueError("the statistics hold no token sample to search alpha on")
    products = GroupProducts(stats, weights_kn, weight_grids)
    tried: dict[float, float] = {}

    def evaluate(alphas: Iterable[float]) -> None:
        for alpha in alphas:
            alpha = round(float(alpha), 6)
            if alpha not in tried:
                shift, scale = smoothing_factors(stats, products.weights, method, alpha)
                tried[alpha] = products.error(shift, scale, weight_bits, per_token)

    if grid is not None:
        if len(grid) == 0:
            raise ValueError("the alpha grid is empty")
        evaluate(grid)
    else:
        evaluate(COARSE_ALPHA_GRID)
        best = min(sorted(tried), key=lambda a: tried[a])
        evaluate(a for a in (best - FINE_ALPHA_STEP, best + FINE_ALPHA_STEP) if 0.0 <= a <= 1.0)
    alphas = sorted(tried)
    errors = [tried[a] for a in alphas]
    best = int(np.argmin(errors))  # first minimum: the smaller alpha on ties
    ones = np.ones(stats.channels, dtype=np.float32)
    unsmoothed = products.error(np.zeros_like(ones), ones, weight_bits, per_token)
    info = {
        "alpha": alphas[best],
        "error": errors[best],
        "error_unsmoothed": unsmoothed,
        "alphas": alphas,
        "errors": errors,
    }
    return alphas[best], info
