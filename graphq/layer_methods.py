"""Calibrated weight methods for one decoder layer: AWQ scaling (+ clip), GPTQ rounding, or both.

Given the captured statistics of a layer's linear inputs, this decides where AWQ scales fold (the norm before
q/k/v and gate/up, up_proj before down_proj, v_proj before o_proj when their shapes match), rewrites the float
weights in the graph accordingly (the float function is unchanged), and quantizes every linear; the caller
rewrites the layer to its quantized form before the next layer is calibrated.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphq.algorithms.awq import (
    fold_scales_into_norm,
    quantize_with_clip,
    scale_weight_columns,
    scale_weight_rows,
    search_awq_clip,
    search_awq_scales,
)
from graphq.algorithms.gptq import gptq_quantize
from graphq.algorithms.rtn import QuantizedWeight, quantize_rtn
from graphq.config import QuantConfig
from graphq.linear_layers import LinearLayer
from graphq.passes.weights import set_layer_bias, set_layer_weight, set_norm_weight
from graphq.runtimes.layerwise import InputStatistics

def relative_output_error(x: np.ndarray, weight: np.ndarray, approximation: np.ndarray) -> float:
    reference = x @ weight
    return float(np.sum(np.square(x @ (weight - approximation), dtype=np.float64)) / max(np.sum(np.square(reference, dtype=np.float64)), 1e-30))


def upstream_linear(consumer: LinearLayer, region_layers: list[LinearLayer]) -> LinearLayer | None:
    """The linear whose output channels are this layer's input channels: up_proj for down_proj, v_proj for o_proj."""
    if consumer.producer_kind == "gated_activation" and consumer.producer_node is not None:
        feeding = {v.name for v in consumer.producer_node.inputs if v is not None}
        for layer in region_layers:
            if layer.output.name in feeding:
                return layer
    if consumer.role == "o":
        for layer in region_layers:
            if layer.role == "v" and layer.out_features == consumer.in_features:
                return layer
    return None


def fold_awq_scales(
    model: ir.Model, group: list[LinearLayer], region_layers: list[LinearLayer], scales: np.ndarray
) -> LinearLayer | str | None:
    """Fold x -> x / s into the producer and W -> diag(s) W into the group.

    Returns what absorbed 1/s: "norm", or the upstream linear (whose outputs are now rescaled on purpose, which
    `graphq verify` must know), or None when nothing can.
    """
    first = group[0]
    producer = first.producer_node
    if producer is not None and producer.op_type in ("LayerNormalization", "SkipLayerNormalization"):
        return None  # its bias would need scaling too; leave such groups unscaled rather than wrong
    if first.producer_kind == "norm" and first.norm_weight is not None:
        norm = first.norm_weight.const_value.numpy().astype(np.float32)
        set_norm_weight(model, first, fold_scales_into_norm(norm, scales))
        for layer in group[1:]:
            layer.norm_weight = first.norm_weight
        absorber: LinearLayer | str = "norm"
    else:
        upstream = upstream_linear(first, region_layers)
        if upstream is None or len(group) != 1:
            return None
        weight, bias = scale_weight_columns(upstream.weight_kn(), scales, upstream.bias_array())
        set_layer_weight(model, upstream, weight)
        if bias is not None:
            set_layer_bias(model, upstream, bias)
        absorber = upstream
    for layer in group:
        set_layer_weight(model, layer, scale_weight_rows(layer.weight_kn(), scales))
    return absorber


def quantize_region(
    model: ir.Model,
    region_layers: list[LinearLayer],
    stats: dict[str, InputStatistics],
    config: QuantConfig,
) -> dict[str, tuple[QuantizedWeight, dict]]:
    """Quantize every linear of one decoder layer; returns name -> (quantized weight, report entry)."""
    method = config.method
    groups: dict[str, list[LinearLayer]] = {}
    for layer in region_layers:
        groups.setdefault(layer.input.name, []).append(layer)
    # Float weights and inputs before any folding, to report errors against the original layer.
    originals = {layer.name: layer.weight_kn() for layer in region_layers}
    samples = {name: entry.token_sample() for name, entry in stats.items()}
    input_scale = {name: np.ones(samples[name].shape[1], dtype=np.float32) for name in samples}
    notes: dict[str, dict] = {layer.name: {} for layer in region_layers}

    if "awq" in method:
        # All scales are searched on the captured float inputs and folded before anything is quantized,
        # because folding for down_proj rewrites up_proj's columns.
        for input_name, group in groups.items():
            weights = [layer.weight_kn() for layer in group]
            group_size = config.group_size_for(group[0].in_features)
            scales, info = search_awq_scales(
                samples[input_name], weights, config.bits, group_size, config.is_symmetric,
                x_magnitude=stats[input_name].magnitude.mean(),
            )
            absorber = fold_awq_scales(model, group, region_layers, scales) if info["ratio"] not in (0.0, None) else None
            folded = absorber is not None
            if isinstance(absorber, LinearLayer) and absorber.name in notes:
                notes[absorber.name]["output_rescaled"] = f"AWQ scales of {group[0].name}"
            for layer in group:
                notes[layer.name]["awq_ratio"] = info["ratio"] if folded else 0.0
                if info["ratio"] not in (0.0, None) and not folded:
                    notes[layer.name]["awq_skipped"] = "no producer can absorb the scales"
            if folded:
                input_scale[input_name] = scales.astype(np.float32)

    results: dict[str, tuple[QuantizedWeight, dict]] = {}
    for input_name, group in groups.items():
        s = input_scale[input_name]
        x = samples[input_name] / s
        weights = {layer.name: layer.weight_kn() for layer in group}
        gptq_results = _gptq_group(group, weights, stats[input_name], s, config) if "gptq" in method else {}
        for layer in group:
            weight = weights[layer.name]
            group_size = config.group_size_for(layer.in_features)
            entry = dict(notes[layer.name])
            if layer.name in gptq_results:
                qw, info = gptq_results[layer.name]
                entry["gptq_damp"] = info["damp"]
                entry["warnings"] = list(info["warnings"])
            elif config.awq_clip:
                clip, _ = search_awq_clip(x, weight, config.bits, group_size, config.is_symmetric)
                qw = quantize_with_clip(weight, clip, config.bits, group_size, config.is_symmetric)
            else:
                qw = quantize_rtn(weight, config.bits, group_size, config.is_symmetric)
            x_original = samples[input_name]
            original = originals[layer.name]
            rtn = quantize_rtn(original, config.bits, group_size, config.is_symmetric).dequantize()
            entry["output_error_rtn"] = relative_output_error(x_original, original, rtn)
            entry["output_error"] = relative_output_error(x, weight, qw.dequantize())
            results[layer.name] = (qw, entry)
    return results


def _gptq_group(
    group: list[LinearLayer], weights: dict[str, np.ndarray], stats: InputStatistics, input_scale: np.ndarray,
    config: QuantConfig,
) -> dict[str, tuple[QuantizedWeight, dict]]:
    """GPTQ for linears sharing one input, as one weight concatenated along N.

    Every output column is rounded against the same H independently of the others, so the concatenation gives the
    same codes as quantizing each linear alone while the Hessian is factored and the K-step loop runs once.
    """
    hessian = stats.hessian.hessian() / np.outer(input_scale, input_scale)
    group_size = config.group_size_for(group[0].in_features)
    joined, info = gptq_quantize(
        np.concatenate([weights[layer.name] for layer in group], axis=1), hessian, config.bits, group_size,
        config.is_symmetric, damp=config.damp, act_order=config.act_order, static_groups=config.act_order,
        n_samples=stats.hessian.tokens,
    )
    results, start = {}, 0
    for layer in group:
        stop = start + layer.out_features
        results[layer.name] = (joined.output_columns(start, stop), info)
        start = stop
    return results
