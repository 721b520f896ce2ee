"""A linear layer on graphq's weight grid with a trainable clip per group (``quant_alpha``), in torch.

The forward computes, in float32 and with the same operations, what ``algorithms.awq.quantize_with_clip`` emits
for the clip ``[low, high] = alpha * [group min, group max]`` (symmetric: ``alpha * group absmax``): the weight is
clamped to the clip, then rounded by RTN's rules (``algorithms.grid``). Rounding passes gradients straight
through, so the loss reaches ``quant_alpha`` through the clamp bounds, the scales and the zero points
(OmniQuant's learnable weight clipping). ``clip_ranges()`` hands the learned clip to the numpy side, which
emits exactly the integers this module computed with.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from graphq.algorithms.awq import ClipRanges
from graphq.algorithms.grid import integer_range


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even forward (as numpy and ONNX do), identity backward."""
    return x + (torch.round(x) - x).detach()


def clamp_to_levels(q: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Saturate integer codes (a function of its own, so the gradient check can take the kink away)."""
    return torch.clamp(q, qmin, qmax)


class FakeQuantLinear(nn.Module):
    """``y = x @ dequant(clip(W)) + b`` with ``quant_alpha`` [2, groups, N] (max, min factor; symmetric: [1, ...])."""

    def __init__(self, linear: nn.Linear, bits: int, group_size: int, symmetric: bool,
                 init_alpha: np.ndarray | None = None, min_alpha: float = 0.3) -> None:
        super().__init__()
        weight_kn = linear.weight.detach().to(torch.float32).T.contiguous()  # [K, N], graphq's orientation
        k, n = weight_kn.shape
        self.bits, self.symmetric, self.in_features = bits, symmetric, k
        self.group_size = k if group_size == -1 else group_size
        self.min_alpha = min_alpha
        n_groups = -(-k // self.group_size)
        padded = torch.zeros(n_groups * self.group_size, n, dtype=torch.float32)
        padded[:k] = weight_kn
        self.register_buffer("grouped_weight", padded.reshape(n_groups, self.group_size, n))
        grouped = self.grouped_weight
        if symmetric:
            self.register_buffer("base_high", grouped.abs().amax(dim=1))
            self.register_buffer("base_low", -self.base_high)
        else:
            self.register_buffer("base_high", grouped.amax(dim=1))
            self.register_buffer("base_low", grouped.amin(dim=1))
        factors = 1 if symmetric else 2
        alpha = torch.ones(factors, n_groups, n) if init_alpha is None else torch.as_tensor(
            np.asarray(init_alpha, dtype=np.float32).reshape(factors, n_groups, n))
        self.quant_alpha = nn.Parameter(alpha.clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def clip_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = self.quant_alpha.clamp(self.min_alpha, 1.0)
        high = self.base_high * alpha[0]
        low = -high if self.symmetric else self.base_low * alpha[1]
        return low, high

    def dequantized_weight(self) -> torch.Tensor:
        """The [K, N] weight the emitted integers dequantize to."""
        low, high = self.clip_bounds()
        w = torch.minimum(torch.maximum(self.grouped_weight, low[:, None, :]), high[:, None, :])
        qmin, qmax = integer_range(self.bits, self.symmetric)
        if self.symmetric:
            rows = w.detach().abs().argmax(dim=1, keepdim=True)
            scales = torch.gather(w, 1, rows)[:, 0, :] / qmin
            scales = torch.where(scales == 0, torch.ones_like(scales), scales)
            q = clamp_to_levels(round_ste(w / scales[:, None, :]), qmin, qmax)
            deq = q * scales[:, None, :]
        else:
            wmin = torch.clamp(low, max=0.0)
            wmax = torch.clamp(high, min=0.0)
            scales = (wmax - wmin) / (qmax - qmin)
            scales = torch.where(scales == 0, torch.ones_like(scales), scales)
            zero_points = clamp_to_levels(round_ste(-wmin / scales), qmin, qmax)
            q = clamp_to_levels(round_ste(w / scales[:, None, :]) + zero_points[:, None, :], qmin, qmax)
            deq = (q - zero_points[:, None, :]) * scales[:, None, :]
        return deq.reshape(-1, deq.shape[-1])[: self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.quant_alpha.requires_grad:
            # Recomputed in the backward pass instead of holding the clamp / round / scale intermediates of every
            # linear of the layer at once (about ten weight-sized tensors each): the same values, less memory.
            weight = checkpoint(self.dequantized_weight, use_reentrant=False)
        else:
            weight = self.dequantized_weight()
        out = x @ weight
        return out if self.bias is None else out + self.bias

    def clip_ranges(self) -> ClipRanges:
        """The learned clip for ``quantize_with_clip`` (float32, the very bounds the forward used)."""
        with torch.no_grad():
            low, high = self.clip_bounds()
            alpha = self.quant_alpha.clamp(self.min_alpha, 1.0)
        as_numpy = lambda t: t.cpu().numpy().astype(np.float32)  # noqa: E731
        return ClipRanges(low=as_numpy(low), high=as_numpy(high), shrink=as_numpy(alpha[0]), group_size=self.group_size)


def alpha_from_clip(clip: ClipRanges, weight_kn: np.ndarray, symmetric: bool) -> np.ndarray:
    """The quant_alpha that reproduces a searched clip (AWQ's) on ``weight_kn``: [2 or 1, groups, N]."""
    from graphq.algorithms.grid import grouped

    groups = grouped(np.asarray(weight_kn, dtype=np.float32), clip.group_size)
    if symmetric:
        return np.asarray(clip.shrink, dtype=np.float32)[None]
    high, low = groups.max(axis=1), groups.min(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha_high = np.where(high != 0, clip.high / high, 1.0)
        alpha_low = np.where(low != 0, clip.low / low, 1.0)
    return np.clip(np.stack([alpha_high, alpha_low]), 0.0, 1.0).astype(np.float32)
