"""AWQ (Lin et al., 2023) math: activation-aware channel scaling and weight clipping, as AutoAWQ does it.

The usual order for a group of linears sharing one input x (e.g. q/k/v after a norm):
1. ``s, _ = search_awq_scales(x, [W_q, W_k, W_v], ...)`` with the unscaled weights;
2. fold: the producer of x is divided by s (``fold_scales_into_norm`` or ``scale_weight_columns``), each
   consumer's rows multiplied by s (``scale_weight_rows``), which leaves the float model unchanged;
3. per linear, ``clip, _ = search_awq_clip(x / s, W * s, ...)`` and ``quantize_with_clip``.

Quantization inside the searches is graphq's RTN, so scales and codes follow its conventions exactly and a
"no scaling, no clipping" outcome reproduces ``quantize_rtn`` bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from graphq.algorithms.channel_stats import ChannelSum
from graphq.algorithms.grid import fake_quantize_groups, fake_quantize_range, integer_range
from graphq.algorithms.rtn import QuantizedWeight, grouped as _grouped, quantize_rtn

# AutoAWQ's floor on mag**ratio, so that channels never seen active do not get a zero (or inf) scale.
_MIN_SCALE = 1e-4
# Elements of one [groups, tokens, columns] error tensor in the clip search; bounds memory to ~64 MB.
_CLIP_CHUNK_ELEMENTS = 1 << 24
# Both grid searches score every COARSE_STEP-th candidate (and the last), then every candidate between the best
# one's neighbours: 12 of the 20 ratios (of the 21 clip factors). That is the whole grid's choice wherever the error
# is unimodal along it, as it is along the ratios; the per-group clip error is jagged, and there the total comes
# within a fraction of a percent of the whole grid's (tests/test_awq.py). 1 scores the whole grid.
COARSE_STEP = 4


def _coarse_indices(n: int, step: int) -> np.ndarray:
    return np.array(sorted(set(range(0, n, max(step, 1))) | {n - 1}))


def _refinements(best: np.ndarray, coarse: np.ndarray, step: int) -> list[np.ndarray]:
    """For each element's best coarse index, the grid indices strictly between its coarse neighbours, one array per
    offset (an offset that falls outside that interval repeats the best index, which changes nothing)."""
    position = np.searchsorted(coarse, best)
    below = coarse[np.maximum(position - 1, 0)]
    above = coarse[np.minimum(position + 1, len(coarse) - 1)]
    candidates = []
    for offset in [o for o in range(-(step - 1), step) if o != 0]:
        index = best + offset
        candidates.append(np.where((index > below) & (index < above), index, best))
    return candidates


class ChannelMagnitude(ChannelSum):
    """Streams mean |x| per input channel, the activation statistic AWQ scales by.

    The mean over every calibration token is steadier than the one over the small sample the grid search
    runs on, so graph passes can feed all of calibration here and the sample to ``search_awq_scales``.
    """

    def term(self, rows: np.ndarray) -> np.ndarray:
        return np.abs(rows).sum(axis=0, dtype=np.float64)

    def mean(self) -> np.ndarray:
        if self._sum is None or self._n == 0:
            raise ValueError("no activations were added")
        return self._sum / self._n


class ChannelRange:
    """Streams min and max per input channel over every calibration token (``low``, ``high`` [K]): the per-tensor
    activation range of x / s is then (min_k low_k / s_k, max_k high_k / s_k), as the static range pass will see
    it, extremes (attention sinks) included, which a token sample rarely holds."""

    def __init__(self) -> None:
        self.low: np.ndarray | None = None
        self.high: np.ndarray | None = None

    def add(self, x: np.ndarray) -> None:
        part = self.partial(x)
        if part is not None:
            self.merge(part, 0)

    def partial(self, x: np.ndarray, tokens_before: int = 0) -> np.ndarray | None:
        """One batch's [2, K] (min, max), computed anywhere (a worker); ``merge`` takes it (min and max do not
        depend on the order)."""
        rows = np.asarray(x, dtype=np.float32)
        rows = rows.reshape(-1, rows.shape[-1])
        return np.stack([rows.min(axis=0), rows.max(axis=0)]) if len(rows) else None

    def merge(self, part: np.ndarray | None, tokens: int) -> None:
        if part is None:
            return
        low, high = part
        if self.low is None:
            self.low, self.high = low, high
        elif low.shape != self.low.shape:
            raise ValueError(f"expected {self.low.shape[0]} input channels, got {low.shape[0]}")
        else:
            self.low, self.high = np.minimum(self.low, low), np.maximum(self.high, high)

    def ranges(self) -> tuple[np.ndarray, np.ndarray]:
        if self.low is None:
            raise ValueError("no activations were added")
        return self.low, self.high


#: The widest block ``InputGram`` keeps of an input too wide for its whole Gram: the searches need only each weight
#: group's diagonal block, and every group size graphq takes below a whole row (32, 64, 128) divides it.
GRAM_BLOCK = 128


class InputGram:
    """Streams the Gram matrix X^T X [K, K] of one linear input over every calibration token; of inputs wider than
    ``max_channels``, only its diagonal blocks of ``GRAM_BLOCK`` channels.

    The searches' output error ||x D||^2 (D a weight difference) is then sum(D * (G D)): exact over all tokens, and
    K^2 N per candidate instead of the token sample's T K N. With the streaming itself (K^2 / 2 per token) that
    pays while K is well below the sample's T (2048 tokens by default), hence the default bound. What a weight
    group alone contributes, d^T G_gg d, needs only the diagonal blocks (``diagonal_blocks``), which cost K x 128 per
    token and K x group per candidate at any width.
    """

    def __init__(self, max_channels: int = 1024) -> None:
        self.max_channels = max_channels
        self._sum: np.ndarray | None = None
        self.tokens = 0

    def add(self, x: np.ndarray) -> None:
        rows = np.asarray(x).reshape(-1, np.shape(x)[-1])
        self.merge(self.partial(rows), rows.shape[0])

    def partial(self, x: np.ndarray, tokens_before: int = 0) -> np.ndarray | None:
        """One batch's X^T X [K, K] (or its diagonal blocks [K / GRAM_BLOCK, GRAM_BLOCK, GRAM_BLOCK] for a wide
        input), float32, computed anywhere; ``merge`` sums them in float64."""
        rows = np.asarray(x, dtype=np.float32)
        rows = rows.reshape(-1, rows.shape[-1])
        if not len(rows):
            return None
        k = rows.shape[-1]
        if k <= self.max_channels:
            return rows.T @ rows  # one buffer times its transpose: numpy calls SYRK
        blocks = -(-k // GRAM_BLOCK)
        padded = np.zeros((len(rows), blocks * GRAM_BLOCK), dtype=np.float32)
        padded[:, :k] = rows
        by_block = np.ascontiguousarray(padded.reshape(len(rows), blocks, GRAM_BLOCK).transpose(1, 0, 2))
        return np.matmul(by_block.transpose(0, 2, 1), by_block)

    def merge(self, part: np.ndarray | None, tokens: int) -> None:
        if part is None:
            return
        if self._sum is None:
            self._sum = np.zeros(part.shape, dtype=np.float64)
        elif part.shape != self._sum.shape:
            raise ValueError(f"expected a Gram term of shape {self._sum.shape}, got {part.shape}")
        self._sum += part
        self.tokens += tokens

    @property
    def whole(self) -> bool:
        return self._sum is not None and self._sum.ndim == 2

    def gram(self) -> np.ndarray | None:
        """X^T X / tokens (float32), or None when the input was too wide (or nothing was added)."""
        if not self.whole or self.tokens == 0:
            return None
        return (self._sum / self.tokens).astype(np.float32)

    def diagonal_blocks(self, group_size: int, channels: int) -> np.ndarray | None:
        """The diagonal blocks [ceil(K / group_size), group_size, group_size] of X^T X / tokens (float32; the last
        block zero-padded past ``channels``), or None where they were not kept (nothing added, or a wide input's
        group that does not divide ``GRAM_BLOCK``). ``group_size`` -1 is one group of every channel, the whole Gram."""
        if self._sum is None or self.tokens == 0:
            return None
        group_size = channels if group_size == -1 else group_size
        if self.whole:
            return gram_diagonal_blocks(self._sum / self.tokens, group_size)
        if group_size <= 0 or GRAM_BLOCK % group_size:
            return None
        blocks = np.concatenate([gram_diagonal_blocks(block, group_size) for block in self._sum / self.tokens])
        return blocks[: -(-channels // group_size)]


def gram_diagonal_blocks(gram: np.ndarray, group_size: int) -> np.ndarray:
    """The [ceil(K / group_size), group_size, group_size] diagonal blocks of a [K, K] Gram matrix (float32), the last
    zero-padded: what each weight group's rounding error costs alone, d^T G_gg d."""
    k = np.shape(gram)[0]
    n_groups = -(-k // group_size)
    padded = np.zeros((n_groups * group_size, n_groups * group_size), dtype=np.float32)
    padded[:k, :k] = gram
    return np.stack([padded[g * group_size:(g + 1) * group_size, g * group_size:(g + 1) * group_size]
                     for g in range(n_groups)])


def scale_diagonal_blocks(blocks: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The diagonal blocks of diag(1/s) G diag(1/s): the Gram of x / s, block by block."""
    n_groups, group_size, _ = blocks.shape
    padded = np.ones(n_groups * group_size, dtype=np.float64)
    padded[: len(scale)] = scale
    inverse = (1.0 / padded).reshape(n_groups, group_size)
    return (blocks * inverse[:, :, None] * inverse[:, None, :]).astype(np.float32)


def activation_channel_magnitude(x_chunks: Iterable[np.ndarray]) -> np.ndarray:
    """Mean |x| per input channel [K] (float64) over chunks of shape [..., K]."""
    magnitude = ChannelMagnitude()
    for chunk in x_chunks:
        magnitude.add(chunk)
    return magnitude.mean()


def _fake_quantize(weight_kn: np.ndarray, bits: int, group_size: int, symmetric: bool) -> np.ndarray:
    """``quantize_rtn(...).dequantize()``, the same bits, without the codes."""
    k = weight_kn.shape[0]
    groups = _grouped(np.asarray(weight_kn, dtype=np.float32), k if group_size == -1 else group_size)
    return fake_quantize_groups(groups, bits, symmetric).reshape(-1, weight_kn.shape[1])[:k]


def weight_channel_magnitude(weights_kn: Sequence[np.ndarray], group_size: int) -> np.ndarray:
    """AutoAWQ's w_mean [K]: |w| relative to its group's absmax, averaged over every output channel.

    Only used by ``duo_scaling``, which balances activation against weight magnitude.
    """
    weight = np.abs(np.concatenate([np.asarray(w, dtype=np.float32) for w in weights_kn], axis=1))
    k = weight.shape[0]
    gs = k if group_size == -1 else group_size
    n_groups = -(-k // gs)
    padded = np.zeros((n_groups * gs, weight.shape[1]), dtype=np.float32)
    padded[:k] = weight
    grouped = padded.reshape(n_groups, gs, -1)
    relative = grouped / (grouped.max(axis=1, keepdims=True) + 1e-6)
    return relative.reshape(n_groups * gs, -1)[:k].mean(axis=1, dtype=np.float64)


def awq_scales_for_ratio(
    x_magnitude: np.ndarray, ratio: float, w_magnitude: np.ndarray | None = None
) -> np.ndarray:
    """One grid point: s = mag^ratio (or mag^r / w_mag^(1-r)), normalized so max(s) * min(s) = 1.

    The normalization keeps s centred around 1 on a log scale, so neither the producer nor the consumer
    weights drift far from their original magnitudes. ratio 0 gives exactly ones.
    """
    mag = np.asarray(x_magnitude, dtype=np.float64)
    if w_magnitude is None:
        s = mag**ratio
    else:
        s = mag**ratio / (np.asarray(w_magnitude, dtype=np.float64) ** (1.0 - ratio) + 1e-4)
    s = np.maximum(s, _MIN_SCALE)
    s = s / np.sqrt(s.max() * s.min())
    s[~np.isfinite(s)] = 1.0
    return s.astype(np.float32)


def scaled_quantization_error(
    x_sample: np.ndarray,
    weights_kn: Sequence[np.ndarray],
    scales: np.ndarray,
    bits: int,
    group_size: int,
    symmetric: bool,
    act_range: tuple[np.ndarray, np.ndarray] | None = None,
    gram: np.ndarray | None = None,
    gram_blocks: np.ndarray | None = None,
) -> float:
    """sum over the linears of || x W - x Q(diag(s) W) / s ||^2, i.e. the output error once s is folded.

    With ``gram`` (X^T X / tokens over all calibration tokens, ``InputGram``) the error is the mean over those
    tokens, sum(D * (G D)) with D = W - Q(diag(s) W) / s, and ``x_sample`` is not read. With ``gram_blocks`` (its
    diagonal blocks, one per weight group: ``InputGram.diagonal_blocks``) it is what each group's rounding costs
    alone, sum_g D_g^T G_gg D_g: the cross-group terms, sums of products of independent rounding errors, are left
    out, and a candidate costs K x group x N instead of K^2 x N.

    With ``act_range`` (per-channel min, max of x over the calibration data) the input is quantized too, as static
    W4A8 will: || x W - Q_a(x / s) Q(diag(s) W) ||^2, Q_a the per-tensor asymmetric int8 grid over the range of
    x / s (``grid.fake_quantize_range``), so the scales also pay for what they do to the activation range."""
    s = np.asarray(scales, dtype=np.float32)[:, None]
    if gram_blocks is not None and act_range is None:
        n_groups, gs, _ = gram_blocks.shape
        s_grouped = np.ones(n_groups * gs, dtype=np.float32)
        s_grouped[: len(s)] = s[:, 0]
        s_grouped = s_grouped.reshape(n_groups, gs, 1)
        total = 0.0
        for weight in weights_kn:
            grouped = _grouped(np.asarray(weight, dtype=np.float32), gs)
            diff = grouped - fake_quantize_groups(grouped * s_grouped, bits, symmetric) / s_grouped
            total += float(np.sum(diff * np.matmul(gram_blocks, diff), dtype=np.float64))
        return total
    if gram is not None and act_range is None:
        total = 0.0
        for weight in weights_kn:
            weight = np.asarray(weight, dtype=np.float32)
            diff = weight - _fake_quantize(weight * s, bits, group_size, symmetric) / s
            total += float(np.sum(diff * (gram @ diff), dtype=np.float64))
        return total
    x = np.asarray(x_sample, dtype=np.float32).reshape(-1, np.shape(scales)[0])
    xq = None
    if act_range is not None:
        low, high = (np.asarray(a, dtype=np.float32) / s[:, 0] for a in act_range)
        xq = fake_quantize_range(x / s[:, 0], float(low.min()), float(high.max()))
    total = 0.0
    for weight in weights_kn:
        weight = np.asarray(weight, dtype=np.float32)
        if xq is None:
            deq = _fake_quantize(weight * s, bits, group_size, symmetric) / s
            diff = x @ (weight - deq)  # one product of the difference: exact where x W - x W' would cancel
        else:
            diff = x @ weight - xq @ _fake_quantize(weight * s, bits, group_size, symmetric)
        total += float(np.sum(np.square(diff, dtype=np.float64)))
    return total


def search_awq_scales(
    x_sample: np.ndarray,
    weights_kn: Sequence[np.ndarray],
    bits: int,
    group_size: int,
    symmetric: bool,
    grid: int = 20,
    *,
    x_magnitude: np.ndarray | None = None,
    duo_scaling: bool = False,
    act_range: tuple[np.ndarray, np.ndarray] | None = None,
    smooth_alphas: Sequence[float] = (),
    gram: np.ndarray | None = None,
    gram_blocks: np.ndarray | None = None,
    coarse_step: int = COARSE_STEP,
) -> tuple[np.ndarray, dict]:
    """AutoAWQ's grid search for per-input-channel scales s [K] of linears that share the input x_sample.

    Salient input channels (large mean |x|) get s > 1 so their weights are quantized on a finer relative
    grid; the layer output error, not the weight error, decides the ratio. The grid includes ratio 0
    (s = 1, plain RTN) and ties keep the smaller ratio, so on x_sample the result is never worse than RTN.

    ``x_magnitude`` replaces the mean |x| of x_sample (e.g. a ``ChannelMagnitude`` over all calibration
    data); ``duo_scaling`` divides by weight magnitude too, as AutoAWQ's default does (s = 1 is then tried
    besides the grid). ``act_range`` (per-channel min, max of x) scores each candidate with the input on the
    static per-tensor int8 grid too (W4A8 static, ``scaled_quantization_error``); with it, ``smooth_alphas`` adds
    SmoothQuant's scales ``max|x|^a / max|W|^(1 - a)`` (max |x| from ``act_range``, max |W| over the group's
    linears) for each a to the candidates, which target the activation range's outlier channels where AWQ's mean
    |x| does not. ``gram`` (``InputGram.gram()``) scores the weight-only candidates over every calibration token
    instead of x_sample (which may then be None, given ``x_magnitude``); ``gram_blocks`` (its diagonal blocks per
    weight group, ``InputGram.diagonal_blocks``) scores what each group's rounding costs alone, at K x group x N a
    candidate instead of K^2 x N (``scaled_quantization_error``). The ratios are searched coarse to fine
    (``COARSE_STEP``; ``coarse_step=1`` scores all of them). ``info`` holds 'ratio' (None when duo scaling kept
    s = 1 or a SmoothQuant candidate won), 'smooth_alpha' (the winning SmoothQuant a, else None), 'error',
    'error_rtn' (s = 1), 'ratios' and 'errors' (NaN for the ratios the search skipped).
    """
    if not weights_kn:
        raise ValueError("need at least one weight")
    k = np.shape(weights_kn[0])[0]
    if any(np.shape(w)[0] != k for w in weights_kn):
        raise ValueError("all weights must share the input dimension K")
    if gram is not None and np.shape(gram) != (k, k):
        raise ValueError(f"gram has shape {np.shape(gram)}, expected ({k}, {k})")
    if gram_blocks is not None:
        gs = k if group_size == -1 else group_size
        if np.shape(gram_blocks) != (-(-k // gs), gs, gs):
            raise ValueError(f"gram_blocks of shape {np.shape(gram_blocks)} do not cover {k} input channels in groups "
                             f"of {gs}")
    if x_sample is None and (x_magnitude is None or (gram is None and gram_blocks is None) or act_range is not None):
        raise ValueError("without x_sample, give x_magnitude and gram or gram_blocks (and no act_range)")
    x = None if x_sample is None else np.asarray(x_sample, dtype=np.float32).reshape(-1, k)
    mag = np.abs(x).mean(axis=0, dtype=np.float64) if x_magnitude is None else np.asarray(x_magnitude)
    if mag.shape != (k,):
        raise ValueError(f"x_magnitude has shape {mag.shape}, expected ({k},)")
    w_mag = weight_channel_magnitude(weights_kn, group_size) if duo_scaling else None
    ones = np.ones(k, dtype=np.float32)

    def error_of(scales: np.ndarray) -> float:
        return scaled_quantization_error(x, weights_kn, scales, bits, group_size, symmetric, act_range, gram,
                                         gram_blocks)

    error_rtn = error_of(ones)
    # Without duo scaling ratio 0 is s = 1 itself; with it, s = 1 is not on the grid and is tried apart.
    best_error, best_ratio, best_scales = error_rtn, (None if duo_scaling else 0.0), ones
    ratios = np.linspace(0.0, 1.0, max(grid, 1))
    errors = np.full(len(ratios), np.nan)
    scales_at: dict[int, np.ndarray] = {}

    def score(index: int) -> None:
        if np.isnan(errors[index]):
            if ratios[index] == 0.0 and not duo_scaling:
                errors[index], scales_at[index] = error_rtn, ones
            else:
                scales_at[index] = awq_scales_for_ratio(mag, float(ratios[index]), w_mag)
                errors[index] = error_of(scales_at[index])

    coarse = _coarse_indices(len(ratios), coarse_step)
    for index in coarse:
        score(int(index))
    best_coarse = np.array(int(coarse[np.nanargmin(errors[coarse])]))
    for index in _refinements(best_coarse, coarse, coarse_step):
        score(int(index))
    # In grid order, strictly better only: ties keep the smaller ratio, as a scan of the whole grid would.
    for index in np.flatnonzero(~np.isnan(errors)):
        if errors[index] < best_error:
            best_error, best_ratio, best_scales = float(errors[index]), float(ratios[index]), scales_at[int(index)]
    best_alpha = None
    if smooth_alphas:
        if act_range is None:
            raise ValueError("smooth_alphas needs act_range (the activations' max |x| per channel)")
        from graphq.algorithms.smoothing import smoothquant_scales, weight_absmax

        x_absmax = np.maximum(np.abs(act_range[0]), np.abs(act_range[1]))
        w_absmax = weight_absmax(weights_kn)
        for alpha in smooth_alphas:
            s = smoothquant_scales(x_absmax, w_absmax, float(alpha))
            error = error_of(s)
            if error < best_error:
                best_error, best_ratio, best_scales, best_alpha = error, None, s, float(alpha)
    info = {
        "ratio": best_ratio,
        "smooth_alpha": best_alpha,
        "error": best_error,
        "error_rtn": error_rtn,
        "ratios": ratios.tolist(),
        "errors": errors.tolist(),
    }
    return best_scales, info


@dataclass
class ClipRanges:
    """Per group and output channel [n_groups, N]: weights are clamped to [low, high] before RTN."""

    low: np.ndarray
    high: np.ndarray
    shrink: np.ndarray  # the chosen factor (1 = no clipping)
    group_size: int


def _clip_grouped(grouped: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    return np.clip(grouped, low[:, None, :], high[:, None, :])


def _clipped_fake_quantize(grouped: np.ndarray, low: np.ndarray, high: np.ndarray, bits: int,
                           symmetric: bool) -> np.ndarray:
    """``fake_quantize_groups(_clip_grouped(grouped, low, high))``, the same bits. An asymmetric group clamped to
    [low, high] has its grid's ends min(low, 0) and max(high, 0) (its own min and max, widened to 0) without reading
    the group, and the zero point cancels out of the clamp on the integer grid; the clip search scores many ranges
    per weight, and this skips three passes over it of each."""
    clipped = _clip_grouped(grouped, low, high)
    if symmetric:
        return fake_quantize_groups(clipped, bits, symmetric)
    qmin, qmax = integer_range(bits, symmetric)
    wmin, wmax = np.minimum(low, 0.0), np.maximum(high, 0.0)
    scales = (wmax - wmin) / (qmax - qmin)
    scales[scales == 0] = 1.0
    zero = np.clip(np.round(-wmin / scales), qmin, qmax).astype(np.uint8).astype(np.float32)
    scales = scales.astype(np.float32)[:, None, :]
    q = np.round(np.divide(clipped, scales, out=clipped), out=clipped)
    np.clip(q, (qmin - zero)[:, None, :], (qmax - zero)[:, None, :], out=q)
    return np.multiply(q, scales, out=q)


def search_awq_clip(
    x_sample: np.ndarray,
    weight_kn: np.ndarray,
    bits: int,
    group_size: int,
    symmetric: bool,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    *,
    max_tokens: int = 512,
    gram: np.ndarray | None = None,
    gram_blocks: np.ndarray | None = None,
    coarse_step: int = COARSE_STEP,
) -> tuple[ClipRanges, dict]:
    """AutoAWQ's auto_clip: per group and output channel, the weight range that minimizes output error.

    Outlier weights stretch a group's grid and cost every other weight precision; clamping them trades a
    large error on a few weights for a smaller one on all. Candidate ranges shrink the max (and for
    asymmetric, the min) by 1 - max_shrink * i / n_grid, i = 0..n_grid; the error is each group's own
    contribution to the output, mean over at most ``max_tokens`` evenly strided tokens. Factor 1 (no
    clipping) is tried first and kept on ties; the factors are searched coarse to fine per group and output channel
    (``COARSE_STEP``; 1 scores all). With ``gram`` (X^T X / tokens of the input as the weight reads it,
    over all calibration tokens) each group's error is d^T G_gg d over its diagonal block instead, the same mean
    over every token, and ``x_sample`` is not read; ``gram_blocks`` gives those blocks directly
    (``InputGram.diagonal_blocks``, also kept for inputs too wide for the whole Gram). ``info`` holds 'error' and
    'error_noclip' (summed over groups and output channels) and 'tokens' (None with a Gram).
    """
    weight = np.asarray(weight_kn, dtype=np.float32)
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {weight.shape}")
    k, n = weight.shape
    gs = k if group_size == -1 else group_size
    grouped = _grouped(weight, gs)  # [G, gs, N]
    n_groups = grouped.shape[0]
    if gram is not None and gram_blocks is None:
        if np.shape(gram) != (k, k):
            raise ValueError(f"gram has shape {np.shape(gram)}, expected ({k}, {k})")
        gram_blocks = gram_diagonal_blocks(gram, gs)
    if gram_blocks is not None:
        if np.shape(gram_blocks) != (n_groups, gs, gs):
            raise ValueError(f"gram_blocks has shape {np.shape(gram_blocks)}, expected ({n_groups}, {gs}, {gs})")
        blocks = np.asarray(gram_blocks, dtype=np.float32)  # [G, gs, gs]
        t = None
        rows_per_group = gs
    else:
        x = np.asarray(x_sample, dtype=np.float32).reshape(-1, k)
        if x.shape[0] > max_tokens:
            x = x[:: x.shape[0] // max_tokens][:max_tokens]
        t = x.shape[0]
        x_grouped = _grouped(x.T, gs).transpose(0, 2, 1)  # [G, T, gs], zero-padded channels
        x_grouped = np.ascontiguousarray(x_grouped)
        rows_per_group = t

    if symmetric:
        base_high = np.abs(grouped).max(axis=1)
        base_low = -base_high
    else:
        base_high = grouped.max(axis=1)
        base_low = grouped.min(axis=1)
    factors = 1.0 - max_shrink * np.arange(n_grid + 1) / max(n_grid, 1)
    factors = factors[factors > 0]
    coarse = _coarse_indices(len(factors), coarse_step)

    best_err = np.full((n_groups, n), np.inf)
    best_index = np.zeros((n_groups, n), dtype=np.int64)
    err_noclip = np.zeros((n_groups, n))
    chunk = max(1, _CLIP_CHUNK_ELEMENTS // max(1, n_groups * rows_per_group))
    for c1 in range(0, n, chunk):
        cols = slice(c1, min(c1 + chunk, n))
        w = grouped[:, :, cols]

        def score(index: np.ndarray) -> None:
            """Errors of factor ``index`` (one, or one per group and channel); keeps the better (ties: less shrink)."""
            factor = factors[index]
            low = (base_low[:, cols] * factor).astype(np.float32)
            high = (base_high[:, cols] * factor).astype(np.float32)
            diff = np.subtract(w, _clipped_fake_quantize(w, low, high, bits, symmetric))
            if t is not None:
                out = np.matmul(x_grouped, diff)  # [G, T, cols]: each group's share of the output error
                err = np.mean(np.square(out, dtype=np.float64), axis=1)
            else:
                err = np.sum(diff * np.matmul(blocks, diff), axis=1, dtype=np.float64)  # [G, cols]
            if np.ndim(index) == 0 and index == 0:
                err_noclip[:, cols] = err
            current, current_index = best_err[:, cols], best_index[:, cols]
            better = (err < current) | ((err == current) & (index < current_index))
            best_err[:, cols] = np.where(better, err, current)
            best_index[:, cols] = np.where(better, index, current_index)

        for index in coarse:
            score(np.int64(index))
        for index in _refinements(best_index[:, cols], coarse, coarse_step):
            score(index)
    best_factor = factors[best_index].astype(np.float32)

    clip = ClipRanges(
        low=(base_low * best_factor).astype(np.float32),
        high=(base_high * best_factor).astype(np.float32),
        shrink=best_factor,
        group_size=gs,
    )
    info = {"error": float(best_err.sum()), "error_noclip": float(err_noclip.sum()), "tokens": t}
    return clip, info


def clip_weight(weight_kn: np.ndarray, clip: ClipRanges) -> np.ndarray:
    """The [K, N] weight clamped to its group ranges."""
    weight = np.asarray(weight_kn, dtype=np.float32)
    k = weight.shape[0]
    grouped = _clip_grouped(_grouped(weight, clip.group_size), clip.low, clip.high)
    return grouped.reshape(-1, weight.shape[1])[:k]


def quantize_with_clip(
    weight_kn: np.ndarray, clip: ClipRanges, bits: int, group_size: int, symmetric: bool
) -> QuantizedWeight:
    """RTN of the clamped weight: the grids then come from the searched ranges, by RTN's own rules."""
    gs = np.shape(weight_kn)[0] if group_size == -1 else group_size
    if gs != clip.group_size:
        raise ValueError(f"clip ranges were searched with group size {clip.group_size}, not {gs}")
    return quantize_rtn(clip_weight(weight_kn, clip), bits, group_size, symmetric)


def fold_scales_into_norm(norm_weight: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Norm gain / s: the norm's output (the consumers' input) shrinks by s, undoing ``scale_weight_rows``.

    A LayerNorm bias is divided by s the same way (call this on it too).
    """
    return (np.asarray(norm_weight, dtype=np.float64) / np.asarray(s, dtype=np.float64)).astype(np.float32)


def scale_weight_rows(weight_kn: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Consumer side: row k (input channel k) times s[k]; (x / s) @ result == x @ weight."""
    weight = np.asarray(weight_kn)
    out = np.asarray(weight, dtype=np.float64) * np.asarray(s, dtype=np.float64)[:, None]
    return out.astype(weight.dtype if weight.dtype.kind == "f" else np.float32)


def scale_weight_columns(
    weight_kn: np.ndarray, s: np.ndarray, bias: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Producer side (a previous linear whose output feeds the consumers): output column n (and bias) / s[n].

    The producer's output becomes y / s, exactly what the consumers' scaled rows expect.
    """
    weight = np.asarray(weight_kn)
    s64 = np.asarray(s, dtype=np.float64)
    dtype = weight.dtype if weight.dtype.kind == "f" else np.float32
    out = (np.asarray(weight, dtype=np.float64) / s64[None, :]).astype(dtype)
    if bias is None:
        return out, None
    bias = np.asarray(bias)
    return out, (np.asarray(bias, dtype=np.float64) / s64).astype(bias.dtype if bias.dtype.kind == "f" else np.float32)
