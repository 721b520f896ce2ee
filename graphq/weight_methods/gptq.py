"""gptq: error-compensating rounding against the Hessian of each input (after any earlier method's folds)."""

from __future__ import annotations

import numpy as np

from graphq.algorithms.gptq import HessianAccumulator, gptq_quantize
from graphq.algorithms.lowbit import lowbit_gptq
from graphq.linear_layers import LinearLayer
from graphq.weight_methods.base import LayerResult, RegionWork, WeightMethod
from graphq.weight_methods.registry import register_weight_method


class Gptq(WeightMethod):
    name = "gptq"
    statistics = {"hessian": HessianAccumulator}
    rounds = True

    def round_group(self, work: RegionWork, input_name: str, group: list[LinearLayer]) -> dict[str, LayerResult]:
        """The linears sharing one input as one weight concatenated along N.

        Every output column is rounded against the same H independently of the others, so the concatenation gives
        the same codes as quantizing each linear alone while the Hessian is factored and the K-step loop runs once.
        """
        config = work.config
        if any(layer.name in work.keep_masks for layer in group):
            # A pruning method ran first (wanda+gptq): GPTQ with the mask held fixed is SparseGPT's joint pass.
            from graphq.weight_methods.sparsegpt import joint_prune, split_results

            masks = [work.keep_masks.get(layer.name, np.ones((layer.in_features, layer.out_features), dtype=bool))
                     for layer in group]
            return split_results(group, work, *joint_prune(work, group, config.bits, masks))
        stats = work.stats[input_name].hessian
        s = work.input_scale[input_name]
        hessian = stats.hessian() / np.outer(s, s)  # H of x / s
        if config.scheme == "w8a8s":  # the lowbit levels of the pruned weights, error-compensated
            return {layer.name: self.round_lowbit(layer, hessian, config) for layer in group}
        if config.weight_format != "uniform":  # lut+gptq: lut's tables, the codes chosen with error feedback
            return {layer.name: self.round_codebook(layer, hessian, config) for layer in group}
        joined, info = gptq_quantize(
            np.concatenate([layer.weight_kn() for layer in group], axis=1), hessian, config.bits,
            config.group_size_for(group[0].in_features), config.is_symmetric, damp=config.damp,
            act_order=config.act_order, static_groups=config.act_order, n_samples=stats.tokens,
            grid=self.awq_clipped_grid(work, input_name, group),
        )
        results, start = {}, 0
        for layer in group:
            stop = start + layer.out_features
            entry = {"gptq_damp": info["damp"], "warnings": list(info["warnings"])}
            results[layer.name] = LayerResult(joined.output_columns(start, stop), entry)
            start = stop
        return results

    @staticmethod
    def awq_clipped_grid(work: RegionWork, input_name: str, group: list[LinearLayer]):
        """After AWQ (awq+gptq, with its clip search on), the grids of AWQ's searched clip ranges, which GPTQ
        then rounds onto with error feedback (AWQ's clip lives in its own rounder, which gptq replaces); else None."""
        from graphq.algorithms.rtn import QuantizedWeight
        from graphq.weight_methods import resolve_methods
        from graphq.weight_methods.awq import clipped_rounding

        config = work.config
        after_awq = any(method.name == "awq" for method in resolve_methods(config.method))
        if not after_awq or not config.awq_clip or config.act_order:
            return None
        grids = [clipped_rounding(work, input_name, layer)[0] for layer in group]
        zeros = None if grids[0].zero_points is None else np.concatenate([g.zero_points for g in grids], axis=1)
        return QuantizedWeight(q=np.concatenate([g.q for g in grids], axis=1),
                               scales=np.concatenate([g.scales for g in grids], axis=1), zero_points=zeros,
                               bits=grids[0].bits, group_size=grids[0].group_size)

    @staticmethod
    def round_codebook(layer: LinearLayer, hessian: np.ndarray, config) -> LayerResult:
        from graphq.algorithms.codebook import codebook_gptq
        from graphq.weight_methods.lut import codebook_entry, codebook_quantize

        weight = layer.weight_kn()
        importance = np.maximum(np.diagonal(hessian).astype(np.float64), 0.0)  # lut's weighting: diag of H
        importance = importance if importance.any() else None
        cw, info = codebook_gptq(weight, hessian, codebook_quantize(weight, config, importance), damp=config.damp)
        entry = codebook_entry(cw, weight, config, importance)
        return LayerResult(cw, {**entry, "gptq_damp": info["damp"],
                                "warnings": [*entry.get("warnings", []), *info["warnings"]]})

    @staticmethod
    def round_lowbit(layer: LinearLayer, hessian: np.ndarray, config) -> LayerResult:
        qw, info = lowbit_gptq(layer.weight_kn(), hessian, config.sigma_factor, config.fraction, damp=config.damp)
        return LayerResult(qw, {"gptq_damp": info.pop("damp"), **info})


register_weight_method(Gptq())
