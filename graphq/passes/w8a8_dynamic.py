"""Emit a W8A8 dynamic per-token linear layer: the activation scale of every token is computed in the graph.

    s_x   = max(ReduceMax(Abs(x), axis=-1, keepdims), tiny) / 127          [..., 1], one scale per token (row)
    x_q   = Cast<uint8>(Clip(Round(x / s_x), -127, 127) + 128)               symmetric int8 stored as uint8
    y     = Cast<float>(MatMulInteger(x_q, W_q, 128, w_zp)) * s_x * s_w      (+ the float bias Add, unchanged)

Standard ONNX ops only. Formats as in the static scheme (``graphq.passes.w8a8``): uint8 activations and uint8
weights (int8 + 128) so onnxruntime runs its exact U8U8 kernel rather than the U8S8 one that saturates without VNNI.
The numpy reference is ``graphq.algorithms.grid.fake_quantize_per_token``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphq.algorithms.grid import MIN_TOKEN_ABSMAX, PER_TOKEN_QMAX, fake_quantize_per_token  # noqa: F401 (the reference)
from graphq.algorithms.rtn import QuantizedWeight
from graphq.graph_utils import NodeBuilder, set_opset
from graphq.linear_layers import LinearLayer
from graphq.passes.qdq import QDQ_IR_VERSION, QDQ_OPSET
from graphq.passes.w8a8 import weight_as_u8
from graphq.passes.matmulnbits import replace_node_output

def per_token_grid(op, const, x: ir.Value, float_type: np.dtype) -> tuple[ir.Value, ir.Value]:
    """The ops of the per-token grid (``grid.fake_quantize_per_token``) on ``x``: the clipped integer codes (still
    float) and each token's step. ``op(op_type, inputs, suffix, **attributes)`` and ``const(suffix, array)`` add the
    caller's nodes and initializers under its own names."""
    amax = op("ReduceMax", [op("Abs", [x], "abs"), const("reduce_axes", np.array([-1], dtype=np.int64))],
              "amax", keepdims=1)
    amax = op("Max", [amax, const("min_amax", np.array(MIN_TOKEN_ABSMAX, dtype=float_type))], "amax_clamped")
    token_scale = op("Div", [amax, const("qmax", np.array(PER_TOKEN_QMAX, dtype=float_type))], "token_scale")
    rounded = op("Round", [op("Div", [x, token_scale], "scaled")], "rounded")
    clipped = op("Clip", [rounded, const("clip_min", np.array(-PER_TOKEN_QMAX, dtype=float_type)),
                          const("clip_max", np.array(PER_TOKEN_QMAX, dtype=float_type))], "clipped")
    return clipped, token_scale


def emit_w8a8_dynamic(model: ir.Model, layer: LinearLayer, qw: QuantizedWeight) -> ir.Value:
    """Rewrite one linear to W8A8 dynamic; returns the value that now carries its output."""
    graph = model.graph
    name = layer.name
    float_type = layer.dtype.numpy()
    q, w_scale, w_zero_point = weight_as_u8(qw)

    builder = NodeBuilder(graph, f"{name}.dynamic_", f"{name}.")
    op, const, nodes = builder.op, builder.const, builder.nodes

    clipped, token_scale = per_token_grid(op, const, layer.input, float_type)
    shifted = op("Add", [clipped, const("u8_shift", np.array(128, dtype=float_type))], "shifted")
    x_q = op("Cast", [shifted], "x_u8", to=ir.DataType.UINT8)
    product = op("MatMulInteger", [x_q, const("weight_quantized", q), const("input_zero_point", np.array(128, dtype=np.uint8)),
                                   const("weight_zero_point", w_zero_point)], "matmul_integer")
    as_float = op("Cast", [product], "to_float", to=layer.dtype)
    scaled = op("Mul", [as_float, token_scale], "times_token_scale")
    result = op("Mul", [scaled, const("weight_scale", w_scale.astype(float_type))], "output")
    old = layer.node
    for node in nodes:
        graph.insert_before(old, node)
    if old.op_type == "Gemm" and len(old.inputs) > 2 and old.inputs[2] is not None:
        result = op("Add", [result, old.inputs[2]], "bias")
        graph.insert_before(old, nodes[-1])
    replace_node_output(graph, old, result)
    set_opset(model, "", QDQ_OPSET)
    model.ir_version = max(model.ir_version or 0, QDQ_IR_VERSION)
    return result
