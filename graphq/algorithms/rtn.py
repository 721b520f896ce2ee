"""Round-to-nearest integer quantization of a weight matrix, per group of input channels (the grid: ``grid.py``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphq.algorithms.grid import compute_scales, grouped, integer_range, round_to_grid  # noqa: F401 (re-exported)


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


def quantize_with_scales(
    weight: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    bits: int,
    group_size: int,
) -> QuantizedWeight:
    """Round a [K, N] weight onto the grid given by per-group scales and zero points."""
    q = round_to_grid(weight, scales, zero_points, bits, group_size)
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
