"""Run a slice of an ONNX graph in onnxruntime: the nodes needed to compute some values from some others.

Used to run one decoder layer at a time during calibration: the slice is cut from the current (partly quantized)
IR model, so weight edits are seen without re-saving the whole model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from graphq.errors import GraphqError
from graphq.runtimes.ort import session_options

# Above this, protobuf's 2 GB limit is near: slices are written with external data instead of passed as bytes.
_IN_MEMORY_LIMIT_BYTES = 1 << 30


def _closure(graph: ir.Graph, outputs: list[str], stop: set[str]) -> tuple[list[ir.Node], list[ir.Value], list[ir.Value]]:
    """Nodes (in graph order), initializers and graph inputs needed to compute ``outputs`` given the ``stop`` values."""
    values = {}
    for node in graph:
        for out in node.outputs:
            values[out.name] = out
    for value in list(graph.inputs) + list(graph.initializers.values()):
        values[value.name] = value
    needed_nodes: set[int] = set()
    initializers: dict[str, ir.Value] = {}
    graph_inputs: dict[str, ir.Value] = {}
    todo = []
    for name in outputs:
        if name not in values:
            raise GraphqError(f"value {name} is not in the graph")
        todo.append(values[name])
    seen: set[str] = set()
    while todo:
        value = todo.pop()
        if value.name in seen or value.name in stop:
            continue
        seen.add(value.name)
        if value.is_initializer():
            initializers[value.name] = value
            continue
        if value.is_graph_input():
            graph_inputs[value.name] = value
            continue
        producer = value.producer()
        if producer is None:
            raise GraphqError(f"value {value.name} has no producer")
        if id(producer) not in needed_nodes:
            needed_nodes.add(id(producer))
            todo.extend(v for v in producer.inputs if v is not None)
            for attr in producer.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    raise GraphqError(f"node {producer.name} holds a subgraph; slicing across it is not supported")
    nodes = [node for node in graph if id(node) in needed_nodes]
    return nodes, list(initializers.values()), list(graph_inputs.values())


def _embedded_tensor(value: ir.Value) -> onnx.TensorProto:
    """The initializer with its data inline: weights mapped from an external file are read in."""
    tensor = value.const_value
    if isinstance(tensor, ir.ExternalTensor):
        tensor = ir.Tensor(tensor.numpy(), name=value.name)
    return ir.serde.serialize_tensor(tensor)


def _value_info(name: str, dtype: np.dtype, rank: int) -> onnx.ValueInfoProto:
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return onnx.helper.make_tensor_value_info(name, elem, [None] * rank)


class SubmodelSession:
    """An onnxruntime session over the slice of ``model`` that computes ``outputs`` from the named inputs.

    ``input_specs`` maps each cut-point value to (dtype, rank); graph inputs the slice reaches are kept as inputs.
    """

    def __init__(
        self,
        model: ir.Model,
        input_specs: dict[str, tuple[np.dtype, int]],
        outputs: list[str],
        threads: int | None = None,
    ):
        graph = model.graph
        nodes, initializers, reached_inputs = _closure(graph, outputs, set(input_specs))
        inputs = [_value_info(name, dtype, rank) for name, (dtype, rank) in input_specs.items()]
        inputs += [ir.serde.serialize_value(value) for value in reached_inputs]
        output_infos = []
        for name in outputs:
            info = onnx.ValueInfoProto()
            info.name = name
            output_infos.append(info)
        graph_proto = onnx.helper.make_graph(
            [ir.serde.serialize_node(node) for node in nodes],
            "graphq_slice",
            inputs,
            output_infos,
            initializer=[_embedded_tensor(value) for value in initializers],
        )
        opsets = [onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()]
        proto = onnx.helper.make_model(graph_proto, opset_imports=opsets, ir_version=model.ir_version)
        self.input_names = [i.name for i in proto.graph.input]
        self.output_names = list(outputs)
        options = session_options(threads)
        size = sum(value.const_value.nbytes for value in initializers)
        if size < _IN_MEMORY_LIMIT_BYTES:
            self.session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        else:
            with tempfile.TemporaryDirectory(prefix="graphq-slice-") as scratch:
                path = Path(scratch) / "slice.onnx"
                onnx.save_model(proto, str(path), save_as_external_data=True, location="slice.onnx.data")
                self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        names = outputs or self.output_names
        results = self.session.run(names, {name: feeds[name] for name in self.input_names})
        return dict(zip(names, results))
