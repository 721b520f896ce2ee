"""sparsegpt: prune and round in one OBS pass against the Hessian GPTQ collects (Frantar & Alistarh, 2023).

As a rounder (weight-only schemes) the kept weights are rounded on the scheme's grid inside the pass, so pruning
and rounding errors are compensated together (``awq+sparsegpt`` after AWQ's folds). Where another pipeline rounds
later (the W8A8 schemes, ``graphq prune``) ``prune_float`` runs the same pass without rounding.
"""

from __future__ import annotations

import numpy as np

from graphq.algorithms.gptq import HessianAccumulator
from graphq.algorithms.sparsity import sparsegpt_prune
from graphq.linear_layers import LinearLayer
from graphq.weight_methods.base import LayerResult, RegionWork, WeightMethod
from graphq.weight_methods.pruning import sparsity_target, store_pruned
from graphq.weight_methods.registry import register_weight_method


def hessian_of(work: RegionWork, input_name: str) -> tuple[np.ndarray, int]:
    """H of the input as the linears read it now (x / s after AWQ's folds), and the token count."""
    stats = work.stats[input_name].hessian
    s = work.input_scale[input_name]
    return stats.hessian() / np.outer(s, s), stats.tokens


def joint_prune(work: RegionWork, group: list[LinearLayer], bits: int | None, keep_masks: list | None = None):
    """SparseGPT over the linears sharing one input, concatenated along N (each output channel is pruned and
    rounded against the same H independently of the others, so this equals running them one by one)."""
    config = work.config
    sparsity, pattern = sparsity_target(config)
    hessian, _ = hessian_of(work, group[0].input.name)
    joined_keep = None if keep_masks is None else np.concatenate(keep_masks, axis=1)
    return sparsegpt_prune(
        np.concatenate([work.dense_weights.get(layer.name, layer.weight_kn()) for layer in group], axis=1),
        hessian, sparsity, pattern,
        bits=bits, group_size=config.group_size_for(group[0].in_features), symmetric=config.is_symmetric,
        keep_mask=joined_keep, damp=config.damp,
    )


def split_results(group: list[LinearLayer], work: RegionWork, weight, quantized, keep, info) -> dict[str, LayerResult]:
    results, start = {}, 0
    for layer in group:
        stop = start + layer.out_features
        work.keep_masks[layer.name] = keep[:, start:stop]
        entry = {"sparsegpt_damp": info["damp"], "warnings": list(info["warnings"])}
        results[layer.name] = LayerResult(quantized.output_columns(start, stop), entry)
        start = stop
    return results


class SparseGpt(WeightMethod):
    name = "sparsegpt"
    statistics = {"hessian": HessianAccumulator}
    rounds = True
    prunes = True

    def round_group(self, work: RegionWork, input_name: str, group: list[LinearLayer]) -> dict[str, LayerResult]:
        weight, quantized, keep, info = joint_prune(work, group, work.config.bits)
        return split_results(group, work, weight, quantized, keep, info)

    def prune_float(self, work: RegionWork) -> None:
        for input_name, group in work.groups.items():
            weight, _, keep, _ = joint_prune(work, group, None)
            start = 0
            for layer in group:
                stop = start + layer.out_features
                store_pruned(work, layer, weight[:, start:stop], keep[:, start:stop])
                start = stop


register_weight_method(SparseGpt())
