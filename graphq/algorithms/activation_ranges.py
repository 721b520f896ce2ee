"""Streaming activation statistics and the clip-range methods of static activation quantization (pure numpy).

One ``ActivationStats`` per linear input accumulates, one captured sample at a time and in memory that does not
depend on the number of samples: per-tensor and per-channel min/max (pass 1), a bounded seeded reservoir of token
rows (pass 1, for output-error searches and smoothing), and a histogram over a range fixed by pass 1 (pass 2).

Activations are quantized per tensor, asymmetric, onto 256 levels. A range [lo, hi] always contains 0 so that zero
is exact; it maps to ``scale = (hi - lo) / 255`` and a zero point. The zero point is reported in the signed int8
convention (MindIE): ``x_q = clip(round(x / scale) + offset, -128, 127)``; the same grid stored as uint8 has zero
point ``offset + 128``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# The per-tensor activation grid lives in grid.py; re-exported here for the range methods' callers.
from graphq.algorithms.grid import (  # noqa: F401
    ACT_LEVELS as LEVELS,
    ACT_QMAX as QMAX,
    ACT_QMIN as QMIN,
    TINY_SCALE,
    ActivationRange,
    fake_quantize,
    range_to_qparams,
)

METHODS = ("minmax", "percentile", "entropy", "mse", "auto")
HISTOGRAM_METHODS = ("percentile", "entropy", "mse", "auto")
DEFAULT_BINS = 4096  # signed histogram over [-A, A]; folds into 2048 bins of |x| for the entropy method


@dataclass
class Histogram:
    """Counts over ``bins`` equal bins spanning [-limit, limit]."""

    limit: float
    counts: np.ndarray

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(-self.limit, self.limit, len(self.counts) + 1)

    @property
    def centers(self) -> np.ndarray:
        edges = self.edges
        return (edges[:-1] + edges[1:]) / 2

    def add(self, values: np.ndarray) -> None:
        bins = len(self.counts)
        if self.limit <= 0:
            self.counts[bins // 2] += values.size
            return
        index = ((values.reshape(-1) + self.limit) * (bins / (2 * self.limit))).astype(np.int64)
        np.clip(index, 0, bins - 1, out=index)
        self.counts += np.bincount(index, minlength=bins)

    def absolute(self) -> np.ndarray:
        """Counts of |x| over [0, limit] in bins/2 bins (folds the symmetric signed histogram)."""
        half = len(self.counts) // 2
        return self.counts[half:] + self.counts[:half][::-1]


@dataclass
class ActivationStats:
    """Streaming statistics of one linear input of ``channels`` features."""

    channels: int
    reservoir_rows: int = 0
    seed: int = 0
    bins: int = DEFAULT_BINS
    min: float = np.inf
    max: float = -np.inf
    channel_min: np.ndarray | None = None
    channel_max: np.ndarray | None = None
    rows_seen: int = 0
    histogram: Histogram | None = None
    extreme_rows: int = 8
    _reservoir: np.ndarray | None = field(default=None, repr=False)
    _extremes: np.ndarray | None = field(default=None, repr=False)
    _rng: np.random.Generator | None = field(default=None, repr=False)

    def add_ranges(self, x: np.ndarray) -> None:
        """Pass 1: ranges and the token reservoir."""
        rows = np.asarray(x, dtype=np.float32).reshape(-1, self.channels)
        if rows.size == 0:
            return
        cmin, cmax = rows.min(axis=0), rows.max(axis=0)
        self.min = min(self.min, float(cmin.min()))
        self.max = max(self.max, float(cmax.max()))
        self.channel_min = cmin if self.channel_min is None else np.minimum(self.channel_min, cmin)
        self.channel_max = cmax if self.channel_max is None else np.maximum(self.channel_max, cmax)
        if self.reservoir_rows:
            self._sample_rows(rows)
            self._keep_extremes(rows)
        self.rows_seen += len(rows)

    def _keep_extremes(self, rows: np.ndarray) -> None:
        """The rows of largest |x| seen so far. LLMs put massive activations on a few tokens (BOS, attention sinks);
        a uniform sample of thousands of tokens rarely holds one, yet clipping them breaks the model, so the
        output-error searches must see them."""
        k = self.extreme_rows
        if not k:
            return
        candidates = rows if len(rows) <= k else rows[np.argpartition(np.abs(rows).max(axis=1), -k)[-k:]]
        pool = candidates if self._extremes is None else np.concatenate([self._extremes, candidates])
        if len(pool) > k:
            pool = pool[np.argpartition(np.abs(pool).max(axis=1), -k)[-k:]]
        self._extremes = pool.copy()

    def _sample_rows(self, rows: np.ndarray) -> None:
        """Reservoir sampling (algorithm R): every row seen so far is kept with equal probability."""
        if self._rng is None:
            self._rng = np.random.default_rng(self.seed)
            self._reservoir = np.empty((0, self.channels), dtype=np.float32)
        size = self.reservoir_rows
        fill = max(0, min(size - len(self._reservoir), len(rows)))
        if fill:
            self._reservoir = np.concatenate([self._reservoir, rows[:fill]])
        rest = rows[fill:]
        if len(rest):
            seen = self.rows_seen + fill + np.arange(len(rest))  # rows before each candidate
            slots = (self._rng.random(len(rest)) * (seen + 1)).astype(np.int64)
            keep = slots < size
            self._reservoir[slots[keep]] = rest[keep]

    @property
    def tokens(self) -> np.ndarray:
        """The reservoir rows plus the extreme rows [<= reservoir_rows + extreme_rows, channels]."""
        parts = [p for p in (self._reservoir, self._extremes) if p is not None]
        if not parts:
            return np.empty((0, self.channels), dtype=np.float32)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    @classmethod
    def from_channel_ranges(cls, channel_min: np.ndarray, channel_max: np.ndarray, tokens: np.ndarray,
                            rows_seen: int, reservoir_rows: int = 0, seed: int = 0) -> "ActivationStats":
        """Pass-1 statistics known without a pass, e.g. of a smoothed input (x - z) / s derived from those of x:
        the per-tensor range is the range of the per-channel ranges."""
        channel_min = np.asarray(channel_min, dtype=np.float32)
        channel_max = np.asarray(channel_max, dtype=np.float32)
        stats = cls(len(channel_min), reservoir_rows=reservoir_rows, seed=seed)
        stats.min, stats.max = float(channel_min.min()), float(channel_max.max())
        stats.channel_min, stats.channel_max = channel_min, channel_max
        stats.rows_seen = rows_seen
        if reservoir_rows:
            stats._reservoir = np.asarray(tokens, dtype=np.float32)[:reservoir_rows]
        return stats

    def start_histogram(self) -> None:
        """Fix the histogram range from pass 1 (symmetric, so it also folds into a histogram of |x|)."""
        limit = max(abs(self.min), abs(self.max)) if np.isfinite(self.min) else 0.0
        self.histogram = Histogram(limit=float(limit), counts=np.zeros(self.bins, dtype=np.int64))

    def add_histogram(self, x: np.ndarray) -> None:
        """Pass 2."""
        self.histogram.add(np.asarray(x, dtype=np.float32))

    @property
    def nbytes(self) -> int:
        total = self.tokens.nbytes + (self.histogram.counts.nbytes if self.histogram else 0)
        return total + sum(a.nbytes for a in (self.channel_min, self.channel_max) if a is not None)


# ---------------------------------------------------------------------------------------------------------------
# Clip-range methods. Each returns (lo, hi); ``choose_range`` turns that into quantization parameters.


def minmax_range(stats: ActivationStats) -> tuple[float, float]:
    return stats.min, stats.max


def percentile_range(hist: Histogram, percentile: float, data_min: float, data_max: float) -> tuple[float, float]:
    """The ``percentile`` (upper) and ``100 - percentile`` (lower) points of the histogram, within the data range.

    Located by linear interpolation inside the bin where the cumulative count crosses the target."""
    counts = hist.counts.astype(np.float64)
    total = counts.sum()
    if total == 0 or hist.limit == 0:
        return data_min, data_max
    cumulative = np.concatenate([[0.0], np.cumsum(counts)]) / total
    edges = hist.edges
    tail = (100.0 - percentile) / 100.0

    def point(fraction: float) -> float:
        i = int(np.clip(np.searchsorted(cumulative, fraction, side="left"), 1, len(counts)))
        below, above = cumulative[i - 1], cumulative[i]
        t = 0.0 if above <= below else (fraction - below) / (above - below)
        return float(edges[i - 1] + t * (edges[i] - edges[i - 1]))

    lo, hi = point(tail), point(1.0 - tail)
    return max(lo, data_min), min(hi, data_max)


def quantization_mse(centers: np.ndarray, counts: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                     bin_width: float = 0.0) -> np.ndarray:
    """Mean squared error of quantizing the histogram onto the 256-level grid of each candidate [lo, hi].

    Each bin's values are taken at its center and rounded exactly as QuantizeLinear would (zero point included, so
    mass near zero that the grid represents exactly costs nothing); the spread inside a bin adds bin_width^2 / 12."""
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)[..., None]
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)[..., None]
    scale = np.maximum((hi - lo) / (LEVELS - 1), 1e-30)
    zero_point = np.clip(np.round(-lo / scale), 0, LEVELS - 1)
    q = np.clip(np.round(centers / scale) + zero_point, 0, LEVELS - 1)
    error = (centers - (q - zero_point) * scale) ** 2
    return (error * counts).sum(axis=-1) / max(counts.sum(), 1) + bin_width**2 / 12.0


def mse_range(hist: Histogram, data_min: float, data_max: float, steps: int = 32) -> tuple[float, float]:
    """Search lower and upper clip points (each a fraction of the data's extreme on its side) minimising the MSE."""
    lo0, hi0 = min(data_min, 0.0), max(data_max, 0.0)
    if hist.limit == 0 or hi0 - lo0 == 0:
        return data_min, data_max
    # Bins that are empty cost nothing: drop them to keep the grid search small.
    nonzero = hist.counts > 0
    centers, counts = hist.centers[nonzero], hist.counts[nonzero].astype(np.float64)
    bin_width = 2 * hist.limit / len(hist.counts)

    def search(lo_fractions: np.ndarray, hi_fractions: np.ndarray) -> tuple[float, float]:
        lo = (lo0 * lo_fractions)[:, None] * np.ones(len(hi_fractions))[None, :]
        hi = np.ones(len(lo_fractions))[:, None] * (hi0 * hi_fractions)[None, :]
        errors = quantization_mse(centers, counts, lo, hi, bin_width)
        i, j = np.unravel_index(int(np.argmin(errors)), errors.shape)
        return float(lo_fractions[i]), float(hi_fractions[j])

    # A coarse grid over both ends, then a fine one around its best point.
    coarse = np.linspace(1.0 / steps, 1.0, steps)
    f_lo, f_hi = search(coarse, coarse)
    width = 1.0 / steps
    f_lo, f_hi = search(np.clip(np.linspace(f_lo - width, f_lo + width, 17), width / 16, 1.0),
                        np.clip(np.linspace(f_hi - width, f_hi + width, 17), width / 16, 1.0))
    return lo0 * f_lo, hi0 * f_hi


def entropy_threshold(abs_counts: np.ndarray, limit: float, target_bins: int = 128) -> float:
    """TensorRT's KL-divergence calibration over a histogram of |x| (``len(abs_counts)`` bins over [0, limit]).

    For each candidate threshold i (in bins), P is the histogram cut at i with the outliers added to its last bin,
    Q is P's first i bins merged into ``target_bins`` levels and spread back evenly over their non-empty bins;
    the threshold with the smallest KL(P || Q) wins."""
    counts = abs_counts.astype(np.float64)
    n = len(counts)
    if counts.sum() == 0 or limit == 0:
        return limit
    best_i, best_kl = n, np.inf
    suffix = np.concatenate([np.cumsum(counts[::-1])[::-1], [0.0]])
    for i in range(target_bins, n + 1):
        p = counts[:i].copy()
        p[i - 1] += suffix[i]
        if p.sum() == 0:
            continue
        # Merge the first i bins into target_bins levels (edges rounded down, as TensorRT's reference does).
        level = (np.arange(i) * target_bins) // i
        sums = np.bincount(level, weights=counts[:i], minlength=target_bins)
        nonempty = np.bincount(level, weights=(counts[:i] > 0).astype(np.float64), minlength=target_bins)
        q = np.where(counts[:i] > 0, sums[level] / np.maximum(nonempty[level], 1), 0.0)
        p /= p.sum()
        q_total = q.sum()
        if q_total == 0:
            continue
        q /= q_total
        mask = p > 0
        # Where Q is zero but P is not (only the outlier-laden last bin can be), KL is infinite: smooth with eps.
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return (best_i + 0.5) * limit / n


def entropy_range(hist: Histogram, data_min: float, data_max: float) -> tuple[float, float]:
    threshold = entropy_threshold(hist.absolute(), hist.limit)
    return max(data_min, -threshold), min(data_max, threshold)


def method_range(stats: ActivationStats, method: str, percentile: float = 99.99) -> tuple[float, float]:
    if method == "minmax":
        return minmax_range(stats)
    if stats.histogram is None:
        raise ValueError(f"method {method} needs the histogram pass")
    if method == "percentile":
        return percentile_range(stats.histogram, percentile, stats.min, stats.max)
    if method == "entropy":
        return entropy_range(stats.histogram, stats.min, stats.max)
    if method == "mse":
        return mse_range(stats.histogram, stats.min, stats.max)
    raise ValueError(f"unknown activation method {method}")


def token_output_errors(x: np.ndarray, weight: np.ndarray, weight_q: np.ndarray, act: ActivationRange,
                        reference: np.ndarray | None = None) -> np.ndarray:
    """Per token (row): squared error of the linear's output with x and W fake-quantized, relative to the float
    output's squared norm. Per token, so a few tokens with massive activations neither drown the others' error
    (as one mean over all outputs would) nor hide their own."""
    if reference is None:
        reference = x @ weight
    candidate = fake_quantize(x, act.scale, act.offset) @ weight_q
    error = ((candidate - reference) ** 2).sum(axis=1)
    norm = (reference.astype(np.float64) ** 2).sum(axis=1)
    return error / np.maximum(norm, 1e-30)


def linear_output_error(x: np.ndarray, weight: np.ndarray, weight_q: np.ndarray, act: ActivationRange,
                        reference: np.ndarray | None = None) -> float:
    """Mean per-token relative output error (``token_output_errors``)."""
    return float(np.mean(token_output_errors(x, weight, weight_q, act, reference)))


@dataclass
class RangeChoice:
    method: str
    range: ActivationRange
    errors: dict[str, float] = field(default_factory=dict)  # auto: mean output error per candidate method
    worst_token_error: float | None = None  # of the chosen range, over the token sample (auto)


def choose_range(
    stats: ActivationStats,
    method: str,
    percentile: float = 99.99,
    weights: list[tuple[np.ndarray, np.ndarray]] | None = None,
) -> RangeChoice:
    """The activation range of one input by ``method``; ``auto`` picks the candidate with the lowest output error
    summed over ``weights`` (float [K, N], fake-quantized [K, N]) of every linear reading this input."""
    if method != "auto":
        return RangeChoice(method, range_to_qparams(*method_range(stats, method, percentile)))
    x = stats.tokens
    if not weights or len(x) == 0:
        raise ValueError("auto needs the linears' weights and reservoir tokens")
    errors: dict[str, float] = {}
    ranges: dict[str, ActivationRange] = {}
    references = [x @ w for w, _ in weights]
    worst: dict[str, float] = {}
    for candidate in ("minmax", "percentile", "entropy", "mse"):
        ranges[candidate] = range_to_qparams(*method_range(stats, candidate, percentile))
        per_token = sum(token_output_errors(x, w, wq, ranges[candidate], ref) for (w, wq), ref in zip(weights, references))
        errors[candidate], worst[candidate] = float(per_token.mean()), float(per_token.max())
    best = min(errors, key=errors.get)
    return RangeChoice(best, ranges[best], errors, worst[best])
