"""Emit onnxruntime's com.microsoft.MatMulNBits for a quantized linear layer (fast weight-only kernels on CPU)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphq.algorithms.rtn import QuantizedWeight
from graphq.graph_utils import add_initializer, remove_dead_weight_path, set_opset
from graphq.linear_layers import LinearLayer

MS_DOMAIN = "com.microsoft"


def kernel_block_size(qw: QuantizedWeight) -> int:
    """The MatMulNBits block for a weight's groups: a power of two >= 16.

    Groups that already are such blocks are used as they are. A per-channel group (all K rows) is split into the
    largest such block (up to 128) that divides K, each block repeating the channel's scale: exact, and it avoids
    padding K up to a power of two, which would store up to twice the weight. Only when no power of two divides K
    is the single group padded into one block.
    """
    group = qw.group_size
    if group >= 16 and not group & (group - 1):
        return group
    k = qw.shape[0]
    for block in (128, 64, 32, 16):
        if k % block == 0:
            return block
    return 1 << (k - 1).bit_length()


def pack_weight(qw: QuantizedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """Lay out a quantized [K, N] weight as MatMulNBits wants it.

    B: uint8 [N, n_blocks, block_size * bits / 8], each block's values in K order, two 4-bit values per byte
    with the even index in the low nibble. scales: [N * n_blocks]. zero_points: uint8, per row of N, packed
    like B and padded to whole bytes; omitted for symmetric weights, whose unsigned offset (2^(bits-1)) is the
    kernel's default zero point.
    """
    k, n = qw.shape
    bits = qw.bits
    block = kernel_block_size(qw)
    n_blocks = -(-k // block)
    offset = 1 << (bits - 1) if qw.symmetric else 0
    unsigned = (qw.q.astype(np.int16) + offset).astype(np.uint8)  # [K, N]
    padded = np.zeros((n_blocks * block, n), dtype=np.uint8)
    padded[:k] = unsigned
    per_column = padded.T.reshape(n, n_blocks, block)
    if bits == 4:
        packed = (per_column[..., 0::2] | (per_column[..., 1::2] << 4)).astype(np.uint8)
    else:
        packed = per_column
    # Blocks and groups coincide, except a per-channel group spread over several blocks repeats its parameters.
    repeat = n_blocks if qw.n_groups == 1 else 1
    scales = np.ascontiguousarray(np.repeat(qw.scales, repeat, axis=0).T).reshape(-1)
    zero_points = None
    if not qw.symmetric:
        zp = np.ascontiguousarray(np.repeat(qw.zero_points, repeat, axis=0).T)  # [N, n_blocks]
        if bits == 4:
            if n_blocks % 2:
                zp = np.concatenate([zp, np.zeros((n, 1), dtype=np.uint8)], axis=1)
            zp = (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)
        zero_points = zp.reshape(-1)
    return packed, scales, zero_points, block


def emit_matmulnbits(model: ir.Model, layer: LinearLayer, qw: QuantizedWeight, accuracy_level: int = 0) -> ir.Node:
    """Replace the layer's MatMul/Gemm with a MatMulNBits over the packed integer weight."""
    graph = model.graph
    packed, scales, zero_points, block = pack_weight(qw)
    float_type = layer.dtype.numpy()
    inputs = [
        layer.input,
        add_initializer(graph, f"{layer.name}.weight_packed", packed),
        add_initializer(graph, f"{layer.name}.weight_scale", scales.astype(float_type)),
    ]
    if zero_points is not None:
        inputs.append(add_initializer(graph, f"{layer.name}.weight_zero_point", zero_points))
    new_node = ir.node(
        "MatMulNBits",
        inputs=inputs,
        attributes={
            "K": layer.in_features,
            "N": layer.out_features,
            "bits": qw.bits,
            "block_size": block,
            "accuracy_level": accuracy_level,
        },
        domain=MS_DOMAIN,
        name=f"{layer.node.name or layer.name}_Q{qw.bits}",
    )
    new_node.outputs[0].name = f"{layer.name}.quantized_output"
    old = layer.node
    graph.insert_before(old, new_node)
    result = new_node.outputs[0]
    if old.op_type == "Gemm" and len(old.inputs) > 2 and old.inputs[2] is not None:
        add = ir.node("Add", inputs=[result, old.inputs[2]], name=f"{new_node.name}_bias")
        graph.insert_after(new_node, add)
        result = add.outputs[0]
    replace_node_output(graph, old, result)
    set_opset(model, MS_DOMAIN, 1)
    return new_node


def replace_node_output(graph: ir.Graph, old: ir.Node, new_value: ir.Value) -> None:
    old_output = old.outputs[0]
    new_value.shape = old_output.shape
    new_value.type = old_output.type
    if old_output in graph.outputs:  # before replace_all_uses_with, which refuses a graph output
        index = list(graph.outputs).index(old_output)
        name = old_output.name
        graph.outputs[index] = new_value
        old_output.name = None
        new_value.name = name
    ir.convenience.replace_all_uses_with(old_output, new_value)
    weight_input = old.inputs[1]
    graph.remove(old, safe=True)
    remove_dead_weight_path(graph, weight_input)


def set_accuracy_level(model: ir.Model, level: int) -> int:
    """Set ``accuracy_level`` on every MatMulNBits node (the export stage's choice, so the weights stage's checkpoint
    serves any level); returns how many nodes there are."""
    nodes = [node for node in ir.traversal.RecursiveGraphIterator(model.graph) if node.op_type == "MatMulNBits"]
    for node in nodes:
        node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", level)
    return len(nodes)
