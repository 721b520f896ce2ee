"""Weight pruning for one linear layer (pure numpy): masks by magnitude and by Wanda, and SparseGPT's OBS update.

All weights are graphq's [K, N] = [in, out] layout (y = x @ W). A *keep mask* is a bool [K, N] array, True where
the weight survives. Two layouts of zeros:

- unstructured, ``sparsity`` F: a fraction F of the weights is zeroed (``round(F * K)`` per output channel for Wanda
  and SparseGPT, which rank within an output channel; ``round(F * K * N)`` over the whole layer for magnitude);
- N:M (``pattern`` (n, m)): in every run of m consecutive input channels of one output channel, n weights are kept
  (2:4, 4:8: the layout sparse tensor cores and NPUs accelerate). K must be a multiple of m.

SparseGPT (Frantar & Alistarh, 2023) prunes and (optionally) quantizes in one left-to-right pass over the input
channels: each pruned or rounded weight's error is spread over the channels not yet visited through the inverse
Hessian's Cholesky factor (the OBS update), with lazy blocks of ``block_size`` channels and the mask of each block
chosen when the block is reached, from w^2 / [U]_ii^2 (U: the upper Cholesky factor of H^-1).
"""

from __future__ import annotations

import time

import numpy as np

from graphq.algorithms.channel_stats import ChannelSum
from graphq.algorithms.gptq import inverse_factor_without_dead_channels
from graphq.algorithms.rtn import QuantizedWeight, compute_scales, integer_range, round_to_grid

Pattern = tuple[int, int]  # (kept n, run length m)


def parse_pattern(spec: str | None) -> Pattern | None:
    """"2:4" -> (2, 4); None -> None. Raises ValueError (the config turns it into one line) on anything else."""
    if spec is None:
        return None
    parts = str(spec).split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--sparsity-pattern must be N:M such as 2:4 or 4:8, got {spec!r}")
    n, m = (int(p) for p in parts)
    if not 0 < n < m:
        raise ValueError(f"--sparsity-pattern {spec}: N must be in [1, M) (N weights kept of every M), got N={n}, M={m}")
    return n, m


def check_pattern_fits(pattern: Pattern | None, in_features: int, layer_name: str) -> None:
    """N:M runs along K: K must be a multiple of M (raises ValueError naming the layer)."""
    if pattern is not None and in_features % pattern[1]:
        raise ValueError(f"--sparsity-pattern {pattern[0]}:{pattern[1]}: {layer_name} has {in_features} input channels, "
                         f"not a multiple of {pattern[1]}")


def pattern_sparsity(pattern: Pattern) -> float:
    return 1.0 - pattern[0] / pattern[1]


def _keep_lowest_pruned(scores: np.ndarray, count: int, axis: int) -> np.ndarray:
    """Keep mask that drops the ``count`` lowest scores along ``axis`` (ties broken by position: deterministic)."""
    keep = np.ones(scores.shape, dtype=bool)
    if count <= 0:
        return keep
    order = np.argsort(scores, axis=axis, kind="stable")
    dropped = np.take(order, np.arange(count), axis=axis)
    np.put_along_axis(keep, dropped, False, axis=axis)
    return keep


def nm_keep_mask(scores: np.ndarray, pattern: Pattern) -> np.ndarray:
    """Per output channel, in every run of m input channels keep the n highest scores ([K, N] -> bool [K, N])."""
    n_keep, m = pattern
    k, n = scores.shape
    if k % m:
        raise ValueError(f"{k} input channels are not a multiple of {m}")
    runs = scores.reshape(k // m, m, n)
    return _keep_lowest_pruned(runs, m - n_keep, axis=1).reshape(k, n)


def row_keep_mask(scores: np.ndarray, sparsity: float, pattern: Pattern | None) -> np.ndarray:
    """Prune within each output channel: ``round(sparsity * K)`` lowest scores of the column, or N:M."""
    if pattern is not None:
        return nm_keep_mask(scores, pattern)
    return _keep_lowest_pruned(scores, int(round(sparsity * scores.shape[0])), axis=0)


def magnitude_keep_mask(weight_kn: np.ndarray, sparsity: float, pattern: Pattern | None) -> np.ndarray:
    """Data-free: the smallest |w| of the whole layer (``round(sparsity * K * N)`` of them), or N:M by |w|."""
    scores = np.abs(np.asarray(weight_kn, dtype=np.float32))
    if pattern is not None:
        return nm_keep_mask(scores, pattern)
    flat = _keep_lowest_pruned(scores.reshape(-1), int(round(sparsity * scores.size)), axis=0)
    return flat.reshape(scores.shape)


def wanda_keep_mask(weight_kn: np.ndarray, input_sq_norm: np.ndarray, sparsity: float, pattern: Pattern | None) -> np.ndarray:
    """Wanda (Sun et al., 2023): score |W_kn| * ||X_k||_2, pruned per output channel (or N:M)."""
    norm = np.sqrt(np.maximum(np.asarray(input_sq_norm, dtype=np.float64), 0.0))
    scores = np.abs(np.asarray(weight_kn, dtype=np.float64)) * norm[:, None]
    return row_keep_mask(scores, sparsity, pattern)


class InputSquareNorm(ChannelSum):
    """Streams sum_t x_tk^2 per input channel (float64): Wanda's ||X_k||^2."""

    def term(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.float64)
        return np.einsum("tk,tk->k", rows, rows)

    def value(self) -> np.ndarray:
        if self._sum is None:
            raise ValueError("no calibration inputs were added")
        return self._sum.copy()


def sparsegpt_prune(
    weight_kn: np.ndarray,
    hessian: np.ndarray,
    sparsity: float,
    pattern: Pattern | None = None,
    *,
    bits: int | None = None,
    group_size: int = -1,
    symmetric: bool = True,
    keep_mask: np.ndarray | None = None,
    damp: float = 0.01,
    block_size: int = 128,
) -> tuple[np.ndarray, QuantizedWeight | None, np.ndarray, dict]:
    """SparseGPT on a [K, N] weight against H [K, K]: returns (float weight, quantized weight or None, keep, info).

    ``bits`` None: prune only (the surviving weights are updated in float). With ``bits`` the kept weights are
    rounded onto the grid as they are visited (GPTQ's rounding; groups of ``group_size`` along K, -1 per channel,
    a group's grid fixed when its first channel is reached, from the weights as updated so far), so pruning and
    quantization errors are compensated together. ``keep_mask`` given: that mask is used as is (Wanda or
    magnitude followed by GPTQ rounding); otherwise each block's mask is chosen from w^2 / U_ii^2 per output channel
    (``round(sparsity * block)`` pruned per block, or N:M with the run chosen when its first channel is reached).
    The returned float weight is what the quantized one dequantizes to (when quantizing), with exact zeros.
    """
    started = time.perf_counter()
    w = np.array(weight_kn, dtype=np.float64).T.copy()  # [N, K]: columns are input channels, as in the paper
    n, k = w.shape
    if np.shape(hessian) != (k, k):
        raise ValueError(f"Hessian shape {np.shape(hessian)} does not match weight shape {tuple(np.shape(weight_kn))}")
    if pattern is not None and k % pattern[1]:
        raise ValueError(f"{k} input channels are not a multiple of {pattern[1]}")
    upper, damp_used, warnings = inverse_factor_without_dead_channels(w, hessian, damp)
    gs = k if group_size == -1 else group_size
    if bits is not None and gs < k:
        block_size = max(gs, block_size - block_size % gs)  # groups never straddle a block: grids see current weights
    qmin, qmax = integer_range(bits or 8, symmetric)
    n_groups = -(-k // gs)
    scales = np.ones((n_groups, n), dtype=np.float32)
    zeros = None if symmetric else np.zeros((n_groups, n), dtype=np.uint8)
    keep = np.ones((n, k), dtype=bool)
    given = None if keep_mask is None else np.asarray(keep_mask, dtype=bool).T
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        count = i2 - i1
        w1 = w[:, i1:i2].copy()
        errors = np.zeros((n, count), dtype=np.float64)
        u1 = upper[i1:i2, i1:i2]
        diag = np.diagonal(u1)
        if given is not None:
            keep1 = given[:, i1:i2].copy()
        elif pattern is None:
            scores = w1**2 / diag[None, :] ** 2
            keep1 = _keep_lowest_pruned(scores, int(round(sparsity * count)), axis=1)
        else:
            keep1 = np.ones((n, count), dtype=bool)
        for i in range(count):
            column = i1 + i
            if given is None and pattern is not None and column % pattern[1] == 0:
                m = pattern[1]
                scores = w1[:, i : i + m] ** 2 / diag[None, i : i + m] ** 2
                keep1[:, i : i + m] = _keep_lowest_pruned(scores, m - pattern[0], axis=1)
            current = w1[:, i]
            q = np.where(keep1[:, i], current, 0.0)
            if bits is not None:
                g = column // gs
                if column % gs == 0:
                    # The grid of a group is fixed at its first channel from the current weights (a group lies
                    # within one block, so w1 holds them; per channel, at column 0 nothing is updated yet), over
                    # the survivors when the mask is already known.
                    if gs == k:
                        if given is not None:
                            rows = np.where(given, w, 0.0)
                        elif pattern is None and k <= count:
                            rows = np.where(keep1, w1, 0.0)
                        else:
                            rows = w
                    else:
                        rows = w1[:, i : i + gs]
                        if given is not None or pattern is None:
                            rows = np.where(keep1[:, i : i + gs], rows, 0.0)
                    s, z = compute_scales(rows.T.astype(np.float32), bits, rows.shape[1], symmetric)
                    scales[g] = s[0]
                    if zeros is not None:
                        zeros[g] = z[0]
                zero = 0.0 if zeros is None else zeros[g].astype(np.float64)
                codes = np.clip(np.round(q.astype(np.float32) / scales[g]) + zero, qmin, qmax)
                q = (codes - zero) * scales[g].astype(np.float64)
                q = np.where(keep1[:, i], q, 0.0)
            err = (current - q) / u1[i, i]
            w1[:, i:] -= np.outer(err, u1[i, i:])
            w1[:, i] = q
            errors[:, i] = err
        w[:, i1:i2] = w1
        keep[:, i1:i2] = keep1
        if i2 < k:
            w[:, i2:] -= errors @ upper[i1:i2, i2:]
    pruned_kn = np.ascontiguousarray(w.T.astype(np.float32))
    keep_kn = np.ascontiguousarray(keep.T)
    pruned_kn[~keep_kn] = 0.0
    quantized = None
    if bits is not None:
        codes = round_to_grid(pruned_kn, scales, zeros, bits, gs)
        quantized = QuantizedWeight(q=codes, scales=scales, zero_points=zeros, bits=bits, group_size=gs)
        quantized = keep_pruned_zero(quantized, keep_kn)
        pruned_kn = quantized.dequantize()
    info = {"damp": damp_used, "warnings": warnings, "seconds": time.perf_counter() - started}
    return pruned_kn, quantized, keep_kn, info


def keep_pruned_zero(qw: QuantizedWeight, keep_kn: np.ndarray) -> QuantizedWeight:
    """The quantized weight with every pruned position on its exact-zero code (0, or the zero point when
    asymmetric: an integer, so it dequantizes to exactly 0): rounding never revives a pruned weight."""
    q = qw.q.copy()
    if qw.zero_points is None:
        q[~keep_kn] = 0
    else:
        zero_code = qw.expand(qw.zero_points)
        q[~keep_kn] = zero_code[~keep_kn]
    return QuantizedWeight(q=q, scales=qw.scales, zero_points=qw.zero_points, bits=qw.bits, group_size=qw.group_size)


def zero_fraction(qw: QuantizedWeight) -> float:
    """Measured sparsity of a quantized weight: the fraction of codes that dequantize to exactly 0."""
    if qw.zero_points is None:
        return float(np.mean(qw.q == 0))
    return float(np.mean(qw.q == qw.expand(qw.zero_points)))
