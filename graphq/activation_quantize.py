"""The activation pipeline (W8A8, W4A8): optional smoothing, activation calibration, range choice, emission, KV int8.

Two parts, one per stage of a quantize run (graphq.stages). ``prepare_activations`` (weights stage): calibrate ->
smooth -> the weight stage of the W4A8 layers (``weight_stage``: their int4 weights rounded by the config's method
on the smoothed model and written back as float, so what follows sees them). ``activation_quantize`` (activation
stage): emit the dynamic layers -> calibrate the static layers' inputs (and the KV cache) on that model -> choose
each input's range -> emit the static layers -> QDQ the KV cache. Each layer goes through
``finish(layer, qw, details)``; static ones carry ``details["input_scale"]`` and ``details["input_offset"]``
(signed int8 convention, see ``graphq.algorithms.activation_ranges``). W8A8 layers round their int8 weights here
(RTN, or W8A8S's lowbit levels); W4A8 layers take the weights their weight stage produced.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Callable

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from graphq.algorithms.activation_ranges import HISTOGRAM_METHODS, ActivationStats, choose_range, token_output_errors
from graphq.algorithms.rtn import QuantizedWeight, quantize_rtn, weight_relative_mse
from graphq.config import DYNAMIC_ACTIVATION_SCHEMES, W4A8_SCHEMES, QuantConfig
from graphq.errors import GraphqError
from graphq.linear_layers import LinearLayer, input_groups
from graphq.memory import peak_rss_bytes
from graphq.passes.kv_cache import quantize_kv_cache
from graphq.passes.w8a8 import INTEGER_FORMAT
from graphq.runtimes.activation_capture import ActivationCapture, CalibrationResult, kv_cache_outputs

FinishLayer = Callable[[LinearLayer, QuantizedWeight, dict], None]
#: The weight stage of W4A8 layers: rounds them (rtn, awq, gptq, ...), writes the dequantized weights back into the
#: graph and returns {layer name: (quantized weight, report entry)}.
WeightStage = Callable[[list[LinearLayer]], dict[str, tuple[QuantizedWeight, dict]]]
DYNAMIC_NOTE = "int8 per token, dynamic, symmetric"
STATIC_NOTE = "int8 per tensor, static, asymmetric"


def int8_weight(layer: LinearLayer, config: QuantConfig | None = None,
                rounded: dict[str, tuple[QuantizedWeight, dict]] | None = None) -> tuple[np.ndarray, QuantizedWeight, float]:
    """The layer's quantized weight: int8 per channel by RTN, W8A8S's lowbit levels for layers of scheme w8a8s, or
    the int4 weight a W4A8 layer's weight stage produced (``rounded``; the graph then holds its dequantized form)."""
    if rounded is not None and layer.name in rounded:
        qw = rounded[layer.name][0]
        return qw.dequantize(), qw, float(rounded[layer.name][1].get("weight_relative_mse", 0.0))
    weight = layer.weight_kn()
    if config is not None and config.scheme_for(layer.name) == "w8a8s":
        from graphq.algorithms.lowbit import quantize_lowbit

        qw, _ = quantize_lowbit(weight, config.sigma_factor, config.fraction)
        return weight, qw, weight_relative_mse(weight, qw)
    qw = quantize_rtn(weight, bits=8, group_size=-1, symmetric=True)
    error = weight_relative_mse(weight, qw)
    return weight, qw, error


def weight_grid(layer: LinearLayer, config: QuantConfig):
    """The grid the layer's weight is rounded onto, which the smoothing alpha search scores: a W4A8 layer's int4
    per-group grid (its group size and symmetry), W8A8S's lowbit levels, else W8A8's int8 per output channel,
    symmetric."""
    from graphq.algorithms.lowbit import LowbitGrid
    from graphq.algorithms.smoothing import INT8_PER_CHANNEL, WeightGrid

    scheme = config.scheme_for(layer.name)
    if scheme == "w8a8s":
        return LowbitGrid(config.sigma_factor, config.fraction)
    if scheme not in W4A8_SCHEMES:
        return INT8_PER_CHANNEL
    sub = config.for_scheme(scheme)
    return WeightGrid(bits=sub.bits, group_size=sub.group_size_for(layer.in_features), symmetric=sub.is_symmetric)


def _smooth(
    model: ir.Model, layers: list[LinearLayer], result: CalibrationResult, config: QuantConfig
) -> tuple[dict, dict[str, ActivationStats]]:
    """Smooth the W8A8 groups; returns the report and the pass-1 statistics of every W8A8 input after smoothing
    (derived from those before: per-channel ranges and tokens of (x - z) / s), so no second ranges pass runs."""
    from graphq.algorithms.smoothing import InputChannelStats
    from graphq.passes.smooth import smooth_linear_groups

    stats = {
        name: InputChannelStats(entry.channel_min, entry.channel_max, entry.tokens)
        for name, entry in result.stats.items()
        if entry.rows_seen
    }
    smoothed: dict[str, InputChannelStats] = {}
    # The alpha search measures W8A8 error the way the layers will be quantized: per token when all are dynamic.
    per_token = all(config.scheme_for(layer.name) in DYNAMIC_ACTIVATION_SCHEMES for layer in layers)
    report = smooth_linear_groups(model, layers, stats, config.smooth, config.smooth_alpha, config.smooth_all_linears,
                                  smoothed_stats=smoothed, act_per_token=per_token,
                                  weight_grid=lambda layer: weight_grid(layer, config))
    known: dict[str, ActivationStats] = {}
    for layer in layers:
        name = layer.input.name  # after smoothing
        before = result.stats.get(name)
        if name in smoothed:
            entry = smoothed[name]
            rows_seen = max(s.rows_seen for s in result.stats.values())
            known[name] = ActivationStats.from_channel_ranges(entry.channel_min, entry.channel_max, entry.tokens,
                                                              rows_seen, reservoir_rows=len(entry.tokens),
                                                              seed=config.seed)
        elif before is not None:
            known[name] = before
    return report, known


@dataclass
class ActivationPrep:
    """What the weights stage leaves for the activation stage: the smoothing report, the statistics of smoothed
    inputs derived from the smoothing pass (so the ranges need no second first pass), the W4A8 layers' rounded
    int4 weights, and the activation calibration's account so far."""

    smoothing: dict | None = None
    known: dict[str, ActivationStats] = dataclass_field(default_factory=dict)
    rounded: dict[str, tuple[QuantizedWeight, dict]] = dataclass_field(default_factory=dict)
    calibration: dict = dataclass_field(default_factory=lambda: {"passes": 0, "seconds": 0.0})


def prepare_activations(
    model: ir.Model,
    static_layers: list[LinearLayer],
    dynamic_layers: list[LinearLayer],
    config: QuantConfig,
    progress: bool,
    load_samples: Callable[[], list[np.ndarray]],
    weight_stage: WeightStage | None = None,
) -> ActivationPrep:
    """The weight part of the activation pipeline: smoothing (it rewrites weights), then the W4A8 layers' int4
    weights by their method (``weight_stage``, required when there are any), so int4 weights are rounded on the
    smoothed model; W8A8S layers whose method rounds with error feedback (sparsegpt, ...+gptq) go the same way,
    their lowbit levels rounded by GPTQ on the smoothed, pruned weights. What it returns is all activation_quantize
    needs besides the graph."""
    prep = ActivationPrep()
    w8a8_layers = static_layers + dynamic_layers
    staged_layers = [layer for layer in w8a8_layers if config.scheme_for(layer.name) in W4A8_SCHEMES
                     or (config.scheme_for(layer.name) == "w8a8s" and config.lowbit_error_feedback)]
    if staged_layers and weight_stage is None:
        raise ValueError("W4A8 layers (and W8A8S ones rounded with error feedback) need a weight stage")
    if config.smooth and w8a8_layers:
        capture = ActivationCapture(model, w8a8_layers)
        first = capture.calibrate(load_samples(), histograms=False, reservoir_rows=config.reservoir_rows,
                                  seed=config.seed, progress=progress)
        del capture
        prep.calibration["passes"] += first.passes
        prep.calibration["seconds"] += first.seconds
        prep.smoothing, prep.known = _smooth(model, w8a8_layers, first, config)
        smoothed = prep.smoothing
        if progress:
            print(f"graphq: smoothing ({config.smooth}, alpha {config.smooth_alpha}): {len(smoothed['groups'])} input "
                  f"group(s) smoothed, {len(smoothed['skipped'])} skipped, {smoothed['ops_added']} op(s) added",
                  file=sys.stderr)
        del first
    if staged_layers:
        prep.rounded = weight_stage(staged_layers)
        prep.known = {}  # the weight stage changed weights (and AWQ folds inputs): the statistics are measured again
    return prep


def activation_quantize(
    model: ir.Model,
    static_layers: list[LinearLayer],
    dynamic_layers: list[LinearLayer],
    config: QuantConfig,
    progress: bool,
    finish: FinishLayer,
    load_samples: Callable[[], list[np.ndarray]],
    prep: ActivationPrep,
) -> dict:
    """Quantize the W8A8 / W4A8 layers' activations and the KV cache, on the model prepare_activations left;
    returns the report's extra top-level entries."""
    report: dict = {}
    w8a8_layers = static_layers + dynamic_layers
    if not w8a8_layers and not config.kv_cache:
        return report
    if any(config.scheme_for(layer.name) not in W4A8_SCHEMES for layer in w8a8_layers):
        report["integer_format"] = INTEGER_FORMAT
    smoothing = prep.smoothing is not None
    rounded = prep.rounded
    if smoothing:
        report["smoothing"] = prep.smoothing
        finish = _noting_rescaled_outputs(finish, prep.smoothing)
    if not (static_layers or config.kv_cache or smoothing):
        _finish_dynamic(dynamic_layers, rounded, progress, finish)
        return report
    samples = load_samples()
    kv_outputs = kv_cache_outputs(model) if config.kv_cache else []
    if config.kv_cache and not kv_outputs:
        raise GraphqError("--kv-cache int8: the model has no present.* outputs; export it with past key values")
    calibration: dict = {"samples": len(samples), "tokens": int(sum(len(s) for s in samples)),
                         "passes": prep.calibration["passes"], "seconds": prep.calibration["seconds"],
                         "method": config.act_method}
    want_tokens = config.act_method == "auto" or smoothing or config.act_fallback > 0
    reservoir = config.reservoir_rows if want_tokens else 0
    _finish_dynamic(dynamic_layers, rounded, progress, finish)
    if static_layers or kv_outputs:
        capture = ActivationCapture(model, static_layers, kv_outputs)
        result = capture.calibrate(
            samples,
            histograms=bool(static_layers) and config.act_method in HISTOGRAM_METHODS,
            reservoir_rows=reservoir if static_layers else 0,
            seed=config.seed,
            progress=progress,
            known=prep.known,
        )
        del capture
        calibration["passes"] += result.passes
        calibration["seconds"] += result.seconds
        calibration["peak_sample_activation_bytes"] = result.peak_sample_bytes
        calibration["statistics_bytes"] = int(sum(s.nbytes for s in result.stats.values()))
        chosen = _emit_static(model, static_layers, result, config, progress, finish, rounded)
        if static_layers:
            calibration["methods_chosen"] = chosen
        if kv_outputs:
            report["kv_cache"] = quantize_kv_cache(model, result.kv)
    calibration["seconds"] = round(calibration["seconds"], 3)
    calibration["peak_rss_bytes_after"] = peak_rss_bytes()
    report["activation_calibration"] = calibration
    return report


def _finish_dynamic(layers: list[LinearLayer], rounded: dict, progress: bool, finish: FinishLayer) -> None:
    for layer in tqdm(layers, desc="dynamic activations", unit="layer", disable=not progress, file=sys.stderr):
        _, qw, error = int8_weight(layer, rounded=rounded)
        entry = rounded[layer.name][1] if layer.name in rounded else {"weight_relative_mse": error}
        finish(layer, qw, {**entry, "activations": DYNAMIC_NOTE})


def _noting_rescaled_outputs(finish: FinishLayer, smoothing_report: dict) -> FinishLayer:
    """``finish`` that marks the linears whose output channels smoothing rescaled (graphq verify reads the mark)."""
    rescaled = {g["rescaled_output_of"]: g["layers"] for g in smoothing_report["groups"] if g.get("rescaled_output_of")}

    def marking(layer: LinearLayer, qw: QuantizedWeight, details: dict) -> None:
        if layer.name in rescaled:
            details = {**details, "output_rescaled": f"smoothing scales of {', '.join(rescaled[layer.name])}"}
        finish(layer, qw, details)

    return marking


def _emit_static(
    model: ir.Model, layers: list[LinearLayer], result: CalibrationResult, config: QuantConfig, progress: bool,
    finish: FinishLayer, rounded: dict[str, tuple[QuantizedWeight, dict]] | None = None,
) -> dict[str, int]:
    """Choose the range of every static layer's input (once per shared input, so q/k/v quantize it alike) and emit.

    With ``act_fallback`` N, the N input groups whose worst per-token W8A8 output error (relative, on the sampled
    tokens and the extreme rows) is largest keep float activations: their layers get the quantized weight only
    (W8A16; W4A16 for W4A8 layers). ``rounded``: the W4A8 layers' weights from their weight stage."""
    rounded = rounded or {}
    chosen: dict[str, int] = {}
    plans = []
    bar = tqdm(input_groups(layers), desc=f"w8a8 ranges ({config.act_method})", unit="input", disable=not progress,
               file=sys.stderr)
    for group in bar:
        stats = result.stats[group[0].input.name]
        if stats.rows_seen == 0:
            raise GraphqError(f"calibration never produced the input of {group[0].name}")
        weights = [int8_weight(layer, config, rounded) for layer in group]
        pairs = [(w, qw.dequantize()) for w, qw, _ in weights]
        choice = choose_range(stats, config.act_method, config.percentile,
                              weights=pairs if config.act_method == "auto" else None)
        error = None
        if config.act_fallback and len(stats.tokens):
            # Ranked by the worst token: a range that wrecks a few massive-activation tokens (attention sinks)
            # wrecks the model even when the mean error is small.
            error = choice.worst_token_error
            if error is None:
                error = float(sum(token_output_errors(stats.tokens, w, wq, choice.range) for w, wq in pairs).max())
        plans.append((group, stats, weights, choice, error))
    fallback: set[int] = set()
    if config.act_fallback:
        ranked = sorted(range(len(plans)), key=lambda i: -(plans[i][4] or 0.0))
        fallback = set(ranked[: config.act_fallback])
    for index, (group, stats, weights, choice, error) in enumerate(plans):
        for layer, (_, qw, weight_error) in zip(group, weights):
            details = {
                **(rounded[layer.name][1] if layer.name in rounded else {}),
                "weight_relative_mse": weight_error,
                "activations": STATIC_NOTE,
                "activation_method": choice.method,
                "activation_range": [choice.range.lo, choice.range.hi],
                "activation_observed": [stats.min, stats.max],
            }
            if error is not None:
                details["activation_worst_token_error"] = error
            if choice.errors:
                details["activation_output_errors"] = choice.errors
            if index in fallback:
                details["activation_fallback"] = (
                    f"activations kept float: {config.scheme_for(layer.name).upper()} worst-token output error {error:.3g} is among the {config.act_fallback} largest"
                )
            else:
                details["input_scale"] = choice.range.scale
                details["input_offset"] = choice.range.offset
                chosen[choice.method] = chosen.get(choice.method, 0) + 1
            if choice.range.note:
                details["warnings"] = [choice.range.note]
            finish(layer, qw, details)
    if fallback:
        chosen["fallback_w8a16"] = sum(len(plans[i][0]) for i in fallback)
    return chosen
