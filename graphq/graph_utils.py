"""Small graph-plumbing helpers shared by the passes (onnx_ir)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray | ir.TensorProtocol) -> ir.Value:
    """Register a new constant initializer under a name not yet used in the graph."""
    name = unique_initializer_name(graph, name)
    tensor = array if isinstance(array, ir.TensorProtocol) else ir.Tensor(np.ascontiguousarray(array), name=name)
    tensor.name = name
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


class NodeBuilder:
    """Nodes and initializers a pass adds for one layer, named ``<node_prefix><suffix>`` and
    ``<const_prefix><suffix>``; ``nodes`` keeps them in creation order for inserting into the graph."""

    def __init__(self, graph: ir.Graph, node_prefix: str, const_prefix: str):
        self.graph, self.node_prefix, self.const_prefix = graph, node_prefix, const_prefix
        self.nodes: list[ir.Node] = []

    def const(self, suffix: str, array: np.ndarray) -> ir.Value:
        return add_initializer(self.graph, f"{self.const_prefix}{suffix}", array)

    def op(self, op_type: str, inputs: list[ir.Value], suffix: str, **attributes) -> ir.Value:
        node = ir.node(op_type, inputs=inputs, attributes=attributes, name=f"{self.node_prefix}{suffix}")
        node.outputs[0].name = f"{self.node_prefix}{suffix}"
        self.nodes.append(node)
        return node.outputs[0]


def unique_initializer_name(graph: ir.Graph, name: str) -> str:
    if name not in graph.initializers:
        return name
    suffix = 1
    while f"{name}_{suffix}" in graph.initializers:
        suffix += 1
    return f"{name}_{suffix}"


def remove_dead_weight_path(graph: ir.Graph, value: ir.Value) -> None:
    """Remove the chain of unused nodes and initializers that used to feed ``value`` (Transpose/Cast/initializer)."""
    while value is not None and not value.uses() and value not in graph.outputs:
        producer = value.producer()
        if producer is None:
            if value.is_initializer() and value.name in graph.initializers:
                del graph.initializers[value.name]
                # LinearLayer objects still point at this value; dropping the data lets a replaced weight be freed.
                value.const_value = None
            return
        if any(out.uses() or out in graph.outputs for out in producer.outputs):
            return
        upstream = producer.inputs[0] if producer.inputs else None
        graph.remove(producer, safe=True)
        value = upstream


def set_opset(model: ir.Model, domain: str, version: int) -> None:
    """Declare at least ``version`` of ``domain`` in the model's opset imports."""
    current = model.opset_imports.get(domain)
    if current is None or current < version:
        model.opset_imports[domain] = version
        model.graph.opset_imports[domain] = version

