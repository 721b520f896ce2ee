"""Partition an exported decoder into per-layer regions so calibration can run one decoder layer at a time.

A region is the set of nodes of one decoder layer (named ``.../layers.{i}/...`` by the exporter). Values flowing
between regions are of two kinds: the *stream* (the residual hidden state, downstream of the token embedding, which
changes as earlier layers are quantized) and *static* values (attention mask, rotary tables) that depend only on
the model inputs. Running region i needs the stream entering it, recomputed with layers < i quantized, plus static
values, which a small prefix model computes from the graph inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from graphq.errors import GraphqError
from graphq.linear_layers import _LAYER_INDEX, LinearLayer, module_path_from_node_name


def node_layer_index(node: ir.Node) -> int | None:
    path = module_path_from_node_name(node.name)
    if path is None:
        return None
    match = _LAYER_INDEX.search(path)
    return int(match.group(1)) if match else None


@dataclass
class Region:
    """One decoder layer (index >= 0) or the tail after the last layer (index None)."""

    index: int | None
    nodes: list[ir.Node]
    stream_inputs: list[str] = field(default_factory=list)
    static_inputs: list[str] = field(default_factory=list)
    stream_outputs: list[str] = field(default_factory=list)


def _is_constant(value: ir.Value) -> bool:
    if value.const_value is not None:
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant"


def stream_values(graph: ir.Graph, layers: list[LinearLayer]) -> set[str]:
    """Names of every value downstream of the first decoder layer's input (the residual stream and its products)."""
    first = min((l for l in layers if l.layer_index is not None), key=lambda l: l.layer_index, default=None)
    if first is None:
        raise GraphqError("no decoder layers found (no linear layer names contain 'layers.N')")
    # The root of the stream is the value entering the first layer's region from outside it.
    seeds = []
    for node in graph:
        if node_layer_index(node) == first.layer_index:
            for value in node.inputs:
                if value is None or _is_constant(value) or value.is_graph_input():
                    continue
                producer = value.producer()
                if producer is not None and node_layer_index(producer) is None and _depends_on_embedding(value):
                    seeds.append(value)
    if not seeds:
        raise GraphqError(f"cannot find the hidden state entering decoder layer {first.layer_index}")
    return _downstream_names(seeds)


def _depends_on_embedding(value: ir.Value) -> bool:
    """Whether a value is computed from a Gather over a large constant table (the token embedding)."""
    seen = set()
    todo = [value]
    while todo:
        current = todo.pop()
        producer = current.producer()
        if producer is None or id(producer) in seen:
            continue
        seen.add(id(producer))
        if producer.op_type in ("Gather", "GatherBlockQuantized") and _is_constant_table(producer.inputs[0]):
            return True
        todo.extend(v for v in producer.inputs if v is not None)
    return False


def _is_constant_table(value: ir.Value | None) -> bool:
    """A 2-D constant, or one dequantized in the graph (an embedding quantized by --quantize-embeddings)."""
    if value is None:
        return False
    if value.const_value is not None:
        return len(value.const_value.shape) == 2
    producer = value.producer()
    return producer is not None and producer.op_type == "DequantizeLinear" and _is_constant_table(producer.inputs[0])


def _downstream_names(values: list[ir.Value]) -> set[str]:
    """Names of the given values and of every value computed from them."""
    todo = list(values)
    seen: set[str] = set()
    while todo:
        value = todo.pop()
        if value.name in seen:
            continue
        seen.add(value.name)
        for use in value.uses():
            todo.extend(out for out in use.node.outputs if out is not None)
    return seen


def _downstream_of_layers(graph: ir.Graph) -> set[str]:
    """Names of values computed from any decoder layer's outputs."""
    return _downstream_names([out for node in graph if node_layer_index(node) is not None for out in node.outputs])


def decoder_regions(model: ir.Model, layers: list[LinearLayer]) -> list[Region]:
    """Regions for every decoder layer in order, then the tail (final norm, lm_head) if it holds linear layers."""
    graph = model.graph
    stream = stream_values(graph, layers)
    after_layers = _downstream_of_layers(graph)
    by_index: dict[int | None, list[ir.Node]] = {}
    for node in graph:
        index = node_layer_index(node)
        # Outside the layers, only what comes after them (final norm, lm_head) forms the tail; what comes before
        # (embedding, masks) is computed from the graph inputs by the prefix.
        if index is not None or any(out.name in after_layers for out in node.outputs):
            by_index.setdefault(index, []).append(node)
    indices = sorted(i for i in by_index if i is not None)
    if indices != list(range(len(indices))):
        raise GraphqError(f"decoder layer indices are not contiguous: {indices[:5]}...")
    regions = [Region(i, by_index[i]) for i in indices]
    if any(l.layer_index is None for l in layers) and None in by_index:
        regions.append(Region(None, by_index[None]))
    graph_outputs = {v.name for v in graph.outputs}
    for region in regions:
        members = {id(n) for n in region.nodes}
        stream_in, static_in, stream_out = [], [], []
        for node in region.nodes:
            for value in node.inputs:
                if value is None or _is_constant(value) or value.is_graph_input():
                    continue
                producer = value.producer()
                if producer is not None and id(producer) in members:
                    continue
                target = stream_in if value.name in stream else static_in
                if value.name not in target:
                    target.append(value.name)
            for out in node.outputs:
                if out.name in stream and out.name not in graph_outputs:
                    if any(id(use.node) not in members for use in out.uses()):
                        stream_out.append(out.name)
        region.stream_inputs, region.static_inputs, region.stream_outputs = stream_in, static_in, stream_out
    return regions


def prefix_values(regions: list[Region]) -> list[str]:
    """Values the regions need that no region produces: computed once per sample from the graph inputs."""
    produced = {name for region in regions for name in region.stream_outputs}
    needed = []
    for region in regions:
        for name in region.static_inputs + region.stream_inputs:
            if name not in produced and name not in needed:
                needed.append(name)
    return needed
