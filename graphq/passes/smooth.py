"""Anti-outlier smoothing of an ONNX graph (SmoothQuant, OS+): fold per-channel scales (and shifts) so the float
function is unchanged while the linears' inputs lose their outlier channels.

For each group of linears sharing an input x (q/k/v, gate/up, o_proj, down_proj, lm_head) the rows of every weight
are multiplied by s (``scale_weight_rows``) and x is replaced by (x - z) / s, folded into whatever produces x:

- a norm: RMSNorm gain (a ``Mul`` by a constant, SimplifiedLayerNormalization, RMSNormalization) or LayerNorm gain
  and bias divided by s (``fold_scales_into_norm``): LayerNormalization, or below opset 17 its Mul + Add tail.
  OS+ with an RMSNorm has no bias to absorb -z/s, so an ``Add`` is inserted after the norm (reported in ``ops_added``); LayerNormalization's bias absorbs it (created if absent).
- the previous linear: o_proj's scales into v_proj's output columns (only when their shapes match, i.e. not under
  GQA; attention rows sum to 1, so an OS+ shift of V passes through to o_proj's input unchanged and goes into
  v_proj's bias), down_proj's scales into up_proj's output columns (``scale_weight_columns``). An OS+ shift cannot
  pass the gated product act(gate) * up: such groups get the scale only (z = 0) unless ``all_linears`` is set,
  in which case a ``Sub`` of z/s is inserted after the product.
- nothing (o_proj under GQA, a norm whose output has other readers): the group
  is skipped and reported, unless ``all_linears=True``: then an explicit ``Mul`` by 1/s (after a ``Sub`` of z for
  OS+) is inserted on the group's input.

OS+ shifts go into the linears' biases, b' = b + z W (an ``Add`` is created where a linear had no bias).

The graph's present.*.value outputs (KV cache) of a layer whose o_proj scales folded into v_proj are scaled (and
shifted) too; the logits are unchanged and a cache produced by the smoothed model is read back consistently.

New nodes are named under the node they follow (``/model/layers.3/...``) so decoder-layer partitioning still sees
them in their layer. The caller's ``LinearLayer`` objects are updated (weight, bias, bias_node, input, norm_weight);
``find_linear_layers`` on the edited model finds the same layers, now with biases where OS+ added them.

Example (no CLI; ``stats`` normally comes from the calibration engine)::

    import numpy as np
    from graphq.algorithms.smoothing import InputChannelStats
    from graphq.linear_layers import find_linear_layers
    from graphq.model_io import load_model
    from graphq.passes.smooth import smooth_linear_groups
    from graphq.runtimes.submodel import SubmodelSession
    from graphq.runtimes.layerwise import graph_input_feeds

    model = load_model("tiny-onnx")
    layers = [l for l in find_linear_layers(model) if l.role != "lm_head"]
    names = list(dict.fromkeys(l.input.name for l in layers))
    session = SubmodelSession(model, {}, names)
    captured = session.run(graph_input_feeds(model.graph, np.arange(1, 40)))
    stats = {n: InputChannelStats.from_rows(captured[n]) for n in names}
    report = smooth_linear_groups(model, layers, stats, "smoothquant", 0.5)
    # model now computes the same logits; report["groups"] / report["skipped"] say what was folded where.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from graphq.algorithms.smoothing import (
    METHODS, GroupProducts, InputChannelStats, WeightGrid, search_alpha, smoothing_factors,
)
from graphq.errors import GraphqError
from graphq.linear_layers import LinearLayer
from graphq.passes.fold import apply_fold, fold_target, input_readers

def smooth_linear_groups(
    model: ir.Model,
    layers: list[LinearLayer],
    stats: dict[str, InputChannelStats],
    method: str,
    alpha: float | str,
    all_linears: bool = False,
    *,
    smoothed_stats: dict[str, InputChannelStats] | None = None,
    act_per_token: bool = False,
    weight_grid: Callable[[LinearLayer], WeightGrid] | None = None,
) -> dict:
    """Smooth every group of linears sharing an input among ``layers``; the float function stays the same.

    ``stats`` is keyed by the group's input value name (``layer.input.name``). Groups are processed in graph
    order; a linear outside ``layers`` that reads a smoothed input is rescaled too (it must be, for exactness).
    ``alpha="auto"`` searches alpha per group (``search_alpha``) and leaves a group unsmoothed when no alpha
    lowers its W8A8 output error; with OS+ it also tries the scale alone and drops the shift (and the ops it
    would add) where that error is lower. If ``smoothed_stats`` is a dict, it receives the statistics of each smoothed
    group's new input (keyed by its new name), (x - z) / s, so calibration need not run again for them.
    ``act_per_token`` makes the errors (and the auto search) assume dynamic per-token activation quantization
    (``--scheme w8a8-dynamic``) instead of static per-tensor. ``weight_grid(layer)`` gives the grid each linear's
    weight will be rounded onto (default int8 per output channel): the errors score every linear on its own grid,
    e.g. W4A8's int4 per-group weights, where the large scales of a high alpha coarsen whole groups.

    Returns a JSON-friendly report: 'method', 'alpha', 'all_linears', 'groups' (per smoothed group: layers, input,
    smoothed_input, alpha, fold, scale_min/max, shift_absmax, ops_added, error_unsmoothed/error_smoothed: relative
    W8A8 output errors on the token sample, notes), 'skipped' (layers, input, reason), 'ops_added' (total).
    """
    if method not in METHODS:
        raise GraphqError(f"unknown smoothing method {method!r}: use one of {', '.join(METHODS)}")
    if isinstance(alpha, str):
        if alpha != "auto":
            raise GraphqError(f"smoothing alpha {alpha!r} is not a number: give a value in [0, 1] or 'auto'")
    elif not (isinstance(alpha, (int, float)) and 0.0 <= float(alpha) <= 1.0):
        raise GraphqError(f"smoothing alpha {alpha!r} is out of range: give a value in [0, 1] or 'auto'")

    groups, all_layers = input_readers(model, layers)
    for input_name, group in groups:
        entry = stats.get(input_name)
        names = ", ".join(l.name for l in group)
        if entry is None:
            raise GraphqError(
                f"no calibration statistics for the input {input_name} of {names}: "
                "calibrate it (stats are keyed by layer.input.name) or leave these layers out"
            )
        if entry.channels != group[0].in_features:
            raise GraphqError(
                f"statistics for {input_name} have {entry.channels} channels but {names} read "
                f"{group[0].in_features}: they were captured on a different model"
            )

    report: dict = {
        "method": method, "alpha": alpha, "all_linears": all_linears, "act_per_token": act_per_token,
        "groups": [], "skipped": [], "ops_added": 0,
    }
    for input_name, group in groups:
        names = [l.name for l in group]
        target = fold_target(group, all_layers)
        if target["kind"] == "none" and not all_linears:
            report["skipped"].append({"layers": names, "input": input_name, "reason": target["reason"]})
            continue
        shift_folds = target.get("shift", False) or all_linears
        group_method = method if shift_folds else "smoothquant"
        notes = []
        if method == "os+" and not shift_folds:
            notes.append(f"OS+ shift dropped ({target['shift_reason']}): scale only, SmoothQuant formula")
        entry = stats[input_name]
        weights = [l.weight_kn() for l in group]
        grids = [weight_grid(l) for l in group] if weight_grid is not None else None
        if alpha == "auto":
            chosen, info = search_alpha(entry, weights, group_method, per_token=act_per_token, weight_grids=grids)
            if group_method == "os+":
                # A shift is not always a gain: where an outlier channel is near 0 on most tokens (SwiGLU outputs
                # before down_proj), centring it moves every token off the exact zero level. Measured on
                # SmolLM2-135M, OS+ with down_proj's shift costs W8A8 ~3x the perplexity increase.
                plain_alpha, plain_info = search_alpha(entry, weights, "smoothquant", per_token=act_per_token,
                                                       weight_grids=grids)
                if plain_info["error"] < info["error"]:
                    notes.append(
                        f"OS+ shift dropped: scale only gives a lower W8A8 error "
                        f"({plain_info['error']:.3g} vs {info['error']:.3g} with the shift)"
                    )
                    group_method, chosen, info = "smoothquant", plain_alpha, plain_info
            unsmoothed, smoothed = info["error_unsmoothed"], info["error"]
            if not smoothed < unsmoothed:
                report["skipped"].append({
                    "layers": names, "input": input_name,
                    "reason": f"no alpha lowers the W8A8 output error ({smoothed:.3g} vs {unsmoothed:.3g} unsmoothed)",
                })
                continue
        else:
            chosen = float(alpha)
        shift, scale = smoothing_factors(entry, weights, group_method, chosen)
        if alpha != "auto":
            products = GroupProducts(entry, weights, grids)
            ones = np.ones_like(scale)
            unsmoothed = products.error(np.zeros_like(ones), ones, per_token=act_per_token)
            smoothed = products.error(shift, scale, per_token=act_per_token)
        ops = apply_fold(model, group, target, shift, scale, explicit=all_linears)
        new_input = group[0].input.name
        if smoothed_stats is not None:
            smoothed_stats[new_input] = entry.transformed(shift, scale)
        report["groups"].append({
            "layers": names,
            "input": input_name,
            "smoothed_input": new_input,
            "alpha": chosen,
            "method": group_method,
            "fold": target["describe"] if target["kind"] != "none" else "explicit ops on the input",
            # The upstream linear's outputs now differ from the float model's by 1/s per channel, on purpose.
            "rescaled_output_of": target["upstream"].name if target["kind"] == "linear" else None,
            "scale_min": float(scale.min()),
            "scale_max": float(scale.max()),
            "shift_absmax": float(np.abs(shift).max()),
            "ops_added": ops,
            "weight_grids": sorted({g.describe() for g in grids}) if grids else ["int8 per channel sym"],
            "error_unsmoothed": float(unsmoothed),
            "error_smoothed": float(smoothed),
            "notes": notes + ([target["reason"]] if target["kind"] == "none" else []),
        })
        report["ops_added"] += len(ops)
    return report


