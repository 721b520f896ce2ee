"""Emitters registered by (scheme, format): how one quantized linear is written into the ONNX graph.

``quantize`` and ``load-artifacts`` both look emitters up here, so a model rebuilt from artifacts goes through the
code that wrote it. Each emitter returns the name of the value that now carries the layer's output (after its
bias); ``quantize`` records it in report.json (``quantized_output``) so ``verify`` never has to guess.

Adding an output form: a pass module with the graph rewrite, plus one ``register_emitter`` call below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import onnx_ir as ir

from graphq.errors import GraphqError
from graphq.linear_layers import LinearLayer

# emit(model, layer, weight, details) -> name of the layer's output value; ``details`` carries what the scheme
# needs beyond the weight (W8A8 static: input_scale, input_offset).
EmitFunction = Callable[[ir.Model, LinearLayer, Any, dict], str]


@dataclass(frozen=True)
class Emitter:
    scheme: str
    format: str
    emit: EmitFunction
    description: str


EMITTERS: dict[tuple[str, str], Emitter] = {}


def register_emitter(scheme: str, format: str, emit: EmitFunction, description: str) -> None:
    if (scheme, format) in EMITTERS:
        raise ValueError(f"an emitter for ({scheme}, {format}) is registered twice")
    EMITTERS[(scheme, format)] = Emitter(scheme, format, emit, description)


def emitter_for(scheme: str, format: str) -> Emitter:
    emitter = EMITTERS.get((scheme, format))
    if emitter is None:
        formats = sorted(f for s, f in EMITTERS if s == scheme)
        raise GraphqError(
            f"{scheme} cannot be written as {format}: "
            + (f"use --format {' or '.join(formats)}" if formats else "no emitter is registered for that scheme")
        )
    return emitter


def formats_of(scheme: str) -> list[str]:
    return sorted(f for s, f in EMITTERS if s == scheme)


def _layer_output_name(layer: LinearLayer) -> str:
    """The layer's output value when the emitter kept the node producing it (QDQ keeps the MatMul and bias Add)."""
    return layer.output.name


def _emit_matmulnbits(model: ir.Model, layer: LinearLayer, weight, details: dict) -> str:
    from graphq.passes.matmulnbits import emit_matmulnbits

    kept_bias = layer.bias_node is not None
    node = emit_matmulnbits(model, layer, weight)
    if kept_bias:  # MatMul + Add: the Add (and its output) stays, now fed by MatMulNBits
        return _layer_output_name(layer)
    output = node.outputs[0]
    adds = [use.node for use in output.uses() if use.node.op_type == "Add" and use.node.name == f"{node.name}_bias"]
    return adds[0].outputs[0].name if adds else output.name  # a Gemm's bias became an Add after MatMulNBits


def _emit_qdq_weight(model: ir.Model, layer: LinearLayer, weight, details: dict) -> str:
    from graphq.passes.qdq import emit_dequantize_linear

    emit_dequantize_linear(model, layer, weight)
    return _layer_output_name(layer)


def _emit_w8a8_static(model: ir.Model, layer: LinearLayer, weight, details: dict) -> str:
    from graphq.passes.w8a8 import emit_w8a8

    emit_w8a8(model, layer, weight, details["input_scale"], details["input_offset"])
    return _layer_output_name(layer)


def _emit_w8a8_dynamic(model: ir.Model, layer: LinearLayer, weight, details: dict) -> str:
    from graphq.passes.w8a8_dynamic import emit_w8a8_dynamic

    kept_bias = layer.bias_node is not None
    output = emit_w8a8_dynamic(model, layer, weight)
    return _layer_output_name(layer) if kept_bias else output.name


def _emit_lut(model: ir.Model, layer: LinearLayer, weight, details: dict) -> str:
    from graphq.passes.lut import emit_lut

    kept_bias = layer.bias_node is not None
    gemm_bias = layer.node.op_type == "Gemm" and len(layer.node.inputs) > 2 and layer.node.inputs[2] is not None
    graph_output = layer.output.name if layer.output in model.graph.outputs else None
    emit_lut(model, layer, weight)
    if graph_output is not None:  # the new output took the graph output's name
        return graph_output
    if kept_bias:  # MatMul + Add: the Add stays, now fed by the LUT MatMul
        return _layer_output_name(layer)
    return f"{layer.name}.lut_bias" if gemm_bias else f"{layer.name}.lut_matmul"


for _scheme in ("w4a16", "w8a16"):
    register_emitter(_scheme, "matmulnbits", _emit_matmulnbits, "com.microsoft.MatMulNBits (onnxruntime CPU/GPU)")
    register_emitter(_scheme, "qdq", _emit_qdq_weight, "DequantizeLinear on the integer weight, then MatMul")
register_emitter("w8a8", "qdq", _emit_w8a8_static, "QuantizeLinear/DequantizeLinear on the input, DequantizeLinear on the weight")
# W8A8S (sparse lowbit) runs as W8A8: its int8 weight holds the zeros and the 4-bit levels.
register_emitter("w8a8s", "qdq", _emit_w8a8_static, "as w8a8: the pruned, lowbit int8 weight through DequantizeLinear")
register_emitter("w8a8-dynamic", "qdq", _emit_w8a8_dynamic, "per-token scales in the graph, then MatMulInteger")


def _emit_w4a8_static(model: ir.Model, layer: LinearLayer, weight, details: dict) -> str:
    from graphq.passes.w4a8 import emit_w4a8

    emit_w4a8(model, layer, weight, details["input_scale"], details["input_offset"])
    return _layer_output_name(layer)


def _emit_w4a8_dynamic(model: ir.Model, layer: LinearLayer, weight, details: dict) -> str:
    from graphq.passes.w4a8 import emit_w4a8_dynamic

    emit_w4a8_dynamic(model, layer, weight)
    return _layer_output_name(layer)


register_emitter("w4a8", "qdq", _emit_w4a8_static,
                 "QuantizeLinear/DequantizeLinear on the input, blocked int4 DequantizeLinear on the weight")
register_emitter("w4a8-dynamic", "qdq", _emit_w4a8_dynamic,
                 "per-token int8 grid on the input in the graph, blocked int4 DequantizeLinear on the weight")
for _scheme in ("w4a16", "w3a16"):
    register_emitter(_scheme, "lut", _emit_lut, "codebook weights: Gather from packed codes and tables, then MatMul")
