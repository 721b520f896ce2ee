"""Emit W4A8 linears as standard QDQ: int4 per-group weights through blocked DequantizeLinear, int8 activations.

Static (``w4a8``), the activation grid of W8A8 static (``graphq.passes.w8a8.quantize_input``):

    x -> QuantizeLinear(scale, zp) -> DequantizeLinear(scale, zp) -> MatMul input A       (uint8, per tensor)
    W_q [K, N] int4 / uint4 -> DequantizeLinear(scales [K/g, N], zero points, axis 0, block_size g) -> MatMul B

Dynamic (``w4a8-dynamic``), the per-token grid of W8A8 dynamic (``graphq.passes.w8a8_dynamic.per_token_grid``):

    x -> ReduceMax(Abs) / 127 = s_x per token -> Clip(Round(x / s_x), -127, 127) * s_x -> MatMul input A
    the weight as above; the bias Add stays float.

The weight half is the W4A16 QDQ emitter's (``graphq.passes.qdq.emit_dequantize_linear``). onnxruntime's CPU
provider fuses the blocked int4 DequantizeLinear + MatMul into MatMulNBits (graphq's sessions run it with float
activations, accuracy level 0); no integer kernel multiplies int4 x int8 per group, so the activation codes are
dequantized before the product: the graph computes fake_quantize(x) @ dequantize(W) in float32, which is what an
NPU's W4A8 kernel computes up to its accumulation order. References: ``grid.fake_quantize`` /
``grid.fake_quantize_per_token`` and ``QuantizedWeight.dequantize``.
"""

from __future__ import annotations

import onnx_ir as ir

from graphq.algorithms.rtn import QuantizedWeight
from graphq.graph_utils import NodeBuilder
from graphq.linear_layers import LinearLayer
from graphq.passes.qdq import emit_dequantize_linear
from graphq.passes.w8a8 import quantize_input
from graphq.passes.w8a8_dynamic import per_token_grid


def _check_weight(layer: LinearLayer, qw: QuantizedWeight) -> None:
    if qw.bits != 4:
        raise ValueError(f"{layer.name}: W4A8 needs a 4-bit weight, got {qw.bits} bits")


def emit_w4a8(model: ir.Model, layer: LinearLayer, qw: QuantizedWeight, input_scale: float, input_offset: int) -> None:
    """Static W4A8: per-tensor QDQ on the input, blocked int4 DequantizeLinear on the weight."""
    _check_weight(layer, qw)
    quantize_input(model, layer, input_scale, input_offset)
    emit_dequantize_linear(model, layer, qw)


def emit_w4a8_dynamic(model: ir.Model, layer: LinearLayer, qw: QuantizedWeight) -> None:
    """Dynamic W4A8: the per-token int8 grid on the input (fake-quantized in the graph), int4 weight DQ."""
    _check_weight(layer, qw)
    graph = model.graph
    name = layer.name
    float_type = layer.dtype.numpy()
    builder = NodeBuilder(graph, f"{name}.dynamic_", f"{name}.")
    op, const, nodes = builder.op, builder.const, builder.nodes

    clipped, token_scale = per_token_grid(op, const, layer.input, float_type)
    dequantized = op("Mul", [clipped, token_scale], "input_dequantized")
    dequantized.type = ir.TensorType(layer.dtype)
    for node in nodes:
        graph.insert_before(layer.node, node)
    layer.node.replace_input_with(0, dequantized)
    emit_dequantize_linear(model, layer, qw)
