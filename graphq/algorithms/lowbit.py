"""W8A8S weights, msModelSlim's sparse "lowbit" scheme (pure numpy): 4-bit levels stored in int8, outliers on 8 bits.

Per output channel (a column of the [K, N] weight), after pruning:

- ``s`` = max |w| / 127 is the int8 scale (symmetric, per channel, what W8A8 stores as ``deq_scale / input_scale``);
- the channel's *outliers* are its weights beyond ``sigma_factor`` standard deviations of its kept (nonzero)
  weights, at most ``ceil(fraction * K)`` of them (the largest first); they are rounded on the int8 grid (step s);
- every other kept weight (an *inlier*) is rounded to one of 16 levels j * m * s, j in [-8, 7], with the integer
  step ``m`` = ceil(b / (7.5 s)) where b bounds the inliers (m <= 16 so the levels fit int8; at m = 16 s grows
  so the levels still cover b); inliers past b clip to the outermost level.

The stored codes are plain int8 (the model runs as W8A8: zeros and all), but an inlier code is m times a 4-bit
value, which the W8A8SC codec (graphq.artifacts.w8a8sc) stores in 4 bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphq.algorithms.rtn import QuantizedWeight

MAX_STEP = 16  # -8 * 16 = -128: the 4-bit levels must fit int8


@dataclass(frozen=True)
class LowbitGrid:
    """The W8A8S weight grid as the smoothing alpha search scores it (graphq.algorithms.smoothing.WeightGrid's
    interface): 4-bit levels per channel with the outliers on int8, far coarser than W8A8's int8."""

    sigma_factor: float = 3.0
    fraction: float = 0.01

    def fake_quantize(self, weight_kn: np.ndarray) -> np.ndarray:
        return quantize_lowbit(weight_kn, self.sigma_factor, self.fraction)[0].dequantize()

    def describe(self) -> str:
        return f"lowbit per channel (4-bit levels, outliers beyond {self.sigma_factor:g} sigma on int8)"


def lowbit_steps(weight_kn: np.ndarray, sigma_factor: float, fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scale [N], integer step m [N], outlier mask [K, N]) of a [K, N] weight, per the rules above."""
    weight = np.asarray(weight_kn, dtype=np.float64)
    k, n = weight.shape
    magnitude = np.abs(weight)
    kept = weight != 0
    count = np.maximum(kept.sum(axis=0), 1)
    mean = weight.sum(axis=0) / count
    std = np.sqrt(np.maximum((np.where(kept, weight - mean, 0.0) ** 2).sum(axis=0) / count, 0.0))
    beyond = kept & (np.abs(weight - mean) > sigma_factor * std)
    cap = int(np.ceil(fraction * k))
    # At most ``cap`` outliers per channel: the largest |w| among those beyond the bound.
    order = np.argsort(-np.where(beyond, magnitude, -1.0), axis=0, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(k)[:, None].repeat(n, axis=1), axis=0)
    outliers = beyond & (rank < cap)
    absmax = magnitude.max(axis=0)
    inlier_max = np.where(outliers, 0.0, magnitude).max(axis=0)
    bound = np.minimum(np.maximum(sigma_factor * std, 0.0), inlier_max) if cap else inlier_max
    bound = np.where(outliers.any(axis=0), bound, inlier_max)
    scale = np.where(absmax > 0, absmax / 127.0, 1.0)
    step = np.maximum(1, np.ceil(bound / (7.5 * scale))).astype(np.int64)
    wide = step > MAX_STEP
    step[wide] = MAX_STEP
    scale = np.where(wide, np.maximum(scale, bound / (7.5 * MAX_STEP)), scale)
    return scale.astype(np.float32), step, outliers


def quantize_lowbit(weight_kn: np.ndarray, sigma_factor: float = 3.0, fraction: float = 0.01) -> tuple[QuantizedWeight, dict]:
    """The W8A8S int8 weight (per-channel symmetric, zeros kept exactly) and report fields."""
    weight = np.asarray(weight_kn, dtype=np.float32)
    scale, step, outliers = lowbit_steps(weight, sigma_factor, fraction)
    s = scale.astype(np.float32)[None, :]
    inlier = np.clip(np.round(weight / (s * step[None, :].astype(np.float32))), -8, 7) * step[None, :]
    outlier = np.clip(np.round(weight / s), -127, 127)
    codes = np.where(outliers, outlier, inlier)
    codes = np.where(weight == 0, 0, codes).astype(np.int8)
    qw = QuantizedWeight(q=codes, scales=scale[None, :].astype(np.float32), zero_points=None, bits=8,
                         group_size=weight.shape[0])
    info = {"lowbit_outlier_fraction": float(outliers.mean()), "lowbit_mean_step": float(step.mean())}
    return qw, info


def is_lowbit(codes_kn: np.ndarray, step: np.ndarray, outliers: np.ndarray) -> bool:
    """Whether int8 codes follow the lowbit rule (inliers multiples of their channel's step within [-8m, 7m])."""
    inl = ~outliers
    j = codes_kn.astype(np.int64) // step[None, :]
    return bool(np.all((codes_kn.astype(np.int64) % step[None, :] == 0)[inl] & (j >= -8)[inl] & (j <= 7)[inl]))


def lowbit_gptq(weight_kn: np.ndarray, hessian: np.ndarray, sigma_factor: float = 3.0, fraction: float = 0.01,
                damp: float = 0.01, block_size: int = 128) -> tuple[QuantizedWeight, dict]:
    """The lowbit levels rounded GPTQ's way: input channel by input channel, each rounding error spread over the
    channels not yet rounded through the inverse Hessian's Cholesky factor (H [K, K] of the layer's input).

    The grid (scale, step m, outliers) of every channel is fixed up front from ``weight_kn`` as quantize_lowbit
    fixes it, and the zeros of ``weight_kn`` are the pruning mask: they stay zero and their drift is compensated
    like a rounding error (SparseGPT's update with the mask held fixed). Returns what quantize_lowbit returns.
    """
    from graphq.algorithms.gptq import round_with_error_feedback

    weight = np.asarray(weight_kn, dtype=np.float32)
    k, n = weight.shape
    scale, step, outliers = lowbit_steps(weight, sigma_factor, fraction)
    keep = weight != 0
    s = scale.astype(np.float64)
    inlier_step = s * step
    codes = np.zeros((n, k), dtype=np.int16)

    def round_channel(t: int, current: np.ndarray) -> np.ndarray:
        inlier = np.clip(np.round(current / inlier_step), -8, 7) * step
        outlier = np.clip(np.round(current / s), -127, 127)
        codes[:, t] = np.where(keep[t], np.where(outliers[t], outlier, inlier), 0)
        return codes[:, t] * s

    damp_used, warnings = round_with_error_feedback(weight, hessian, round_channel, damp, block_size)
    qw = QuantizedWeight(q=np.ascontiguousarray(codes.T).astype(np.int8), scales=scale[None, :].astype(np.float32),
                         zero_points=None, bits=8, group_size=k)
    info = {"lowbit_outlier_fraction": float(outliers.mean()), "lowbit_mean_step": float(step.mean()),
            "damp": damp_used, "warnings": warnings}
    return qw, info
