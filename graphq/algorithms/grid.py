"""The integer grids graphq emits, in one place (pure numpy).

Every search that scores a quantizer (AWQ's scale and clip search, GPTQ, smoothing's alpha search, the activation
range methods) and every emitter's numpy reference uses these functions, so what is scored is what is emitted.

- Weights, per group of input channels along K of a [K, N] matrix (``compute_scales`` / ``quantize_with_scales``):
  symmetric: signed integers, the value of largest magnitude maps to the most negative level -2^(b-1) (llama.cpp
  Q4_0, onnxruntime), so the scale takes that value's sign; asymmetric: unsigned integers with an integer zero
  point, the range widened to include 0. An all-zero group gets scale 1.
- Activations per tensor (W8A8 static, KV cache): asymmetric over 256 levels, reported in the signed int8
  convention ``x_q = clip(round(x / scale) + offset, -128, 127)`` (stored as uint8 with zero point offset + 128);
  the range always contains 0; an empty range gets ``TINY_SCALE``.
- Activations per token (W8A8 dynamic): symmetric, ``scale = max(|x|, MIN_TOKEN_ABSMAX) / 127`` per row, levels
  -127..127, computed in the graph by ReduceMax/Abs/Div/Round/Clip.

Rounding is half to even everywhere (numpy's and ONNX's Round, QuantizeLinear).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Per-tensor activations: signed int8 convention of the offsets (MindIE), 256 levels.
ACT_QMIN, ACT_QMAX = -128, 127
ACT_LEVELS = 256
# A constant-zero activation has an empty range; this scale keeps QuantizeLinear defined (never divide by zero).
TINY_SCALE = 1e-8
# Per-token activations: symmetric levels; an all-zero row's scale is clamped so the graph never divides by zero.
PER_TOKEN_QMAX = 127
MIN_TOKEN_ABSMAX = 1e-12


def integer_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The weight levels: [-2^(b-1), 2^(b-1)-1] signed when symmetric, [0, 2^b-1] unsigned otherwise."""
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
    """Scales (and zero points) that map each group's range onto the integer grid; [n_groups, N] each.

    Symmetric: only values of the opposite sign within one step of the extreme round past the top level and clip
    by one step. Padding rows of a partial last group are zeros, which change neither rule.
    """
    return group_scales(grouped(weight, group_size), bits, symmetric)


def group_scales(groups: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """``compute_scales`` of a weight already viewed as [n_groups, group_size, N] (``grouped``)."""
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


def round_to_grid(
    weight: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int, group_size: int
) -> np.ndarray:
    """The integer codes of a [K, N] weight on the grid of per-group scales (and zero points)."""
    symmetric = zero_points is None
    qmin, qmax = integer_range(bits, symmetric)
    k = weight.shape[0]
    q = np.round(weight / np.repeat(scales, group_size, axis=0)[:k])
    if zero_points is not None:
        q = q + np.repeat(zero_points, group_size, axis=0)[:k]
    return np.clip(q, qmin, qmax).astype(np.int8 if symmetric else np.uint8)


def fake_quantize_weight(weight_kn: np.ndarray, bits: int = 8, group_size: int = -1, symmetric: bool = True) -> np.ndarray:
    """What the emitted weight dequantizes to (float32 [K, N]); defaults: W8A8's int8 per output channel."""
    weight = np.asarray(weight_kn, dtype=np.float32)
    k = weight.shape[0]
    gs = k if group_size == -1 else group_size
    scales, zero_points = compute_scales(weight, bits, gs, symmetric)
    q = round_to_grid(weight, scales, zero_points, bits, gs).astype(np.float32)
    if zero_points is not None:
        q -= np.repeat(zero_points, gs, axis=0)[:k].astype(np.float32)
    return (q * np.repeat(scales, gs, axis=0)[:k]).astype(np.float32)


def fake_quantize_groups(groups: np.ndarray, bits: int, symmetric: bool) -> np.ndarray:
    """``fake_quantize_weight`` of a weight viewed as [n_groups, group_size, N] (``grouped``), in that layout and bit
    for bit the same values: the searches score many candidates per weight and skip the regrouping copies."""
    qmin, qmax = integer_range(bits, symmetric)
    scales, zero_points = group_scales(groups, bits, symmetric)
    scales = scales[:, None, :]
    q = np.round(groups / scales)
    if zero_points is None:
        return np.clip(q, qmin, qmax, out=q) * scales
    zero = zero_points.astype(np.float32)[:, None, :]
    q += zero
    np.clip(q, qmin, qmax, out=q)
    q -= zero
    return q * scales


@dataclass
class ActivationRange:
    """A per-tensor clip range and the quantization parameters it implies."""

    lo: float
    hi: float
    scale: float
    offset: int  # signed int8 convention
    note: str | None = None

    @property
    def zero_point_u8(self) -> int:
        return self.offset - ACT_QMIN


def range_to_qparams(lo: float, hi: float) -> ActivationRange:
    """Asymmetric 8-bit parameters for [lo, hi] (widened to include 0); guards an empty range."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    note = None
    scale = np.float32((hi - lo) / (ACT_LEVELS - 1))
    if not scale > 0 or not np.isfinite(scale):
        scale = np.float32(TINY_SCALE)
        note = f"constant activations (range [{lo:g}, {hi:g}]): scale set to {TINY_SCALE:g} instead of 0"
    zero_point = int(np.clip(np.round(-lo / float(scale)), 0, ACT_LEVELS - 1))
    return ActivationRange(lo=lo, hi=hi, scale=float(scale), offset=zero_point + ACT_QMIN, note=note)


def fake_quantize(x: np.ndarray, scale: float, offset: int) -> np.ndarray:
    """What QuantizeLinear + DequantizeLinear compute per tensor (round half to even, saturate), in float32."""
    scale = np.float32(scale)
    q = np.clip(np.round(np.asarray(x, dtype=np.float32) / scale) + offset, ACT_QMIN, ACT_QMAX)
    return ((q - offset) * scale).astype(np.float32)


def fake_quantize_range(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Per-tensor fake quantization with the parameters ``range_to_qparams`` gives [lo, hi]."""
    qp = range_to_qparams(lo, hi)
    return fake_quantize(x, qp.scale, qp.offset)


def fake_quantize_per_token(x: np.ndarray) -> np.ndarray:
    """What the in-graph per-token quantization computes (float32, round half to even)."""
    x = np.asarray(x, dtype=np.float32)
    scale = np.maximum(np.abs(x).max(axis=-1, keepdims=True), np.float32(MIN_TOKEN_ABSMAX)) / np.float32(PER_TOKEN_QMAX)
    q = np.clip(np.round(x / scale), -PER_TOKEN_QMAX, PER_TOKEN_QMAX)
    return (q * scale).astype(np.float32)
