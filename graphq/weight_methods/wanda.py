"""wanda: zero the weights with the smallest |w| * ||x_k|| per output channel (Sun et al., 2023), on the inputs
captured layer by layer; the kept weights are rounded by the sequence's rounder (rtn, awq's clip, gptq)."""

from __future__ import annotations

from graphq.algorithms.sparsity import InputSquareNorm, wanda_keep_mask
from graphq.weight_methods.base import RegionWork, WeightMethod
from graphq.weight_methods.pruning import sparsity_target, store_pruned
from graphq.weight_methods.registry import register_weight_method


class Wanda(WeightMethod):
    name = "wanda"
    statistics = {"square_norm": InputSquareNorm}
    prunes = True

    def transform(self, work: RegionWork) -> None:
        sparsity, pattern = sparsity_target(work.config)
        for input_name, group in work.groups.items():
            s = work.input_scale[input_name]
            square_norm = work.stats[input_name].square_norm.value() / (s.astype("float64") ** 2)  # of x / s (AWQ)
            for layer in group:
                weight = layer.weight_kn()
                store_pruned(work, layer, weight, wanda_keep_mask(weight, square_norm, sparsity, pattern))

    prune_float = transform


register_weight_method(Wanda())
