"""What the pruning methods (magnitude, wanda, sparsegpt) share: the requested zeros and storing a pruned weight."""

from __future__ import annotations

from typing import Any

import numpy as np

from graphq.algorithms.sparsity import Pattern, parse_pattern
from graphq.linear_layers import LinearLayer
from graphq.passes.weights import set_layer_weight
from graphq.weight_methods.base import RegionWork


def sparsity_target(config: Any) -> tuple[float, Pattern | None]:
    """(unstructured fraction, N:M pattern or None) from a validated QuantConfig."""
    return float(config.sparsity), parse_pattern(config.sparsity_pattern)


def store_pruned(work: RegionWork, layer: LinearLayer, weight_kn: np.ndarray, keep: np.ndarray) -> None:
    """Write the pruned float weight (exact zeros where ``keep`` is False) into the graph and record the mask."""
    work.dense_weights[layer.name] = np.asarray(weight_kn, dtype=np.float32)
    set_layer_weight(work.model, layer, np.where(keep, weight_kn, 0.0).astype(np.float32))
    work.keep_masks[layer.name] = keep
