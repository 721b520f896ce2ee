"""GPTQ (Frantar et al., 2022) for one linear layer, in numpy float64.

The weight is graphq's [K, N] = [in, out] layout (y = x @ W), so the reference's "columns" (input channels,
the dimension GPTQ walks along) are our rows. Quantization grids come from ``rtn.compute_scales`` on the
rows of each group along K, so codes, scales and zero points follow exactly the RTN conventions and the
result can go through the same MatMulNBits / QDQ writers.
"""

from __future__ import annotations

import time

from typing import Callable

import numpy as np

from graphq.algorithms.rtn import QuantizedWeight, compute_scales, integer_range

# Rows updated one at a time inside a lazy block; larger sub-blocks only move work from BLAS into Python.
_SUB_BLOCK = 16
# A Cholesky pivot this small relative to its diagonal means H is numerically singular despite damping.
_PIVOT_RTOL = 1e-10
_MAX_DAMP_RETRIES = 4


class HessianAccumulator:
    """Streams calibration inputs of one linear layer into H = 2 X^T X / n_tokens (float64).

    A running average (rescale, then add) keeps H at the same magnitude whatever the number of batches, as in
    the GPTQ reference, so no batch needs to be kept around. Unlike the reference (which counts sequences)
    ``n`` counts tokens: the scale of H does not change the GPTQ result, only the reported proxy loss.
    """

    def __init__(self, in_features: int | None = None) -> None:
        self._h: np.ndarray | None = None
        self._k = in_features
        self._n = 0
        if in_features is not None:
            self._h = np.zeros((in_features, in_features), dtype=np.float64)

    @property
    def tokens(self) -> int:
        return self._n

    @property
    def in_features(self) -> int | None:
        return self._k

    def add(self, x: np.ndarray) -> None:
        """Fold a batch of inputs [..., K] into H; every leading dimension counts as tokens."""
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError("expected inputs of shape [..., K]")
        if self._k is None:
            self._k = x.shape[-1]
            self._h = np.zeros((self._k, self._k), dtype=np.float64)
        part = self.partial(x, self._n)
        if part is not None:
            self.merge(part, int(np.prod(x.shape[:-1])))

    def partial(self, x: np.ndarray, tokens_before: int) -> np.ndarray | None:
        """The batch's term of H given the tokens added before it, 2 x^T x / (tokens_before + m): computed anywhere
        (a worker process), then ``merge``d in batch order, it gives H bit for bit as ``add`` does."""
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError("expected inputs of shape [..., K]")
        if self._k is not None and x.shape[-1] != self._k:
            raise ValueError(f"expected {self._k} input channels, got shape {x.shape}")
        x = x.reshape(-1, x.shape[-1]).astype(np.float64)
        m = x.shape[0]
        if m == 0:
            return None
        if not np.all(np.isfinite(x)):
            raise ValueError("calibration inputs contain NaN or inf")
        x *= np.sqrt(2.0 / (tokens_before + m))
        return x.T @ x  # numpy turns a @ a.T-shaped products of one buffer into SYRK

    def merge(self, part: np.ndarray, tokens: int) -> None:
        """Rescale H to the new token count and add a ``partial`` of ``tokens`` rows."""
        if self._k is None:
            self._k = part.shape[0]
            self._h = np.zeros((self._k, self._k), dtype=np.float64)
        if part.shape != (self._k, self._k):
            raise ValueError(f"expected {self._k} input channels, got a term of shape {part.shape}")
        total = self._n + tokens
        self._h *= self._n / total
        self._h += part
        self._n = total

    def hessian(self) -> np.ndarray:
        if self._h is None or self._n == 0:
            raise ValueError("no calibration inputs were added; an all-zero H would zero the whole weight")
        return self._h.copy()


def _invert_lower_inplace(lower: np.ndarray) -> None:
    """Overwrite a lower-triangular matrix with its inverse by 2x2 block recursion (nearly all GEMM).

    numpy has no triangular solve; np.linalg.inv (LU) would cost about three times as much at K=4096, and
    working in place avoids page-faulting fresh K x K buffers at every level.
    """
    n = lower.shape[0]
    if n <= 128:
        lower[...] = np.tril(np.linalg.inv(lower))
        return
    m = n // 2
    _invert_lower_inplace(lower[:m, :m])
    _invert_lower_inplace(lower[m:, m:])
    lower[m:, :m] = -(lower[m:, m:] @ (lower[m:, :m] @ lower[:m, :m]))


def _inverse_cholesky_upper(h: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Upper U with U^T U = H^-1 (the reference's cholesky(cholesky_inverse(cholesky(H)), upper=True)).

    Factoring the channel-reversed H gives H = R R^T with R upper, hence U = R^-1: one Cholesky and one
    triangular inverse instead of two Cholesky factorizations and a full inverse. The pivots R_ii^2 (each
    channel's variance left unexplained by the channels after it) expose a numerically singular H.
    Raises np.linalg.LinAlgError when H is not numerically positive definite. ``out`` may be ``h`` itself
    (it is read before being overwritten), which saves page-faulting another K x K buffer.
    """
    lower_rev = np.linalg.cholesky(h[::-1, ::-1])
    pivots = np.diagonal(lower_rev)[::-1] ** 2
    if not np.all(pivots > _PIVOT_RTOL * np.diagonal(h)):
        raise np.linalg.LinAlgError("Hessian is numerically singular")
    _invert_lower_inplace(lower_rev)
    if not np.all(np.isfinite(lower_rev)):
        raise np.linalg.LinAlgError("inverse Cholesky factor is not finite")
    if out is None:
        return np.ascontiguousarray(lower_rev[::-1, ::-1])
    np.copyto(out, lower_rev[::-1, ::-1])
    return out


def _damped_inverse_cholesky(h: np.ndarray, damp: float, warnings: list[str]) -> tuple[np.ndarray, float]:
    """Factor H + damp * mean(diag H) * I, raising damp tenfold while H stays singular.

    Consumes ``h`` (the caller's scratch copy): on success it holds the returned factor. Falls back to the
    diagonal of H, which turns GPTQ into plain RTN, rather than ever returning NaN.
    """
    diagonal = np.einsum("ii->i", h)  # a writable view of the diagonal
    original = diagonal.copy()
    mean_diag = float(np.mean(original))
    tried = damp
    for attempt in range(_MAX_DAMP_RETRIES + 1):
        diagonal[:] = original + tried * mean_diag
        try:
            upper = _inverse_cholesky_upper(h, out=h)
            if attempt:
                warnings.append(f"Hessian not positive definite with damp={damp:g}; used damp={tried:g}")
            return upper, tried
        except np.linalg.LinAlgError:
            tried = tried * 10.0 if tried > 0 else 0.01
    fallback = max(damp, 0.01)
    warnings.append(f"Hessian not positive definite up to damp={tried / 10:g}; used its diagonal (plain RTN)")
    return np.diag(1.0 / np.sqrt(original + fallback * mean_diag)), fallback


def gptq_quantize(
    weight_kn: np.ndarray,
    hessian: np.ndarray,
    bits: int,
    group_size: int,
    symmetric: bool,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    block_size: int = 128,
    *,
    n_samples: int | None = None,
    grid: QuantizedWeight | None = None,
) -> tuple[QuantizedWeight, dict]:
    """Quantize a [K, N] weight with GPTQ against the input Hessian H [K, K] (e.g. HessianAccumulator).

    Each input channel is rounded in turn and its rounding error is spread over the channels not yet
    quantized through the inverse-Hessian Cholesky factor, so the layer output (not the weight) is preserved.

    Groups always keep the standard contiguous layout along K in the original channel order (no g_idx), so
    the result is a drop-in replacement for ``quantize_rtn``'s. A group's grid is fixed when its first
    channel is reached, from the weights as updated by the errors so far (the reference reads, within a lazy
    block, weights that lack that block's updates; here they are exact, so blocking never changes results).
    With ``act_order`` channels are visited by decreasing H_ii, so a group's first channel may come late;
    ``static_groups`` instead fixes every grid up front from the original weight, as AutoGPTQ does.

    ``grid`` (a QuantizedWeight of the same groups and symmetry, e.g. AWQ's clipped RTN) fixes every group's
    scales and zero points up front: GPTQ then only chooses the codes.
    ``n_samples`` (the calibration token count), when given, only adds a warning when it is below K.
    ``info`` holds 'loss' (the GPTQ proxy loss sum (w - q)^2 / [H^-1]_tt / 2), 'damp' (the relative damping
    actually used), 'dead_channels', 'warnings' and 'seconds'.
    """
    start = time.perf_counter()
    weight = np.array(weight_kn, dtype=np.float32)
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {weight.shape}")
    k, n = weight.shape
    h = np.array(hessian, dtype=np.float64)
    if h.shape != (k, k):
        raise ValueError(f"Hessian shape {h.shape} does not match weight shape {weight.shape}")
    if not np.all(np.isfinite(h)) or not np.all(np.isfinite(weight)):
        raise ValueError("weight or Hessian contains NaN or inf")
    if np.any(np.diagonal(h) < 0):
        raise ValueError("Hessian has a negative diagonal entry; it is not X^T X")
    if block_size < 1:
        raise ValueError("block_size must be positive")
    gs = k if group_size == -1 else group_size
    if gs < 1:
        raise ValueError(f"invalid group_size {group_size}")
    n_groups = -(-k // gs)
    qmin, qmax = integer_range(bits, symmetric)
    warnings: list[str] = []
    if n_samples is not None and n_samples < k:
        warnings.append(f"only {n_samples} calibration tokens for {k} input channels: H is rank-deficient")

    # Channels never active in calibration carry no information about the output: GPTQ zeroes them.
    dead = np.diagonal(h) == 0
    n_dead = int(dead.sum())
    if n_dead:
        h[dead, dead] = 1.0
        weight[dead, :] = 0.0
        warnings.append(f"{n_dead} input channel(s) never active in calibration: their weights were zeroed")

    scales = np.ones((n_groups, n), dtype=np.float32)
    zeros = None if symmetric else np.zeros((n_groups, n), dtype=np.uint8)
    ready = np.zeros(n_groups, dtype=bool)

    def set_group(g: int, rows: np.ndarray) -> None:
        s, z = compute_scales(rows.astype(np.float32), bits, rows.shape[0], symmetric)
        scales[g] = s[0]
        if zeros is not None:
            zeros[g] = z[0]
        ready[g] = True

    if grid is not None:  # every group's grid given (e.g. AWQ's clipped ranges): rounding only, with feedback
        if grid.scales.shape != scales.shape or grid.group_size != gs or (grid.zero_points is None) != symmetric:
            raise ValueError("the given grid does not match the weight's groups and symmetry")
        scales[:] = grid.scales
        if zeros is not None:
            zeros[:] = grid.zero_points
        ready[:] = True
    elif static_groups:
        for g in range(n_groups):
            set_group(g, weight[g * gs : (g + 1) * gs])

    if act_order:
        perm = np.argsort(-np.diagonal(h), kind="stable")
        weight = weight[perm]
        h = h[np.ix_(perm, perm)]
    else:
        perm = np.arange(k)
    position = np.empty(k, dtype=np.int64)  # position[original channel] = step at which it is quantized
    position[perm] = np.arange(k)
    group_of_step = perm // gs

    upper, damp_used = _damped_inverse_cholesky(h, damp, warnings)
    del h  # now aliased by upper

    # Left-looking: the weights of step t are weight[t] - upper[:t, t] @ errors[:t]. Each block pulls in all
    # earlier errors with one GEMM, so the K x N trailing matrix is never rewritten (the reference updates
    # it after every block); inside a block, rows are updated right-looking in sub-blocks of _SUB_BLOCK.
    codes = np.empty((k, n), dtype=np.int16)
    errors = np.empty((k, n), dtype=np.float64)
    loss = 0.0
    zero_f32 = np.zeros(n, dtype=np.float32)

    def current_rows(steps: np.ndarray, t: int, s1: int, s2: int, i1: int, i2: int, block: np.ndarray) -> np.ndarray:
        """Weights of not-yet-quantized steps (all >= t) with every error made before step t applied."""
        rows = np.empty((steps.shape[0], n), dtype=np.float64)
        here = steps < s2
        rows[here] = block[steps[here] - i1]
        in_block = (steps >= s2) & (steps < i2)
        if in_block.any():
            rows[in_block] = block[steps[in_block] - i1] - upper[s1:t, steps[in_block]].T @ errors[s1:t]
        later = steps >= i2
        if later.any():
            rows[later] = weight[steps[later]] - upper[:t, steps[later]].T @ errors[:t]
        return rows

    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        block = weight[i1:i2].astype(np.float64)
        if i1:
            block -= upper[:i1, i1:i2].T @ errors[:i1]
        for s1 in range(i1, i2, _SUB_BLOCK):
            s2 = min(s1 + _SUB_BLOCK, i2)
            for t in range(s1, s2):
                g = group_of_step[t]
                if not ready[g]:
                    set_group(g, current_rows(position[g * gs : (g + 1) * gs], t, s1, s2, i1, i2, block))
                w = block[t - i1]
                scale = scales[g]
                zero = zero_f32 if zeros is None else zeros[g].astype(np.float32)
                q = np.round(w.astype(np.float32) / scale) + zero
                np.clip(q, qmin, qmax, out=q)
                codes[t] = q
                err = (w - (q - zero) * scale) / upper[t, t]
                loss += float(err @ err)
                errors[t] = err
                if t + 1 < s2:
                    block[t + 1 - i1 : s2 - i1] -= np.outer(upper[t, t + 1 : s2], err)
            if s2 < i2:
                block[s2 - i1 :] -= upper[s1:s2, s2:i2].T @ errors[s1:s2]

    q_original = np.empty_like(codes)
    q_original[perm] = codes
    result = QuantizedWeight(
        q=q_original.astype(np.int8 if symmetric else np.uint8),
        scales=scales,
        zero_points=zeros,
        bits=bits,
        group_size=gs,
    )
    info = {
        "loss": loss / 2.0,
        "damp": damp_used,
        "dead_channels": n_dead,
        "warnings": warnings,
        "act_order": act_order,
        "static_groups": static_groups,
        "seconds": time.perf_counter() - start,
    }
    return result, info


def inverse_factor_without_dead_channels(w_nk: np.ndarray, hessian: np.ndarray,
                                         damp: float) -> tuple[np.ndarray, float, list[str]]:
    """(upper Cholesky factor of the damped H^-1, damping used, warnings) for an [N, K] weight whose columns are
    the input channels. Channels never active in calibration (H_kk = 0) get a unit diagonal and their weights in
    ``w_nk`` are zeroed in place: they carry no information about the output."""
    n, k = w_nk.shape
    h = np.array(hessian, dtype=np.float64)
    if h.shape != (k, k):
        raise ValueError(f"Hessian shape {h.shape} does not match weight shape {(k, n)}")
    warnings: list[str] = []
    dead = np.diagonal(h) == 0
    if dead.any():
        h[dead, dead] = 1.0
        w_nk[:, dead] = 0.0
        warnings.append(f"{int(dead.sum())} input channel(s) never active in calibration: their weights were zeroed")
    upper, damp_used = _damped_inverse_cholesky(h, damp, warnings)
    return upper, damp_used, warnings


def round_with_error_feedback(
    weight_kn: np.ndarray,
    hessian: np.ndarray,
    round_channel: Callable[[int, np.ndarray], np.ndarray],
    damp: float = 0.01,
    block_size: int = 128,
) -> tuple[float, list[str]]:
    """GPTQ's loop for any fixed grid: input channel t by input channel, ``round_channel(t, values)`` rounds the
    current values [N] of channel t (recording its codes as it likes) and returns what they dequantize to; the
    rounding error is spread over the channels not yet rounded through the inverse Hessian's Cholesky factor
    (lazy blocks of ``block_size``). Channels never active in calibration are rounded from 0. Returns (the
    relative damping used, warnings)."""
    weight = np.asarray(weight_kn)
    k, n = weight.shape
    w = weight.T.astype(np.float64)  # [N, K]: columns are input channels
    upper, damp_used, warnings = inverse_factor_without_dead_channels(w, hessian, damp)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        block = w[:, i1:i2].copy()
        errors = np.zeros((n, i2 - i1), dtype=np.float64)
        for i in range(i2 - i1):
            t = i1 + i
            current = block[:, i].copy()
            err = (current - round_channel(t, current)) / upper[t, t]
            block[:, i:] -= np.outer(err, upper[t, t:i2])
            errors[:, i] = err
        if i2 < k:
            w[:, i2:] -= errors @ upper[i1:i2, i2:]
    return damp_used, warnings

