"""Per-linear quantization switches: one graph that runs any single linear (or any set) quantized, chosen at run time.

For sensitivity analysis every linear is quantized alone and the model run end to end; building and loading one
model per linear would cost a session each. Instead each linear's weight input becomes
``Where(gate, W_fake_quantized, W)`` and, for schemes that quantize activations, its input becomes
``Where(gate, FQ(x), x)`` (on that linear's edge only, so a q_proj switch leaves k/v's input alone), where ``gate``
is a boolean graph input named ``graphq_gate.<linear name>``. Where selects, so an open gate reproduces the float
model bit for bit and a closed one the fake-quantized layer exactly.

FQ(x): per tensor, QuantizeLinear + DequantizeLinear with a given scale / zero point; per token, the W8A8 dynamic
grid in standard ops, built by the W8A8 dynamic emitter's ``per_token_grid``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphq.algorithms.grid import ActivationRange
from graphq.graph_utils import NodeBuilder, add_initializer
from graphq.linear_layers import LinearLayer
from graphq.passes.w8a8_dynamic import per_token_grid

GATE_PREFIX = "graphq_gate."


@dataclass
class Switch:
    """What closing one linear's gate does: its fake-quantized weight [K, N], and optionally its input quantizer
    (an ``ActivationRange`` for per-tensor static, the string "per_token" for dynamic)."""

    weight_kn: np.ndarray
    activation: ActivationRange | str | None = None


def gate_name(layer: LinearLayer) -> str:
    return f"{GATE_PREFIX}{layer.name}"


def add_quant_switches(model: ir.Model, switches: dict[str, Switch], layers: list[LinearLayer]) -> list[str]:
    """Give every linear in ``switches`` (by name) a gate; returns the gate input names in ``layers`` order."""
    graph = model.graph
    gates = []
    for layer in layers:
        switch = switches.get(layer.name)
        if switch is None:
            continue
        gate = ir.Value(name=gate_name(layer), type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
        graph.inputs.append(gate)
        gates.append(gate.name)
        _switch_weight(model, layer, gate, switch.weight_kn)
        if switch.activation is not None:
            _switch_input(model, layer, gate, switch.activation)
    return gates


def _switch_weight(model: ir.Model, layer: LinearLayer, gate: ir.Value, weight_kn: np.ndarray) -> None:
    consumer = layer.weight_path[-1] if layer.weight_path else layer.node
    index = 0 if layer.weight_path else 1
    float_weight = consumer.inputs[index]
    stored = weight_kn.T if layer.weight_transposed else weight_kn
    quantized = add_initializer(model.graph, f"{layer.name}.weight_fake_quantized",
                                np.ascontiguousarray(stored.astype(layer.dtype.numpy())))
    select = ir.node("Where", inputs=[gate, quantized, float_weight], name=f"{layer.name}.weight_switch")
    select.outputs[0].name = f"{layer.name}.weight_switched"
    model.graph.insert_before(consumer, select)
    consumer.replace_input_with(index, select.outputs[0])


def _switch_input(model: ir.Model, layer: LinearLayer, gate: ir.Value, activation: ActivationRange | str) -> None:
    graph = model.graph
    x = layer.input
    dtype = layer.dtype.numpy()
    builder = NodeBuilder(graph, f"{layer.name}.input_switch_", f"{layer.name}.input_switch_")
    op, const, nodes = builder.op, builder.const, builder.nodes

    if isinstance(activation, ActivationRange):
        scale = const("scale", np.array(activation.scale, dtype=dtype))
        zero_point = const("zero_point", np.array(activation.zero_point_u8, dtype=np.uint8))
        quantized = op("QuantizeLinear", [x, scale, zero_point], "quantize")
        fake = op("DequantizeLinear", [quantized, scale, zero_point], "dequantize")
    elif activation == "per_token":
        clipped, step = per_token_grid(op, const, x, dtype)
        fake = op("Mul", [clipped, step], "dequantized")
    else:
        raise ValueError(f"unknown activation quantizer {activation!r}")
    selected = op("Where", [gate, fake, x], "select")
    for node in nodes:
        graph.insert_before(layer.node, node)
    layer.node.replace_input_with(0, selected)
