"""One fold for per-channel input scales (and shifts): x -> (x - z) / s for a group of linears sharing x, with
the float function unchanged. Used by smoothing (SmoothQuant, OS+) and by AWQ.

Every linear that reads x is rescaled (``input_readers`` finds them all, quantized or not, so a float layer left
out of quantization still reads what it read before), and 1/s (and -z/s) goes into whatever produces x
(``fold_target``): an RMSNorm/LayerNorm gain (and bias), a decomposed LayerNorm's Mul + Add tail, the previous
linear's output columns (v_proj before o_proj when the shapes match, up_proj before down_proj), or nothing, in
which case the caller skips the group or, with ``explicit``, inserts Mul/Sub ops on the input. A value whose
numbers reach anything but the group (another op, a graph output, an already-quantized linear) is never folded.

New nodes are named under the node they follow (``/model/layers.3/...``) so decoder-layer partitioning still
sees them in their layer. The caller's ``LinearLayer`` objects are updated (weight, bias, bias_node, input,
norm_weight).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphq.algorithms.awq import fold_scales_into_norm, scale_weight_columns, scale_weight_rows
from graphq.errors import GraphqError
from graphq.graph_utils import add_initializer
from graphq.linear_layers import LinearLayer, find_linear_layers
from graphq.passes.weights import set_layer_bias, set_layer_weight, set_node_constant_input, set_norm_weight

# Norm ops whose input 1 is the per-channel gain (and, for LayerNormalization, input 2 the bias).
_GAIN_NORMS = {"SimplifiedLayerNormalization", "RMSNormalization", "LayerNormalization"}
# Readers of a value that do not depend on its numbers, so rescaling the value leaves them unchanged.
_SHAPE_ONLY_OPS = {"Shape", "Size"}


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


def input_readers(
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


def fold_target(group: list[LinearLayer], all_layers: list[LinearLayer]) -> dict:
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


def apply_fold(
    model: ir.Model, group: list[LinearLayer], target: dict, shift: np.ndarray, scale: np.ndarray,
    explicit: bool = False,
) -> list[str]:
    """Rewrite the graph for x -> (x - z) / s read by ``group`` (every linear reading x: see ``input_readers``),
    folded where ``target`` says; returns the op types added. ``explicit`` inserts a Sub where a shift cannot
    pass the gated product, and Mul/Sub on the input when the target is 'none'; without it such a target is an
    error (the caller should have skipped the group)."""
    if target["kind"] == "none" and not explicit:
        raise ValueError(f"nothing can absorb the scales of {group[0].name}: {target['reason']}")
    all_linears = explicit
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
