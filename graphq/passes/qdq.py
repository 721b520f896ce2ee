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
    graph = model.graph
    signed = qw.symmetric
    float_type = layer.dtype.numpy()
    k = layer.in_features
    inputs = [add_initializer(graph, f"{layer.name}.weight_quantized", integer_array(qw.q, qw.bits, signed))]
    per_channel = qw.n_groups == 1 and qw.group_size >= k
    scales = qw.scales[0] if per_channel else qw.scales
    inputs.append(add_initializer(graph, f"{layer.name}.weight_scale", scales.astype(float_type)))
    if not signed:
        zero_points = qw.zero_points[0] if per_channel else qw.zero_points
        inputs.append(add_initializer(graph, f"{layer.name}.weight_zero_point", integer_array(zero_points, qw.bits, False)))
    attributes = {"axis": 1} if per_channel else {"axis": 0, "block_size": qw.group_size}
    dequantize = ir.node("DequantizeLinear", inputs=inputs, attributes=attributes, name=f"{layer.name}.weight_dequantize")
    dequantize.outputs[0].name = f"{layer.name}.weight_dequantized"
    dequantize.outputs[0].shape = ir.Shape([k, layer.out_features])
    dequantize.outputs[0].type = ir.TensorType(layer.dtype)
    node = layer.node
    graph.insert_before(node, dequantize)
    old_weight_input = node.inputs[1]
    node.replace_input_with(1, dequantize.outputs[0])
    if node.op_type == "Gemm":
        node.attributes["transB"] = ir.AttrInt64("transB", 0)
    remove_dead_weight_path(graph, old_weight_input)
    set_opset(model, "", QDQ_OPSET)
    model.ir_version = max(model.ir_version or 0, QDQ_IR_VERSION)
    return dequantize
