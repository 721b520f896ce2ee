"""Rewrite constant weights of linear layers and norms in place, copying any initializer that is shared.

Exporters deduplicate equal initializers (two norms with identical weights, biases of different layers), so an
edit meant for one layer must never write through to another: a shared initializer is copied first.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphq.graph_utils import add_initializer
from graphq.linear_layers import LinearLayer


def _writable_initializer(graph: ir.Graph, value: ir.Value, consumer: ir.Node, consumer_input: int) -> ir.Value:
    """``value`` itself if only ``consumer`` reads it, else a fresh copy that ``consumer`` is switched to."""
    if len(value.uses()) <= 1:
        return value
    copy = add_initializer(graph, f"{value.name}.graphq_copy", value.const_value.numpy().copy())
    consumer.replace_input_with(consumer_input, copy)
    return copy


def _store(value: ir.Value, array: np.ndarray) -> None:
    dtype = value.const_value.dtype.numpy()
    value.const_value = ir.Tensor(np.ascontiguousarray(array.astype(dtype)), name=value.name)


def set_layer_weight(model: ir.Model, layer: LinearLayer, weight_kn: np.ndarray) -> None:
    """Replace the layer's float weight (given as [in, out]) keeping its stored layout and dtype."""
    consumer = layer.weight_path[-1] if layer.weight_path else layer.node
    index = 0 if layer.weight_path else 1
    value = _writable_initializer(model.graph, layer.weight, consumer, index)
    _store(value, weight_kn.T if layer.weight_transposed else weight_kn)
    layer.weight = value


def set_layer_bias(model: ir.Model, layer: LinearLayer, bias: np.ndarray) -> None:
    if layer.bias is None:
        raise ValueError(f"{layer.name} has no bias to set")
    consumer = layer.bias_node or layer.node
    index = next(i for i, v in enumerate(consumer.inputs) if v is not None and _reaches(v, layer.bias))
    source = consumer.inputs[index]
    if source is not layer.bias:  # reached through Identity: give this layer its own initializer
        copy = add_initializer(model.graph, f"{layer.name}.bias", bias)
        consumer.replace_input_with(index, copy)
        layer.bias = copy
        return
    value = _writable_initializer(model.graph, layer.bias, consumer, index)
    _store(value, bias)
    layer.bias = value


def _reaches(value: ir.Value, target: ir.Value) -> bool:
    while value is not None:
        if value is target:
            return True
        producer = value.producer()
        if producer is None or producer.op_type != "Identity":
            return False
        value = producer.inputs[0]
    return False


def set_norm_weight(model: ir.Model, layer: LinearLayer, weight: np.ndarray) -> None:
    """Replace the per-channel weight of the norm feeding ``layer`` (and the layers sharing its input)."""
    norm = layer.producer_node
    if layer.norm_weight is None or norm is None:
        raise ValueError(f"{layer.name} has no norm weight to fold into")
    index = next(i for i, v in enumerate(norm.inputs) if v is not None and _reaches(v, layer.norm_weight))
    if norm.inputs[index] is not layer.norm_weight:
        value = add_initializer(model.graph, f"{layer.producer_name}.weight", weight)
        norm.replace_input_with(index, value)
    else:
        value = _writable_initializer(model.graph, layer.norm_weight, norm, index)
        _store(value, weight)
    layer.norm_weight = value


def set_node_constant_input(model: ir.Model, node: ir.Node, index: int, array: np.ndarray, name: str) -> ir.Value:
    """Give ``node`` input ``index`` the constant ``array``: written in place when only this node reads that
    initializer, else (shared, reached through Identity, absent or not constant) a new initializer named ``name``
    (e.g. a LayerNorm bias, which may be missing or deduplicated with another norm's)."""
    current = node.inputs[index] if index < len(node.inputs) else None
    if current is not None and current.is_initializer() and current.const_value is not None and len(current.uses()) <= 1:
        _store(current, array)
        return current
    value = add_initializer(model.graph, name, np.ascontiguousarray(array))
    if index >= len(node.inputs):
        node.resize_inputs(index + 1)
    node.replace_input_with(index, value)
    return value
