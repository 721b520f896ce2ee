"""Run a weight-method sequence over one decoder layer and report each linear's output error against RTN."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphq.algorithms.rtn import quantize_rtn
from graphq.algorithms.sparsity import keep_pruned_zero
from graphq.linear_layers import LinearLayer
from graphq.weight_methods.base import LayerResult, RegionWork, WeightMethod
from graphq.weight_methods.registry import rounding_method


@dataclass
class RegionResult:
    layers: dict[str, LayerResult]
    rescaled: dict[str, str] = field(default_factory=dict)  # linear name -> why its output channels were rescaled


def output_energy(x: np.ndarray, weight: np.ndarray, gram: np.ndarray | None = None) -> float:
    """||x W||^2 over the token sample x, or over every calibration token given their Gram matrix (x not read)."""
    if gram is not None:
        return float(np.sum(weight * (gram @ weight), dtype=np.float64))
    return float(np.sum(np.square(x @ weight, dtype=np.float64)))


def relative_output_error(
    x: np.ndarray, weight: np.ndarray, approximation: np.ndarray, gram: np.ndarray | None = None,
    energy: float | None = None,
) -> float:
    """||x (W - A)||^2 / ||x W||^2 over the token sample x, or over every calibration token given their Gram
    matrix X^T X (then x is not read); ``energy`` is ||x W||^2 where the caller has it (``output_energy``)."""
    energy = output_energy(x, weight, gram) if energy is None else energy
    return output_energy(x, weight - approximation, gram) / max(energy, 1e-30)


def rounded_to_nearest(weight: np.ndarray, config, group_size: int) -> np.ndarray:
    """The reference the output errors are compared with: the weight rounded to nearest on the scheme's grid."""
    if config.scheme == "w8a8s":
        from graphq.algorithms.lowbit import quantize_lowbit

        return quantize_lowbit(weight, config.sigma_factor, config.fraction)[0].dequantize()
    return quantize_rtn(weight, config.bits, group_size, config.is_symmetric).dequantize()


def quantize_region(
    model: ir.Model,
    region_layers: list[LinearLayer],
    stats: dict,
    config,
    methods: list[WeightMethod],
    known_layers: list[LinearLayer] | None = None,
) -> RegionResult:
    """Transform, then round, every linear of one decoder layer under ``config`` with the method sequence.

    ``known_layers``: the caller's objects for every linear of the model, so folds that rescale a linear outside
    ``region_layers`` (left float, or under another scheme) update the objects the caller holds.
    The report fields ``output_error`` (the quantized layer on its current input) and ``output_error_rtn`` (RTN on
    the original weight and input) are relative squared errors on the token sample, or on every calibration token
    where a method collected the input's Gram matrix (AWQ); for pruned linears the error is against the weight
    before pruning (so it counts the zeros too).
    """
    work = RegionWork(model, region_layers, stats, config, known_layers or region_layers)
    originals = {layer.name: layer.weight_kn() for layer in region_layers}
    for method in methods:
        method.transform(work)
        if method.prunes:  # the output error is then measured against the weight before pruning
            work.dense_weights.update({l.name: l.weight_kn() for l in region_layers if l.name not in work.dense_weights})
    rounder = rounding_method(methods)
    results: dict[str, LayerResult] = {}
    for input_name, group in work.groups.items():
        rounded = rounder.round_group(work, input_name, group)
        x_original, x = work.samples[input_name], work.current_input(input_name)
        gram_original, gram = work.original_gram(input_name), work.current_gram(input_name)
        for layer in group:
            result = rounded[layer.name]
            result.entry = {**work.notes[layer.name], **result.entry}
            if layer.name in work.keep_masks:
                result.weight = keep_pruned_zero(result.weight, work.keep_masks[layer.name])
            group_size = config.group_size_for(layer.in_features)
            original = originals[layer.name]
            rtn = rounded_to_nearest(original, config, group_size)
            # The float output is the same before and after the methods' function-preserving folds: one energy.
            energy = output_energy(x_original, original, gram_original)
            result.entry["output_error_rtn"] = relative_output_error(x_original, original, rtn, gram_original, energy)
            dense = work.dense_weights.get(layer.name, layer.weight_kn())
            result.entry["output_error"] = relative_output_error(x, dense, result.weight.dequantize(), gram, energy)
            results[layer.name] = result
    return RegionResult(results, work.rescaled)
