"""Codebook (lookup-table) quantization of a weight matrix: each weight is a small code indexing a table of values.

Unlike the uniform grid of RTN, a table can follow the weights' distribution (heavy centre, sparse tails). Four
ways to build one, all giving a ``CodebookWeight``, so that one emitter and one artifact layout serve them all:

- ``lut_quantize``: a table learned per output channel (or per group of input channels) by 1-D k-means, optionally
  weighted by per-weight importance (SqueezeLLM's sensitivity-weighted k-means; the data-aware variant passes the
  diagonal of the layer's Hessian X^T X, i.e. each input channel's squared norm, as ``importance``).
- ``nf4_quantize``: the fixed QLoRA NormalFloat-4 table, scaled by each group's absmax.
- ``iq4nl_quantize``: llama.cpp's fixed IQ4_NL table (int8 values), scaled per group by a searched scale.
- ``shared_lut_quantize``: one table per matrix learned by k-means on the group-normalised weights, with searched
  per-group scales: NF4's storage, the layer's own distribution.

Layout (one for all): ``codes`` is [K, N] uint8. ``table`` is [T_groups, T_columns, 2^bits] where T_groups is 1 or
n_groups and T_columns is 1 or N (1 = one table shared by all groups / columns: the fixed tables); ``table_scales``
(optional) is [n_groups, N]. The value of weight (k, n) is

    table[g(k) or 0, n or 0, codes[k, n]] * table_scales[g(k), n]          (g(k) = k // group_size)

so a learned table is [n_groups, N, 2^b] (float16, or int8 with one float16 scale per table: the compact form),
and a fixed table is [1, 1, 2^b] with per-group scales. Per output channel means one group of all K rows.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np

from graphq.errors import GraphqError

SUPPORTED_BITS = (3, 4)
TABLE_DTYPES = ("float16", "int8")

# QLoRA's NF4 (Dettmers et al. 2023, bitsandbytes' NF4 lookup table): quantiles of N(0, 1) scaled to [-1, 1],
# with an exact zero; see nf4_values_from_quantiles for the construction.
NF4_VALUES = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)
# llama.cpp's kvalues_iq4nl (ggml-common.h): a non-uniform int8 grid, denser near zero.
IQ4NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)


@dataclass
class CodebookWeight:
    """A [K, N] weight (K input channels, N output channels) stored as codes into lookup tables.

    ``codes``: uint8 [K, N], each < 2^bits. ``table``: [T_groups, T_columns, 2^bits], float16 or int8 (see the
    module docstring for how it broadcasts). ``table_scales``: float16 [n_groups, N] or None. ``group_size``:
    input channels sharing a table / scale (K for per output channel; the last group may be partial).
    ``fallback_rows``: learned tables of (group, column) rows that had fewer distinct values than 2^bits and
    got those values instead (a warning count for the report).
    """

    codes: np.ndarray
    table: np.ndarray
    bits: int
    group_size: int
    table_scales: np.ndarray | None = None
    fallback_rows: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    @property
    def n_groups(self) -> int:
        return -(-self.codes.shape[0] // self.group_size)

    @property
    def per_channel(self) -> bool:
        return self.n_groups == 1

    def group_of_row(self) -> np.ndarray:
        """The group index of every input channel, [K] int64."""
        return np.arange(self.codes.shape[0], dtype=np.int64) // self.group_size

    def effective_table(self) -> np.ndarray:
        """The float32 table every (group, column) pair reads, [n_groups, N, 2^bits] (scales applied)."""
        n_groups, n = self.n_groups, self.codes.shape[1]
        table = np.broadcast_to(self.table.astype(np.float32), (n_groups, n, 1 << self.bits))
        if self.table_scales is not None:
            table = table * self.table_scales.astype(np.float32)[..., None]
        return np.ascontiguousarray(table, dtype=np.float32)

    def dequantize(self) -> np.ndarray:
        """The float32 [K, N] weight the codes and tables stand for."""
        table = self.effective_table()
        columns = np.arange(self.codes.shape[1])[None, :]
        return table[self.group_of_row()[:, None], columns, self.codes]

    def output_columns(self, start: int, stop: int) -> "CodebookWeight":
        """The codebook weight of output channels [start, stop): tables and scales are per column or shared."""
        table = self.table if self.table.shape[1] == 1 else self.table[:, start:stop]
        scales = None if self.table_scales is None else self.table_scales[:, start:stop]
        return CodebookWeight(self.codes[:, start:stop], table, self.bits, self.group_size, scales)

    def storage_bytes(self) -> float:
        """Bytes as stored: codes at ``bits`` each (bit-packed), table entries at their dtype, float16 scales."""
        code_bits = self.codes.size * self.bits
        table_bits = self.table.size * self.table.dtype.itemsize * 8
        scale_bits = 0 if self.table_scales is None else self.table_scales.size * 16
        return (code_bits + table_bits + scale_bits) / 8

    def bits_per_weight(self) -> float:
        """Stored bits per weight, tables and scales included (per-channel fp16 4-bit tables: 4 + 256 / K)."""
        return self.storage_bytes() * 8 / self.codes.size


def _check(weight_kn: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, int]:
    weight = np.asarray(weight_kn, dtype=np.float32)
    if weight.ndim != 2:
        raise GraphqError(f"codebook quantization needs a 2-D [K, N] weight, got shape {weight.shape}")
    if bits not in SUPPORTED_BITS:
        raise GraphqError(f"codebook quantization supports {SUPPORTED_BITS} bits, not {bits}")
    if not np.isfinite(weight).all():
        raise GraphqError("the weight holds NaN or infinite values: codebook quantization needs finite weights")
    k = weight.shape[0]
    if group_size == -1 or group_size >= k:
        return weight, k
    if group_size < 1:
        raise GraphqError(f"group size must be -1 (per output channel) or a positive number, not {group_size}")
    return weight, group_size


def _rows(array_kn: np.ndarray, group_size: int) -> np.ndarray:
    """[K, N] -> [n_groups, N, group_size]: one row per (group, column), the last group padded by edge values.

    Edge padding repeats a real value of the row, so a padded row has no extra distinct value; the padding gets
    zero importance, so it moves no centre either."""
    k, n = array_kn.shape
    n_groups = -(-k // group_size)
    pad = n_groups * group_size - k
    if pad:
        array_kn = np.concatenate([array_kn, np.repeat(array_kn[-1:], pad, axis=0)], axis=0)
    return np.ascontiguousarray(array_kn.reshape(n_groups, group_size, n).transpose(0, 2, 1))


def _unrows(rows: np.ndarray, k: int) -> np.ndarray:
    """Inverse of ``_rows``: [n_groups, N, group_size] -> [K, N]."""
    n_groups, n, group_size = rows.shape
    return rows.transpose(0, 2, 1).reshape(n_groups * group_size, n)[:k]


def _row_importance(importance: np.ndarray | None, shape_kn: tuple[int, int], group_size: int) -> np.ndarray:
    k, n = shape_kn
    if importance is None:
        per_weight = np.ones(shape_kn, dtype=np.float64)
    else:
        importance = np.asarray(importance, dtype=np.float64)
        if importance.shape == (k,):
            importance = importance[:, None]
        try:
            per_weight = np.broadcast_to(importance, shape_kn)
        except ValueError:
            raise GraphqError(
                f"importance has shape {importance.shape}: expected [K] = [{k}] (per input channel) or [K, N] = [{k}, {n}]"
            ) from None
        if not np.isfinite(per_weight).all() or (per_weight < 0).any():
            raise GraphqError("importance must be finite and non-negative")
    rows = _rows(np.asarray(per_weight, dtype=np.float64), group_size).copy()
    pad = rows.shape[0] * group_size - k
    if pad:
        rows[-1, :, group_size - pad:] = 0.0
    return rows


def rowwise_searchsorted(sorted_rows: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Per row, the number of entries of ``sorted_rows`` [R, L] strictly below each query of ``queries`` [R, Q].

    A vectorised binary search over all rows at once (numpy's searchsorted takes one sorted array only)."""
    rows, length = sorted_rows.shape
    low = np.zeros(queries.shape, dtype=np.int64)
    high = np.full(queries.shape, length, dtype=np.int64)
    row_index = np.arange(rows)[:, None]
    while True:
        active = low < high
        if not active.any():
            return low
        middle = (low + high) // 2
        below = sorted_rows[row_index, np.minimum(middle, length - 1)] < queries
        low = np.where(active & below, middle + 1, low)
        high = np.where(active & ~below, middle, high)


def nearest_codes(values: np.ndarray, sorted_tables: np.ndarray) -> np.ndarray:
    """Index of the nearest entry of each row's ascending table: values [R, L], tables [R, C] -> uint8 [R, L]."""
    midpoints = (sorted_tables[:, 1:] + sorted_tables[:, :-1]) * 0.5
    codes = np.zeros(values.shape, dtype=np.uint8)
    for c in range(midpoints.shape[1]):  # C - 1 <= 15 comparisons, each over all rows
        codes += values > midpoints[:, c : c + 1]
    return codes


def _distinct_tables(sorted_rows: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's distinct values in ascending order, [R, levels] (padded with the row's largest), and counts."""
    new_value = np.concatenate([np.ones((sorted_rows.shape[0], 1), bool), np.diff(sorted_rows, axis=1) > 0], axis=1)
    rank = np.cumsum(new_value, axis=1) - 1
    counts = rank[:, -1] + 1
    tables = np.repeat(sorted_rows[:, -1:], levels, axis=1)
    keep = new_value & (rank < levels)
    row_index = np.nonzero(keep)[0]
    tables[row_index, rank[keep]] = sorted_rows[keep]
    return tables, counts


def kmeans_1d(
    values: np.ndarray,
    levels: int,
    importance: np.ndarray | None = None,
    iterations: int = 50,
    tol: float = 1e-6,
    inits: tuple[str, ...] = ("uniform", "quantile"),
) -> tuple[np.ndarray, int]:
    """Weighted 1-D k-means (Lloyd) of every row at once: values [R, L] -> ascending centres [R, levels].

    Each row is sorted once; in 1-D a cluster is then a run of consecutive values between two midpoints, so an
    iteration is a binary search for the midpoints plus differences of prefix sums (no [R, L, levels] distances).
    Lloyd only finds a local optimum, and heavy-tailed rows (LLM weights) trap it, so it runs from each of
    ``inits`` and every row keeps the centres of lowest weighted squared error. Both are deterministic:
    "uniform" is the evenly spaced grid from the row's min to its max (so the result is never worse than that
    uniform 2^b-level grid), "quantile" the importance-weighted quantiles (j + 1/2) / levels.
    Each run stops after ``iterations`` or when no centre moves by more than ``tol`` times its row's range. A
    cluster that loses all its members keeps its centre. Rows with fewer than ``levels`` distinct values get those
    values (padded by repeating the largest); the second result counts them.
    """
    values = np.asarray(values, dtype=np.float64)
    rows, length = values.shape
    weights = np.ones_like(values) if importance is None else np.asarray(importance, dtype=np.float64)
    # A row whose importance is all zero (e.g. a dead input channel) is clustered unweighted.
    weights = np.where((weights.sum(axis=1) <= 0)[:, None], 1.0, weights)
    order = np.argsort(values, axis=1, kind="stable")
    sorted_values = np.take_along_axis(values, order, axis=1)
    sorted_weights = np.take_along_axis(weights, order, axis=1)
    # Prefix sums with a leading zero: the sum over sorted positions [a, b) is S[b] - S[a].
    zero = np.zeros((rows, 1))
    sums = [
        np.concatenate([zero, np.cumsum(sorted_weights * sorted_values**power, axis=1)], axis=1) for power in (0, 1, 2)
    ]
    low, high = sorted_values[:, :1], sorted_values[:, -1:]
    best_centres, best_error = None, None
    for init in inits:
        if init == "uniform":
            centres = low + (high - low) * np.linspace(0.0, 1.0, levels)
        elif init == "quantile":
            targets = sums[0][:, -1:] * (np.arange(levels) + 0.5) / levels
            positions = np.minimum(rowwise_searchsorted(sums[0][:, 1:], targets), length - 1)
            centres = np.take_along_axis(sorted_values, positions, axis=1)
        else:
            raise GraphqError(f"unknown k-means initialisation {init!r}: use 'uniform' or 'quantile'")
        centres, error = _lloyd(sorted_values, sums, centres, iterations, tol)
        if best_centres is None:
            best_centres, best_error = centres, error
        else:
            better = error < best_error
            best_centres = np.where(better[:, None], centres, best_centres)
            best_error = np.minimum(error, best_error)

    distinct, counts = _distinct_tables(sorted_values, levels)
    few = counts < levels
    best_centres[few] = distinct[few]
    return best_centres, int(few.sum())


def cluster_sums(sorted_values: np.ndarray, sums: list[np.ndarray], centres: np.ndarray) -> list[np.ndarray]:
    """Per cluster sums of w, w x, w x^2 under the nearest-centre assignment, from the prefix sums ``sums``."""
    rows, length = sorted_values.shape
    midpoints = (centres[:, 1:] + centres[:, :-1]) * 0.5
    # Values <= a midpoint go to the lower centre, as nearest_codes assigns them.
    bounds = rowwise_searchsorted(sorted_values, np.nextafter(midpoints, np.inf))
    edges = np.concatenate([np.zeros((rows, 1), np.int64), bounds, np.full((rows, 1), length)], axis=1)
    return [np.diff(prefix[np.arange(rows)[:, None], edges], axis=1) for prefix in sums]


def cluster_error(sorted_values: np.ndarray, sums: list[np.ndarray], centres: np.ndarray) -> np.ndarray:
    """Each row's weighted squared error under the nearest-centre assignment: sum w (x - c)^2."""
    mass, moment, square = cluster_sums(sorted_values, sums, centres)
    return (square - 2 * centres * moment + centres**2 * mass).sum(axis=1)


def _lloyd(
    sorted_values: np.ndarray, sums: list[np.ndarray], centres: np.ndarray, iterations: int, tol: float
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd iterations on sorted rows given prefix sums of w, w x, w x^2; returns centres and weighted SSE."""
    rows = sorted_values.shape[0]
    spread = np.maximum(sorted_values[:, -1] - sorted_values[:, 0], 1e-30)[:, None]
    for _ in range(iterations):
        mass, moment, _ = cluster_sums(sorted_values, sums, centres)
        updated = np.where(mass > 0, moment / np.where(mass > 0, mass, 1.0), centres)
        updated = np.sort(updated, axis=1)
        shift = (np.abs(updated - centres) / spread).max() if rows else 0.0
        centres = updated
        if shift <= tol:
            break
    return centres, cluster_error(sorted_values, sums, centres)


def _finish(
    weight: np.ndarray, centres: np.ndarray, bits: int, group_size: int, table_dtype: str, fallback_rows: int
) -> CodebookWeight:
    """Store [n_groups, N, levels] centres as a table of ``table_dtype``; codes are nearest the stored entries."""
    k, n = weight.shape
    scales = None
    if table_dtype == "float16":
        table = centres.astype(np.float16)
        stored = table.astype(np.float32)
    else:
        # One float16 scale per table maps its largest |centre| to 127; entries round to int8.
        peak = np.abs(centres).max(axis=-1)
        scales = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float16)
        table = np.clip(np.round(centres / scales.astype(np.float64)[..., None]), -127, 127).astype(np.int8)
        stored = table.astype(np.float32) * scales.astype(np.float32)[..., None]
    rows = _rows(weight, group_size)
    levels = stored.shape[-1]
    codes = nearest_codes(rows.reshape(-1, group_size), stored.reshape(-1, levels))
    codes = _unrows(codes.reshape(rows.shape), k)
    return CodebookWeight(np.ascontiguousarray(codes), table, bits, group_size, scales, fallback_rows)


def lut_quantize(
    weight_kn: np.ndarray,
    bits: int,
    group_size: int = -1,
    importance: np.ndarray | None = None,
    seed: int = 0,
    iterations: int = 50,
    table_dtype: str = "float16",
) -> CodebookWeight:
    """Learned lookup tables for a [K, N] weight by (weighted) 1-D k-means per output channel or per group.

    ``group_size`` -1 (or >= K): one table per output channel over all K inputs; else one per ``group_size``
    input channels. ``importance``: non-negative [K] (per input channel, broadcast along each output channel:
    SqueezeLLM's sensitivity from the layer Hessian's diagonal) or [K, N]; None weighs all weights alike.
    ``table_dtype``: "float16" entries, or "int8" entries with a float16 scale per table (144 instead of 256
    bits per 4-bit table). ``seed`` is accepted for the method registry's uniform signature: the quantile
    initialisation is deterministic and uses no random numbers.
    """
    del seed  # deterministic initialisation; kept so every weight method is called alike
    weight, group_size = _check(weight_kn, bits, group_size)
    if table_dtype not in TABLE_DTYPES:
        raise GraphqError(f"table dtype must be one of {TABLE_DTYPES}, not {table_dtype!r}")
    if iterations < 0:
        raise GraphqError(f"k-means iterations must be >= 0, not {iterations}")
    rows = _rows(weight, group_size)
    n_groups, n, _ = rows.shape
    weights = _row_importance(importance, weight.shape, group_size)
    centres, fallback_rows = kmeans_1d(
        rows.reshape(n_groups * n, group_size), 1 << bits, weights.reshape(n_groups * n, group_size), iterations
    )
    return _finish(weight, centres.reshape(n_groups, n, -1), bits, group_size, table_dtype, fallback_rows)


def nf4_values_from_quantiles(offset: float = 0.9677083) -> np.ndarray:
    """QLoRA's NF4 construction (bitsandbytes create_normal_map): 8 positive and 7 negative N(0,1) quantiles
    between 1/2 and ``offset``, a zero, normalised by the largest. Used to check NF4_VALUES."""
    normal = statistics.NormalDist()
    positive = [normal.inv_cdf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
    negative = [-normal.inv_cdf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    values = np.sort(np.array(positive + [0.0] + negative))
    return (values / np.abs(values).max()).astype(np.float32)


def _group_extremes(weight: np.ndarray, group_size: int) -> np.ndarray:
    """The signed value of largest magnitude of every (group, column): [n_groups, N]."""
    rows = _rows(weight, group_size)
    index = np.abs(rows).argmax(axis=-1)
    return np.take_along_axis(rows, index[..., None], axis=-1)[..., 0]


def _fixed_table_weight(
    weight: np.ndarray, fixed: np.ndarray, scales: np.ndarray, bits: int, group_size: int
) -> CodebookWeight:
    scales = scales.astype(np.float16)
    safe = np.where(scales == 0, np.float16(1), scales).astype(np.float32)
    rows = _rows(weight, group_size)
    normalised = rows / safe[..., None]
    table = np.sort(fixed)  # ascending, as nearest_codes needs; the codes index this order
    flat = normalised.reshape(-1, group_size)
    codes = nearest_codes(flat, np.broadcast_to(table.astype(np.float32), (flat.shape[0], table.size)))
    codes = _unrows(codes.reshape(rows.shape), weight.shape[0])
    table = table.reshape(1, 1, -1)
    return CodebookWeight(np.ascontiguousarray(codes), table, bits, group_size, scales)


def nf4_quantize(weight_kn: np.ndarray, group_size: int = 64) -> CodebookWeight:
    """NF4 (QLoRA): codes into the fixed NF4 table (stored float16), scaled by each group's absmax (float16)."""
    weight, group_size = _check(weight_kn, 4, group_size)
    absmax = np.abs(_group_extremes(weight, group_size))
    return _fixed_table_weight(weight, NF4_VALUES.astype(np.float16), absmax, 4, group_size)


def iq4nl_quantize(weight_kn: np.ndarray, group_size: int = 32, search_steps: int = 7) -> CodebookWeight:
    """IQ4_NL-style: codes into llama.cpp's fixed int8 table, one float16 scale per group (``search_scales``)."""
    weight, group_size = _check(weight_kn, 4, group_size)
    rows = _rows(weight, group_size).astype(np.float64)
    scales = search_scales(rows, np.ones_like(rows), IQ4NL_VALUES.astype(np.float64), search_steps)
    return _fixed_table_weight(weight, IQ4NL_VALUES, scales, 4, group_size)


def search_scales(rows: np.ndarray, weights: np.ndarray, table: np.ndarray, steps: int = 7) -> np.ndarray:
    """Per group, the scale s minimising sum w (x - s t[code])^2 over a few candidates: rows [G, N, L] -> [G, N].

    As llama.cpp's quantize_row_iq4_nl does: candidate scales put the group's extreme on either end of the
    ascending ``table`` shifted by up to ``steps`` units (1/127 of the end's magnitude); each candidate's
    nearest codes get their least-squares scale sum(w t x) / sum(w t^2), and the lowest error wins (at that
    scale the error is sum w x^2 - sum(w t x)^2 / sum(w t^2), so the largest ratio wins). Zero groups get 0."""
    ascending = np.sort(table)
    midpoints = (ascending[1:] + ascending[:-1]) * 0.5
    extreme = np.take_along_axis(rows, np.abs(rows).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    safe_extreme = np.where(extreme == 0, 1.0, extreme)
    best_score = np.full(extreme.shape, -np.inf)
    best_scale = np.zeros(extreme.shape)
    for end in (ascending[-1], ascending[0]):
        for step in range(-steps, steps + 1):
            target = end * (1 + step / 127)
            t = ascending[np.searchsorted(midpoints, rows * (target / safe_extreme)[..., None])]
            sum_tx = (weights * t * rows).sum(axis=-1)
            sum_t2 = (weights * t * t).sum(axis=-1)
            score = np.where(sum_t2 > 0, sum_tx * sum_tx / np.where(sum_t2 > 0, sum_t2, 1.0), -np.inf)
            better = score > best_score
            best_score = np.where(better, score, best_score)
            best_scale = np.where(better, sum_tx / np.where(sum_t2 > 0, sum_t2, 1.0), best_scale)
    return np.where(extreme == 0, 0.0, best_scale)


def shared_lut_quantize(
    weight_kn: np.ndarray,
    bits: int,
    group_size: int = 64,
    importance: np.ndarray | None = None,
    iterations: int = 50,
    refinements: int = 4,
) -> CodebookWeight:
    """A "learned NF4": one table for the whole matrix, scaled per group; costs what NF4 costs.

    Each group is divided by its float16 absmax, so every value lies in [-1, 1] as with NF4; the table starts as
    the (weighted) k-means of all normalised values of the matrix, each weighted by its group's squared scale (so
    the error is counted in weight units) times its importance. Then ``refinements`` rounds of: every group's
    scale searched for the current table (``search_scales``), every table entry refitted by least squares,
    sum(w s x) / sum(w s^2) over the weights coded to it. Stored like NF4: a [1, 1, 2^b] float16 table and
    a float16 scale per group."""
    weight, group_size = _check(weight_kn, bits, group_size)
    levels = 1 << bits
    rows = _rows(weight, group_size).astype(np.float64)  # [G, N, group_size]
    weights = _row_importance(importance, weight.shape, group_size)
    scales = np.abs(_group_extremes(weight, group_size)).astype(np.float64)
    scales = np.where(scales == 0, 1.0, scales)
    centres, _ = kmeans_1d(
        (rows / scales[..., None]).reshape(1, -1), levels, (weights * (scales**2)[..., None]).reshape(1, -1), iterations
    )
    table = centres[0]
    for _ in range(refinements):
        scales = search_scales(rows, weights, table)
        codes = _nearest_scaled(rows, table, scales)
        s = np.broadcast_to(scales[..., None], rows.shape)
        numerator = np.bincount(codes.ravel(), (weights * s * rows).ravel(), minlength=levels)
        denominator = np.bincount(codes.ravel(), (weights * s * s).ravel(), minlength=levels)
        table = np.sort(_safe_ratio(numerator, denominator, table))
    scales = search_scales(rows, weights, table)
    return _fixed_table_weight(weight, table.astype(np.float16), scales, bits, group_size)


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """numerator / denominator where the denominator is positive, else ``fallback`` (an empty cluster / group)."""
    positive = denominator > 0
    return np.where(positive, numerator / np.where(positive, denominator, 1.0), fallback)


def _nearest_scaled(rows: np.ndarray, ascending_table: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Codes of the table entries nearest each value / its group's scale: rows [G, N, L], scales [G, N]."""
    midpoints = (ascending_table[1:] + ascending_table[:-1]) * 0.5
    safe = np.where(scales == 0, 1.0, scales)
    return np.searchsorted(midpoints, rows / safe[..., None], side="left")


def codebook_relative_mse(weight_kn: np.ndarray, cw: CodebookWeight, importance: np.ndarray | None = None) -> float:
    """(Importance-weighted) mean squared error of the dequantized weight relative to the weight's mean square."""
    weight = np.asarray(weight_kn, dtype=np.float64)
    error = (cw.dequantize().astype(np.float64) - weight) ** 2
    energy = weight**2
    if importance is not None:
        importance = np.asarray(importance, dtype=np.float64)
        importance = importance[:, None] if importance.ndim == 1 else importance
        error, energy = error * importance, energy * importance
    return float(error.mean() / max(energy.mean(), 1e-30))


def codebook_gptq(weight_kn: np.ndarray, hessian: np.ndarray, cw: CodebookWeight, damp: float = 0.01,
                  block_size: int = 128) -> tuple[CodebookWeight, dict]:
    """``cw``'s tables and scales kept, its codes chosen GPTQ's way: input channel by input channel, each weight
    coded to the table entry nearest its current value, and the coding error spread over the channels not yet coded
    through the inverse Hessian's Cholesky factor (H [K, K] of the layer's input), so the layer's output, not the
    weight, is what the codes preserve. Returns the new codebook weight and info ('damp', 'warnings')."""
    from graphq.algorithms.gptq import round_with_error_feedback

    k, n = np.shape(weight_kn)
    if cw.codes.shape != (k, n):
        raise ValueError(f"codebook of shape {cw.codes.shape} for a weight of shape {(k, n)}")
    table = cw.effective_table().astype(np.float64)  # [G, N, L]
    order = np.argsort(table, axis=2, kind="stable")
    ascending = np.take_along_axis(table, order, axis=2)
    midpoints = (ascending[..., 1:] + ascending[..., :-1]) * 0.5  # [G, N, L - 1]
    group_of = cw.group_of_row()
    columns = np.arange(n)
    codes = np.zeros((k, n), dtype=np.uint8)

    def round_channel(t: int, current: np.ndarray) -> np.ndarray:
        g = group_of[t]
        position = (current[:, None] > midpoints[g]).sum(axis=1)  # the nearest entry, ties to the lower one
        codes[t] = order[g, columns, position]
        return ascending[g, columns, position]

    damp_used, warnings = round_with_error_feedback(weight_kn, hessian, round_channel, damp, block_size)
    result = CodebookWeight(codes, cw.table, cw.bits, cw.group_size, cw.table_scales, cw.fallback_rows)
    return result, {"damp": damp_used, "warnings": warnings}
