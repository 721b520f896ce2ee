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

import numpy as np
import onnx_ir as ir

from graphq.algorithms.awq import fold_scales_into_norm, scale_weight_columns, scale_weight_rows
from graphq.algorithms.smoothing import METHODS, GroupProducts, InputChannelStats, search_alpha, smoothing_factors
from graphq.errors import GraphqError
from graphq.graph_utils import add_initializer
from graphq.layer_methods import upstream_linear
from graphq.linear_layers import LinearLayer, find_linear_layers
from graphq.passes.weights import set_layer_bias, set_layer_weight, set_node_constant_input, set_norm_weight

# Norm ops whose input 1 is the per-channel gain (and, for LayerNormalization, input 2 the bias).
_GAIN_NORMS = {"SimplifiedLayerNormalization", "RMSNormalization", "LayerNormalization"}
# Readers of a value that do not depend on its numbers, so rescaling the value leaves them unchanged.
_SHAPE_ONLY_OPS = {"Shape", "Size"}


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
) -> dict:
    """Smooth every group of linears sharing an input among ``layers``; the float function stays the same.

    ``stats`` is keyed by the group's input value name (``layer.input.name``). Groups are processed in graph
    order; a linear outside ``layers`` that reads a smoothed input is rescaled too (it must be, for exactness).
    ``alpha="auto"`` searches alpha per group (``search_alpha``) and leaves a group unsmoothed when no alpha
    lowers its W8A8 output error; with OS+ it also tries the scale alone and drops the shift (and the ops it
    would add) where that error is lower. If ``smoothed_stats`` is a dict, it receives the statistics of each smoothed
    group's new input (keyed by its new name), (x - z) / s, so calibration need not run again for them.
    ``act_per_token`` makes the errors (and the auto search) assume dynamic per-token activation quantization
    (``--scheme w8a8-dynamic``) instead of static per-tensor.

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

    groups, all_layers = _groups(model, layers)
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
        target = _fold_target(group, all_layers)
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
        if alpha == "auto":
            chosen, info = search_alpha(entry, weights, group_method, per_token=act_per_token)
            if group_method == "os+":
                # A shift is not always a gain: where an outlier channel is near 0 on most tokens (SwiGLU outputs
                # before down_proj), centring it moves every token off the exact zero level. Measured on
                # SmolLM2-135M, OS+ with down_proj's shift costs W8A8 ~3x the perplexity increase.
                plain_alpha, plain_info = search_alpha(entry, weights, "smoothquant", per_token=act_per_token)
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
            products = GroupProducts(entry, weights)
            ones = np.ones_like(scale)
            unsmoothed = products.error(np.zeros_like(ones), ones, per_token=act_per_token)
            smoothed = products.error(shift, scale, per_token=act_per_token)
        ops = _apply(model, group, target, shift, scale, all_linears)
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
            "error_unsmoothed": float(unsmoothed),
            "error_smoothed": float(smoothed),
            "notes": notes + ([target["reason"]] if target["kind"] == "none" else []),
        })
        report["ops_added"] += len(ops)
    return report


def _groups(
    model: ir.Model, layers: list[LinearLayer]
) -> tuple[list[tuple[str, list[LinearLayer]]], list[LinearLayer]]:
    """(input name, every linear of the model reading it) for each input of ``layers``, in graph order, and every
    linear of the model. The caller's objects stand in for the scanned ones, so the edits (a bias Add, a new
    input) made through either list are seen by both."""
    given = {id(l.node): l for l in layers}
    wanted = {l.input.name for l in layers}
    every = [given.get(id(found.node), found) for found in find_linear_layers(model)]
    groups: dict[str, list[LinearLayer]] = {}
    for layer in every:
        if layer.input.name in wanted:
            groups.setdefault(layer.input.name, []).append(layer)
    for layer in layers:  # a caller's layer the fresh scan did not see (should not happen) still gets smoothed
        if not any(l is layer for l in groups.get(layer.input.name, [])):
            groups.setdefault(layer.input.name, []).append(layer)
    return list(groups.items()), every


def _only_read_by(value: ir.Value, nodes: list[ir.Node], graph: ir.Graph) -> bool:
    """Whether ``value``'s numbers reach only these nodes (no other op, no graph output); ops that read only its
    shape (the attention's Shape of the norm output) do not count."""
    ids = {id(n) for n in nodes}
    return value not in graph.outputs and all(
        id(use.node) in ids or use.node.op_type in _SHAPE_ONLY_OPS for use in value.uses()
    )


def _fold_target(group: list[LinearLayer], all_layers: list[LinearLayer]) -> dict:
    """Where 1/s (and -z/s) can go: {'kind': 'norm' | 'affine' | 'linear' | 'none', 'shift': bool, ...}."""
    first = group[0]
    graph = first.node.graph
    nodes = [l.node for l in group]
    producer = first.input.producer()
    if first.producer_kind == "norm" and producer is not None:
        if not _only_read_by(first.input, nodes, graph):
            return {"kind": "none", "reason": f"the output of {first.producer_name} has readers besides the group"}
        if producer.op_type == "Mul" and first.norm_weight is not None:
            return {"kind": "norm", "node": producer, "bias_index": None, "shift": True, "shift_reason": "",
                    "describe": f"norm weight {first.producer_name}"}
        if producer.op_type in _GAIN_NORMS and first.norm_weight is not None and producer.outputs[0] is first.input:
            has_bias = producer.op_type == "LayerNormalization"
            return {"kind": "norm", "node": producer, "bias_index": 2 if has_bias else None, "shift": True,
                    "shift_reason": "", "describe": f"norm {'weight and bias' if has_bias else 'weight'} {first.producer_name}"}
        affine = _decomposed_affine(producer, first.in_features, graph)
        if affine is not None:
            return {"kind": "affine", **affine, "shift": True, "shift_reason": "",
                    "describe": f"norm weight and bias {first.producer_name} (Mul + Add)"}
        return {"kind": "none", "reason": f"{first.producer_name} ({producer.op_type}) has no per-channel gain to fold into"}
    region = [l for l in all_layers if l.layer_index == first.layer_index]
    upstream = upstream_linear(first, region) if len(group) == 1 else None
    if upstream is None:
        why = "o_proj under GQA (v_proj has fewer outputs)" if first.role == "o" else f"input produced by {first.producer_kind} op"
        return {"kind": "none", "reason": f"nothing can absorb the scales: {why}"}
    if first.producer_kind == "gated_activation":
        gate_mul = first.producer_node
        if not (_only_read_by(upstream.output, [gate_mul], graph) and _only_read_by(first.input, nodes, graph)):
            return {"kind": "none", "reason": f"{upstream.name}'s output or the gated product has other readers"}
        return {"kind": "linear", "upstream": upstream, "shift": False,
                "shift_reason": "a shift cannot pass the gated product act(gate) * up",
                "describe": f"output columns of {upstream.name}"}
    # v_proj -> attention -> o_proj: softmax rows sum to 1, so V - z reaches o_proj as x - z.
    return {"kind": "linear", "upstream": upstream, "shift": True, "shift_reason": "",
            "describe": f"output columns of {upstream.name}"}


def _constant_index(node: ir.Node, channels: int) -> int | None:
    """The input of a binary op that is a constant [channels] vector (through Identity), if exactly one is."""
    found = [
        i for i, v in enumerate(node.inputs[:2])
        if v is not None and _is_constant(v) and tuple(_constant_array(v).shape) == (channels,)
    ]
    return found[0] if len(found) == 1 else None


def _is_constant(value: ir.Value) -> bool:
    while value.const_value is None:
        producer = value.producer()
        if producer is None or producer.op_type != "Identity":
            return False
        value = producer.inputs[0]
    return value.is_initializer()


def _decomposed_affine(add: ir.Node, channels: int, graph: ir.Graph) -> dict | None:
    """A LayerNorm exported below opset 17 ends in Mul(gain) then Add(bias): the nodes and their constant inputs."""
    if add.op_type != "Add":
        return None
    bias_index = _constant_index(add, channels)
    if bias_index is None:
        return None
    mul = add.inputs[1 - bias_index].producer()
    if mul is None or mul.op_type != "Mul" or not _only_read_by(mul.outputs[0], [add], graph):
        return None
    gain_index = _constant_index(mul, channels)
    if gain_index is None:
        return None
    return {"mul": mul, "gain_index": gain_index, "add": add, "bias_index": bias_index}


def _apply(
    model: ir.Model, group: list[LinearLayer], target: dict, shift: np.ndarray, scale: np.ndarray, all_linears: bool
) -> list[str]:
    """Rewrite the graph for x -> (x - z) / s; returns the op types added."""
    first = group[0]
    dtype = first.dtype.numpy()
    s64 = scale.astype(np.float64)
    has_shift = bool(np.any(shift != 0))
    ops: list[str] = []
    # Consumers: bias b + z W with the original W, then rows times s.
    for layer in group:
        weight = layer.weight_kn()
        if has_shift:
            z_w = shift.astype(np.float64) @ weight.astype(np.float64)
            bias = layer.bias_array()
            if bias is None:
                _add_linear_bias(model, layer, z_w.astype(dtype))
                ops.append("Add")
            else:
                set_layer_bias(model, layer, (bias.astype(np.float64) + z_w).astype(dtype))
        set_layer_weight(model, layer, scale_weight_rows(weight, scale))

    kind = target["kind"]
    if kind == "norm":
        norm = target["node"]
        gain = first.norm_weight.const_value.numpy().astype(np.float32)
        set_norm_weight(model, first, fold_scales_into_norm(gain, scale))
        for layer in group[1:]:
            layer.norm_weight = first.norm_weight
        if target["bias_index"] is not None and (has_shift or _has_input(norm, target["bias_index"])):
            index = target["bias_index"]
            current = norm.inputs[index] if index < len(norm.inputs) else None
            beta = np.zeros(len(scale)) if current is None else _constant_array(current)
            set_node_constant_input(model, norm, index, ((beta - shift) / s64).astype(dtype), f"{first.producer_name}.bias")
        elif has_shift:
            _insert_on_input(model, group, "Add", (-shift / s64).astype(dtype), after=norm, tag="shift")
            ops.append("Add")
    elif kind == "affine":  # decomposed LayerNorm: gain / s, bias (b - z) / s
        mul, add, name = target["mul"], target["add"], first.producer_name or first.name
        gain = _constant_array(mul.inputs[target["gain_index"]])
        beta = _constant_array(add.inputs[target["bias_index"]])
        set_node_constant_input(model, mul, target["gain_index"], (gain / s64).astype(dtype), f"{name}.weight")
        set_node_constant_input(model, add, target["bias_index"], ((beta - shift) / s64).astype(dtype), f"{name}.bias")
    elif kind == "linear":
        upstream = target["upstream"]
        bias = upstream.bias_array()
        if has_shift and target["shift"]:  # v_proj: b' = (b - z) / s
            bias = np.zeros(len(scale), np.float32) if bias is None else bias
            bias = bias - shift
        weight, new_bias = scale_weight_columns(upstream.weight_kn(), scale, bias)
        set_layer_weight(model, upstream, weight)
        if new_bias is not None:
            if upstream.bias is None:
                _add_linear_bias(model, upstream, new_bias.astype(dtype))
                ops.append("Add")
            else:
                set_layer_bias(model, upstream, new_bias.astype(dtype))
        if has_shift and not target["shift"]:  # only with all_linears: x/s - z/s after the gated product
            _insert_on_input(model, group, "Sub", (shift / s64).astype(dtype), after=None, tag="shift")
            ops.append("Sub")
    else:  # explicit ops, all_linears=True
        if has_shift:
            _insert_on_input(model, group, "Sub", shift.astype(dtype), after=None, tag="shift")
            ops.append("Sub")
        _insert_on_input(model, group, "Mul", (1.0 / s64).astype(dtype), after=None, tag="scale")
        ops.append("Mul")
    return ops


def _has_input(node: ir.Node, index: int) -> bool:
    return index < len(node.inputs) and node.inputs[index] is not None


def _constant_array(value: ir.Value) -> np.ndarray:
    """The float64 array behind a constant input, followed through Identity nodes."""
    while value.const_value is None:
        producer = value.producer()
        if producer is None or producer.op_type != "Identity":
            raise GraphqError(f"{value.name} is not a constant: cannot fold smoothing scales into it")
        value = producer.inputs[0]
    return np.asarray(value.const_value.numpy(), dtype=np.float64)


def _reroute(old: ir.Value, new: ir.Value, nodes: list[ir.Node]) -> None:
    ids = {id(n) for n in nodes}
    for use in list(old.uses()):
        if id(use.node) in ids:
            use.node.replace_input_with(use.idx, new)


def _insert_on_input(
    model: ir.Model, group: list[LinearLayer], op_type: str, constant: np.ndarray, after: ir.Node | None, tag: str
) -> None:
    """Insert ``op_type``(x, constant) between the group's input x and the group's linears.

    Placed right after ``after`` (the norm), else right before the group's first node, and named under it so it
    stays in the same decoder layer."""
    graph = model.graph
    x = group[0].input
    anchor = after if after is not None else group[0].node
    base = anchor.name or group[0].name
    const = add_initializer(graph, f"{group[0].name}.smooth_{tag}", constant)
    node = ir.node(op_type, inputs=[x, const], name=f"{base}_graphq_smooth_{tag}")
    node.outputs[0].name = f"{x.name}_graphq_smooth_{tag}"
    node.outputs[0].type = x.type
    node.outputs[0].shape = x.shape
    if after is not None:
        graph.insert_after(after, node)
    else:
        graph.insert_before(anchor, node)
    _reroute(x, node.outputs[0], [l.node for l in group])
    for layer in group:
        layer.input = node.outputs[0]


def _add_linear_bias(model: ir.Model, layer: LinearLayer, bias: np.ndarray) -> None:
    """Give a linear without bias an ``Add`` of a constant [N] right after its MatMul."""
    graph = model.graph
    out = layer.node.outputs[0]
    uses = list(out.uses())  # before the Add exists: it must keep reading the MatMul output
    const = add_initializer(graph, f"{layer.name}.bias", bias)
    add = ir.node("Add", inputs=[out, const], name=f"{layer.node.name or layer.name}_graphq_bias")
    result = add.outputs[0]
    result.type, result.shape = out.type, out.shape
    graph.insert_after(layer.node, add)
    if out in graph.outputs:  # keep the graph output's name on the biased value
        index = list(graph.outputs).index(out)
        name = out.name
        out.name = f"{name}_graphq_unbiased"
        result.name = name
        graph.outputs[index] = result
    else:
        result.name = f"{out.name}_graphq_biased"
    for use in uses:
        use.node.replace_input_with(use.idx, result)
    layer.bias, layer.bias_node = const, add
