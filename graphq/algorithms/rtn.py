"""Round-to-nearest integer quantization of a weight matrix, per group of input channels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class QuantizedWeight:
    """A [K, N] weight (K input channels, N output channels) quantized in groups along K.

    ``q`` holds integers: signed in [-2^(b-1), 2^(b-1)-1] when symmetric (no zero point),
    unsigned in [0, 2^b-1] with ``zero_points`` when asymmetric.
    ``scales`` and ``zero_points`` have shape [n_groups, N]; the last group may be partial.
    """

    q: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None

    @property
    def n_groups(self) -> int:
        return self.scales.shape[0]

    def expand(self, per_group: np.ndarray) -> np.ndarray:
        """Repeat a [n_groups, N] array to [K, N]."""
        return np.repeat(per_group, self.group_size, axis=0)[: self.q.shape[0]]

    def output_columns(self, start: int, stop: int) -> "QuantizedWeight":
        """The quantized weight of output channels [start, stop): groups run along K, so N splits freely."""
        zero_points = None if self.zero_points is None else self.zero_points[:, start:stop]
        return QuantizedWeight(self.q[:, start:stop], self.scales[:, start:stop], zero_points, self.bits, self.group_size)

    def dequantize(self) -> np.ndarray:
        q = self.q.astype(np.float32)
        if self.zero_points is not None:
            q = q - self.expand(self.zero_points).astype(np.float32)
        return (q * self.expand(self.scales)).astype(np.float32)


def weight_relative_mse(weight: np.ndarray, qw: QuantizedWeight) -> float:
    """Mean squared quantization error of the weight, relative to the weight's mean square (report field)."""
    return float(np.mean((qw.dequantize() - weight) ** 2) / max(np.mean(weight**2), 1e-30))


def integer_range(bits: int, symmetric: bool) -> tuple[int, int]:
    if symmetric:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def grouped(weight: np.ndarray, group_size: int) -> np.ndarray:
    """View a [K, N] matrix as [n_groups, group_size, N], padding the last group with zeros."""
    k, n = weight.shape
    n_groups = -(-k // group_size)
    padded = np.zeros((n_groups * group_size, n), dtype=np.float32)
    padded[:k] = weight
    return padded.reshape(n_groups, group_size, n)


def compute_scales(
    weight: np.ndarray, bits: int, group_size: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Scales (and zero points) that map each group's range onto the integer grid.

    Symmetric: the value of largest magnitude maps to the most negative integer (-2^(b-1)), as llama.cpp's Q4_0 and
    onnxruntime's quantizer do, so all 2^b levels are used; the scale takes that value's sign. Only values of the
    opposite sign within 1/16 of the extreme (4 bits) round past the top level and clip by one step.
    Asymmetric: the range is widened to include zero so that zero is exactly representable, and the zero point is an
    integer in the unsigned range. Padding rows of a partial last group are zeros, which change neither rule.
    """
    groups = grouped(weight, group_size)
    qmin, qmax = integer_range(bits, symmetric)
    if symmetric:
        rows = np.abs(groups).argmax(axis=1)
        extreme = np.take_along_axis(groups, rows[:, None, :], axis=1)[:, 0, :]
        scales = extreme / qmin
        scales[scales == 0] = 1.0
        return scales.astype(np.float32), None
    wmin = np.minimum(groups.min(axis=1), 0.0)
    wmax = np.maximum(groups.max(axis=1), 0.0)
    scales = (wmax - wmin) / (qmax - qmin)
    scales[scales == 0] = 1.0
    zero_points = np.clip(np.round(-wmin / scales), qmin, qmax)
    return scales.astype(np.float32), zero_points.astype(np.uint8)


def quantize_with_scales(
    weight: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    bits: int,
    group_size: int,
) -> QuantizedWeight:
    """Round a [K, N] weight onto the grid given by per-group scales and zero points."""
    symmetric = zero_points is None
    qmin, qmax = integer_range(bits, symmetric)
    k = weight.shape[0]
    expanded_scales = np.repeat(scales, group_size, axis=0)[:k]
    q = np.round(weight / expanded_scales)
    if zero_points is not None:
        q = q + np.repeat(zero_points, group_size, axis=0)[:k]
    q = np.clip(q, qmin, qmax).astype(np.int8 if symmetric else np.uint8)
    return QuantizedWeight(q=q, scales=scales, zero_points=zero_points, bits=bits, group_size=group_size)


def quantize_rtn(weight: np.ndarray, bits: int, group_size: int, symmetric: bool) -> QuantizedWeight:
    """Round-to-nearest quantization of a [K, N] float weight; group_size -1 means one group per column."""
    weight = np.asarray(weight, dtype=np.float32)
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {weight.shape}")
    if group_size == -1:
        group_size = weight.shape[0]
    scales, zero_points = compute_scales(weight, bits, group_size, symmetric)
    return quantize_with_scales(weight, scales, zero_points, bits, group_size)
