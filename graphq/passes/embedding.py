"""Quantized token embeddings (``--quantize-embeddings int8|int4``), as msModelSlim's Quant_Embed does.

The table E [vocab, hidden] is quantized per row in blocks of ``group`` along hidden (graphq's RTN grid, on E^T
seen as a [hidden, vocab] weight: the same QuantizedWeight a tied lm_head, whose weight is E^T, gets), then
the Gather is replaced by

- ``--format matmulnbits``: onnxruntime's ``com.microsoft.GatherBlockQuantized`` (int4/uint4 or uint8 data,
  scales [vocab, groups], zero points), which gathers the rows and dequantizes only those;
- ``--format qdq``: standard ``DequantizeLinear`` (opset 21, blocked along axis 1) of the integer table, then
  the original ``Gather``.

A tied lm_head (its weight is the embedding table) follows the embedding's choice: quantize emits it with the
same integers and scales through the weight-only emitters.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir

from graphq.algorithms.rtn import QuantizedWeight, quantize_rtn
from graphq.errors import GraphqError
from graphq.graph_utils import add_initializer, set_opset
from graphq.linear_layers import LinearLayer
from graphq.passes.qdq import QDQ_IR_VERSION, QDQ_OPSET

MS_DOMAIN = "com.microsoft"
BITS = {"int8": 8, "int4": 4}


@dataclass
class Embedding:
    """The token embedding: a Gather of a constant [vocab, hidden] float table. Quacks like a LinearLayer for the
    artifact collector (name, in/out features, dtype, no bias)."""

    name: str  # Hugging Face module, e.g. model.embed_tokens
    node: ir.Node
    weight: ir.Value
    bias = None

    @property
    def in_features(self) -> int:
        return int(self.weight.const_value.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.const_value.shape[0])

    @property
    def dtype(self) -> ir.DataType:
        return self.weight.const_value.dtype


def find_embedding(model: ir.Model) -> Embedding | None:
    """The Gather whose table is a 2-D float initializer named ``<module>.weight`` (optimum keeps HF's name)."""
    for node in model.graph:
        if node.op_type != "Gather" or len(node.inputs) < 2:
            continue
        table = node.inputs[0]
        if table is None or table.const_value is None or len(table.const_value.shape) != 2:
            continue
        if table.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16) or not (table.name or "").endswith(".weight"):
            continue
        axis = node.attributes.get("axis")
        if axis is not None and axis.as_int() != 0:
            continue
        return Embedding(name=table.name[: -len(".weight")], node=node, weight=table)
    return None


def tied_lm_head(layers: list[LinearLayer], embedding: Embedding) -> LinearLayer | None:
    """The lm_head whose weight is the embedding table itself (tie_word_embeddings)."""
    return next((layer for layer in layers if layer.role == "lm_head" and layer.weight is embedding.weight), None)


def quantize_embedding(embedding: Embedding, bits: int, group: int, symmetric: bool) -> QuantizedWeight:
    """RTN on E^T [hidden, vocab]: blocks of ``group`` along hidden, one set of scales per token row."""
    table = embedding.weight.const_value.numpy().astype(np.float32)
    if group != -1 and embedding.in_features % group:
        raise GraphqError(f"--quantize-embeddings needs the hidden size ({embedding.in_features}) to be a multiple of "
                          f"--embedding-group-size {group}")
    return quantize_rtn(np.ascontiguousarray(table.T), bits, group if group != -1 else embedding.in_features, symmetric)


def _unsigned(qw: QuantizedWeight) -> tuple[np.ndarray, np.ndarray]:
    """Row-major unsigned codes [vocab, hidden] and zero points [vocab, groups] (2^(b-1) for symmetric codes)."""
    half = 1 << (qw.bits - 1)
    if qw.symmetric:
        codes = (qw.q.astype(np.int16) + half).astype(np.uint8).T
        zero = np.full((qw.q.shape[1], qw.n_groups), half, dtype=np.uint8)
    else:
        codes, zero = qw.q.astype(np.uint8).T, qw.zero_points.astype(np.uint8).T
    return np.ascontiguousarray(codes), np.ascontiguousarray(zero)


def emit_embedding(model: ir.Model, embedding: Embedding, qw: QuantizedWeight, format: str) -> None:
    """Replace the embedding's float table by its quantized form (see the module docstring); the float
    initializer is dropped once nothing reads it."""
    graph = model.graph
    node = embedding.node
    float_type = embedding.dtype.numpy()
    codes, zero = _unsigned(qw)
    scales = np.ascontiguousarray(qw.scales.T.astype(float_type))  # [vocab, groups]
    storage = ml_dtypes.uint4 if qw.bits == 4 else np.uint8
    block = qw.group_size
    data = add_initializer(graph, f"{embedding.name}.weight_quantized", codes.astype(storage))
    scale = add_initializer(graph, f"{embedding.name}.weight_scale", scales)
    zero_point = add_initializer(graph, f"{embedding.name}.weight_zero_point", zero.astype(storage))
    if format == "matmulnbits":
        gather = ir.node("GatherBlockQuantized", inputs=[data, node.inputs[1], scale, zero_point], domain=MS_DOMAIN,
                         attributes={"gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": qw.bits},
                         name=f"{embedding.name}.gather_block_quantized")
        graph.insert_before(node, gather)
        output = node.outputs[0]
        name = output.name
        gather.outputs[0].shape, gather.outputs[0].type = output.shape, output.type
        output.replace_all_uses_with(gather.outputs[0])
        graph.remove(node, safe=True)
        gather.outputs[0].name = name
        set_opset(model, MS_DOMAIN, 1)
    else:
        dequantize = ir.node("DequantizeLinear", inputs=[data, scale, zero_point],
                             attributes={"axis": 1, "block_size": block}, name=f"{embedding.name}.weight_dequantize")
        dequantize.outputs[0].name = f"{embedding.name}.weight_dequantized"
        dequantize.outputs[0].shape = ir.Shape(list(codes.shape))
        dequantize.outputs[0].type = ir.TensorType(embedding.dtype)
        graph.insert_before(node, dequantize)
        node.replace_input_with(0, dequantize.outputs[0])
        set_opset(model, "", QDQ_OPSET)
    model.ir_version = max(model.ir_version or 0, QDQ_IR_VERSION)
    if not embedding.weight.uses() and embedding.weight.name in graph.initializers:
        del graph.initializers[embedding.weight.name]
