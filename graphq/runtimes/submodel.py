"""Run a slice of an ONNX graph in onnxruntime: the nodes needed to compute some values from some others.

Used to run one decoder layer at a time during calibration: the slice is cut from the current (partly quantized)
IR model, so weight edits are seen without re-saving the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from graphq.errors import GraphqError
from graphq.runtimes.ort import session_options


def slice_closure(graph: ir.Graph, outputs: list[str], stop: set[str]) -> tuple[list[ir.Node], list[ir.Value], list[ir.Value]]:
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


# Initializers at least this large reach onnxruntime as user buffers over the model's own arrays (for external data,
# the memory map of the weights file) instead of being serialized into the slice and copied two or three times.
_USER_BUFFER_MIN_BYTES = 1 << 16
_USER_BUFFER_DTYPES = {np.dtype(t) for t in (np.float32, np.float16, np.float64, np.int8, np.uint8, np.int32, np.int64)}


def _user_buffer(value: ir.Value) -> np.ndarray | None:
    """The initializer's data as a numpy array onnxruntime can use in place, or None to serialize it."""
    tensor = value.const_value
    if tensor.nbytes < _USER_BUFFER_MIN_BYTES or tensor.dtype.numpy() not in _USER_BUFFER_DTYPES:
        return None
    return np.ascontiguousarray(tensor.numpy())


def _buffer_reference(value: ir.Value, array: np.ndarray) -> onnx.TensorProto:
    """A data-less initializer entry; SessionOptions.add_external_initializers supplies the data."""
    proto = onnx.TensorProto()
    proto.name = value.name
    proto.dims.extend(array.shape)
    proto.data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    proto.data_location = onnx.TensorProto.EXTERNAL
    for key, entry in (("location", "graphq-user-buffer"), ("offset", "0"), ("length", str(array.nbytes))):
        item = proto.external_data.add()
        item.key, item.value = key, entry
    return proto


def _embedded_tensor(value: ir.Value) -> onnx.TensorProto:
    """The initializer with its data inline: weights mapped from an external file are read in."""
    tensor = value.const_value
    if isinstance(tensor, ir.ExternalTensor):
        tensor = ir.Tensor(tensor.numpy(), name=value.name)
    return ir.serde.serialize_tensor(tensor)


def slice_model_proto(
    model: ir.Model, nodes: list[ir.Node], inputs: list[onnx.ValueInfoProto], outputs: list[str],
    initializers: list[onnx.TensorProto], name: str,
) -> onnx.ModelProto:
    """A model of ``nodes`` (from ``slice_closure``) with the given inputs, initializers and outputs (types left to
    onnxruntime's inference), under the source model's opsets and IR version."""
    output_infos = [onnx.ValueInfoProto(name=output) for output in outputs]
    graph = onnx.helper.make_graph(
        [ir.serde.serialize_node(node) for node in nodes], name, inputs, output_infos, initializer=initializers
    )
    opsets = [onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()]
    return onnx.helper.make_model(graph, opset_imports=opsets, ir_version=model.ir_version)


def _value_info(name: str, dtype: np.dtype, rank: int) -> onnx.ValueInfoProto:
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return onnx.helper.make_tensor_value_info(name, elem, [None] * rank)


@dataclass
class SliceSpec:
    """A slice ready for onnxruntime, picklable (a worker process opens it): the serialized model, whose large
    initializers are references to ``buffers`` (name -> array) instead of inline data."""

    proto: bytes
    buffers: dict[str, np.ndarray]
    input_names: list[str]
    output_names: list[str]


def slice_spec(model: ir.Model, input_specs: dict[str, tuple[np.dtype, int]], outputs: list[str]) -> SliceSpec:
    """The slice of ``model`` that computes ``outputs`` from the named inputs (see SubmodelSession)."""
    graph = model.graph
    nodes, initializers, reached_inputs = slice_closure(graph, outputs, set(input_specs))
    inputs = [_value_info(name, dtype, rank) for name, (dtype, rank) in input_specs.items()]
    inputs += [ir.serde.serialize_value(value) for value in reached_inputs]
    buffers: dict[str, np.ndarray] = {}
    initializer_protos = []
    for value in initializers:
        array = _user_buffer(value)
        if array is None:
            initializer_protos.append(_embedded_tensor(value))
            continue
        initializer_protos.append(_buffer_reference(value, array))
        buffers[value.name] = array
    proto = slice_model_proto(model, nodes, inputs, outputs, initializer_protos, "graphq_slice")
    return SliceSpec(proto.SerializeToString(), buffers, [i.name for i in proto.graph.input], list(outputs))


def share_buffers(specs: list[SliceSpec]) -> list[SliceSpec]:
    """Point equal-named buffers of several slices at one array, so that pickling them sends each once."""
    seen: dict[str, np.ndarray] = {}
    for spec in specs:
        spec.buffers = {name: seen.setdefault(name, array) for name, array in spec.buffers.items()}
    return specs


class SubmodelSession:
    """An onnxruntime session over the slice of ``model`` that computes ``outputs`` from the named inputs.

    ``input_specs`` maps each cut-point value to (dtype, rank); graph inputs the slice reaches are kept as inputs.
    ``SubmodelSession.open(spec)`` opens a ``slice_spec`` (in this or another process).
    """

    def __init__(
        self,
        model: ir.Model,
        input_specs: dict[str, tuple[np.dtype, int]],
        outputs: list[str],
        threads: int | None = None,
    ):
        self._open(slice_spec(model, input_specs, outputs), threads)

    @classmethod
    def open(cls, spec: SliceSpec, threads: int | None = None) -> "SubmodelSession":
        session = cls.__new__(cls)
        session._open(spec, threads)
        return session

    def _open(self, spec: SliceSpec, threads: int | None) -> None:
        options = session_options(threads)
        # The OrtValues must outlive the session, which reads their memory directly.
        self._buffers: list[ort.OrtValue] = [ort.OrtValue.ortvalue_from_numpy(a) for a in spec.buffers.values()]
        if self._buffers:
            options.add_external_initializers(list(spec.buffers), self._buffers)
        self.input_names = list(spec.input_names)
        self.output_names = list(spec.output_names)
        self.session = ort.InferenceSession(spec.proto, options, providers=["CPUExecutionProvider"])

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        names = outputs or self.output_names
        results = self.session.run(names, {name: feeds[name] for name in self.input_names})
        return dict(zip(names, results))
