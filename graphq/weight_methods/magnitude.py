"""magnitude: zero the smallest |w| of each linear (data-free); the kept weights are rounded by the sequence's rounder."""

from __future__ import annotations

import numpy as np

from graphq.algorithms.sparsity import magnitude_keep_mask
from graphq.linear_layers import LinearLayer
from graphq.weight_methods.base import RegionWork, WeightMethod
from graphq.weight_methods.pruning import sparsity_target, store_pruned
from graphq.weight_methods.registry import register_weight_method


class MagnitudePruning(WeightMethod):
    name = "magnitude"
    calibrated = False
    prunes = True

    def prune_data_free(self, layer: LinearLayer, weight: np.ndarray, config) -> np.ndarray:
        sparsity, pattern = sparsity_target(config)
        return magnitude_keep_mask(weight, sparsity, pattern)

    def transform(self, work: RegionWork) -> None:
        for layer in work.layers:
            weight = layer.weight_kn()
            store_pruned(work, layer, weight, self.prune_data_free(layer, weight, work.config))

    prune_float = transform


register_weight_method(MagnitudePruning())
