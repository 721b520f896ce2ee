"""Emit a W8A8 static linear layer as standard QDQ: onnxruntime fuses it into an integer matmul, NPUs compile it.

Graph contract (the safetensors artifact writer and loader rely on it):

    x -> QuantizeLinear(scale, zp) -> DequantizeLinear(scale, zp) -> MatMul input A   (scalar scale / zero point)
    W_q [K, N] 8-bit initializer -> DequantizeLinear(w_scale [N], w_zp [N], axis=1) -> MatMul input B
    the bias Add (if any) stays float.

Integer format (``INTEGER_FORMAT``): activations uint8 with zero point ``input_offset + 128``; weights int8
symmetric stored as uint8 ``q + 128`` with zero point 128. onnxruntime's CPU kernels for uint8 x uint8 widen to
int16 before multiplying (MLAS ``U8U8`` AVX2 kernel: vpmaddwd over 16-bit operands), so they are exact on any x86
CPU; its default uint8 x int8 kernel multiplies with vpmaddubsw, whose int16 pair sums saturate on CPUs without
VNNI (onnxruntime's own int8 models collapse there). Values are the same as int8: q_u8 - 128 = q_s8.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphq.algorithms.activation_ranges import QMIN
from graphq.algorithms.rtn import QuantizedWeight
from graphq.graph_utils import add_initializer
from graphq.linear_layers import LinearLayer
from graphq.passes.qdq import feed_weight, insert_weight_dequantize

INTEGER_FORMAT = {
    "activations": "uint8, per-tensor asymmetric; zero point = input_offset + 128",
    "weights": "int8 symmetric per output channel, stored as uint8 (q + 128) with zero point 128",
    "onnxruntime_kernel": "U8U8 (exact: 16-bit products, no int16 pair saturation with or without VNNI)",
}


def weight_as_u8(qw: QuantizedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q uint8 [K, N], scale [N], zero point uint8 [N]) of a per-channel 8-bit weight."""
    if qw.bits != 8 or qw.n_groups != 1:
        raise ValueError(f"W8A8 needs an 8-bit per-channel weight, got {qw.bits} bits in {qw.n_groups} groups")
    n = qw.shape[1]
    if qw.symmetric:
        q = (qw.q.astype(np.int16) - QMIN).astype(np.uint8)
        zero_point = np.full(n, -QMIN, dtype=np.uint8)
    else:
        q = qw.q.astype(np.uint8)
        zero_point = qw.zero_points[0].astype(np.uint8)
    return q, qw.scales[0].astype(np.float32), zero_point


def emit_w8a8(model: ir.Model, layer: LinearLayer, qw: QuantizedWeight, input_scale: float, input_offset: int) -> None:
    """Rewrite one linear layer to W8A8 static: QDQ on its input (scalar scale, offset in the int8 convention
    x_q = clip(round(x / scale) + offset, -128, 127)) and DQ on its per-channel 8-bit weight."""
    quantize_input(model, layer, input_scale, input_offset)
    q, weight_scale, weight_zero_point = weight_as_u8(qw)
    weight = insert_weight_dequantize(model, layer, q, weight_scale, weight_zero_point, {"axis": 1})
    feed_weight(model, layer, weight.outputs[0])


def quantize_input(model: ir.Model, layer: LinearLayer, input_scale: float, input_offset: int) -> None:
    """QuantizeLinear -> DequantizeLinear (uint8, scalar scale and zero point ``input_offset + 128``) on the layer's
    input: the static per-tensor activation grid of W8A8 and W4A8 (``grid.fake_quantize`` is its reference)."""
    if not input_scale > 0 or not np.isfinite(input_scale):
        raise ValueError(f"{layer.name}: input scale must be positive and finite, got {input_scale}")
    if not QMIN <= int(input_offset) <= -QMIN - 1:
        raise ValueError(f"{layer.name}: input offset {input_offset} is outside [-128, 127]")
    graph = model.graph
    float_type = layer.dtype.numpy()
    scale = add_initializer(graph, f"{layer.name}.input_scale", np.array(input_scale, dtype=float_type))
    zero_point = add_initializer(graph, f"{layer.name}.input_zero_point", np.array(int(input_offset) - QMIN, dtype=np.uint8))
    quantize = ir.node("QuantizeLinear", inputs=[layer.input, scale, zero_point], name=f"{layer.name}.input_quantize")
    quantize.outputs[0].name = f"{layer.name}.input_quantized"
    dequantize = ir.node("DequantizeLinear", inputs=[quantize.outputs[0], scale, zero_point],
                         name=f"{layer.name}.input_dequantize")
    dequantize.outputs[0].name = f"{layer.name}.input_dequantized"
    dequantize.outputs[0].type = ir.TensorType(layer.dtype)
    graph.insert_before(layer.node, quantize)
    graph.insert_before(layer.node, dequantize)
    layer.node.replace_input_with(0, dequantize.outputs[0])
