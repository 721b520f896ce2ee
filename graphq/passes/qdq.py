"""Emit standard ONNX DequantizeLinear (opset 21, blocked, int4/uint4/int8/uint8) for a quantized weight.

The integer weight is stored [K, N] and dequantized along axis 0 in blocks of the group size (per-axis along
N for per-channel), feeding the original MatMul. NPU toolchains and onnxruntime fuse DQ + MatMul.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from graphq.algorithms.rtn import QuantizedWeight
from graphq.graph_utils import add_initializer, remove_dead_weight_path, set_opset

from graphq.linear_layers import LinearLayer

QDQ_OPSET = 21
# int4/uint4 tensors need IR version 10.
QDQ_IR_VERSION = 10

_INTEGER_TYPES = {
    (4, True): ml_dtypes.int4,
    (4, False): ml_dtypes.uint4,
    (8, True): np.int8,
    (8, False): np.uint8,
}


def integer_array(values: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    return values.astype(_INTEGER_TYPES[(bits, signed)])


def emit_dequantize_linear(model: ir.Model, layer: LinearLayer, qw: QuantizedWeight) -> ir.Node:
    """Feed the layer's MatMul/Gemm from DequantizeLinear(integer weight) instead of the float weight."""
    signed = qw.symmetric
    per_channel = qw.n_groups == 1 and qw.group_size >= layer.in_features
    zero_points = None
    if not signed:
        zero_points = integer_array(qw.zero_points[0] if per_channel else qw.zero_points, qw.bits, False)
    dequantize = insert_weight_dequantize(
        model,
        layer,
        integer_array(qw.q, qw.bits, signed),
        qw.scales[0] if per_channel else qw.scales,
        zero_points,
        {"axis": 1} if per_channel else {"axis": 0, "block_size": qw.group_size},
    )
    feed_weight(model, layer, dequantize.outputs[0])
    return dequantize


def insert_weight_dequantize(
    model: ir.Model, layer: LinearLayer, q: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None,
    attributes: dict,
) -> ir.Node:
    """A DequantizeLinear of the integer weight [K, N] (named after the layer), inserted before the layer's node."""
    graph = model.graph
    inputs = [
        add_initializer(graph, f"{layer.name}.weight_quantized", q),
        add_initializer(graph, f"{layer.name}.weight_scale", scales.astype(layer.dtype.numpy())),
    ]
    if zero_points is not None:
        inputs.append(add_initializer(graph, f"{layer.name}.weight_zero_point", zero_points))
    dequantize = ir.node("DequantizeLinear", inputs=inputs, attributes=attributes, name=f"{layer.name}.weight_dequantize")
    dequantize.outputs[0].name = f"{layer.name}.weight_dequantized"
    dequantize.outputs[0].shape = ir.Shape([layer.in_features, layer.out_features])
    dequantize.outputs[0].type = ir.TensorType(layer.dtype)
    graph.insert_before(layer.node, dequantize)
    return dequantize


def feed_weight(model: ir.Model, layer: LinearLayer, weight_kn: ir.Value) -> None:
    """Make ``weight_kn`` ([K, N]) the layer's weight input, drop the old weight path, declare the QDQ opset."""
    node = layer.node
    old_weight_input = node.inputs[1]
    node.replace_input_with(1, weight_kn)
    if node.op_type == "Gemm":
        node.attributes["transB"] = ir.AttrInt64("transB", 0)
    remove_dead_weight_path(model.graph, old_weight_input)
    set_opset(model, "", QDQ_OPSET)
    model.ir_version = max(model.ir_version or 0, QDQ_IR_VERSION)
