"""Emit a codebook (lookup-table) linear layer in standard ONNX ops that onnxruntime's CPU provider runs.

    codes  = unpack(weight_codes)                                  BitShift + Mod on uint8, [K, N]
    table  = Cast<float>(weight_lut) * Cast<float>(weight_lut_scale)     [n_groups, N, 2^b], flattened
    index  = codes + row_offset[K, 1] + column_offset[1, N]         (g(k) * N + n) * 2^b + code
    W      = Gather(table, index)                                   [K, N]
    y      = MatMul(x, W)                                          (+ the bias, as before)

Why not a contrib kernel: onnxruntime 1.32's weight-only kernels all dequantize affinely. MatMulNBits computes
(q - zero_point) * scale (its ``g_idx`` input, deprecated, only maps K rows to blocks); GatherBlockQuantized is an
embedding Gather with the same affine rule; MatMulBnb4 hard-codes the FP4 / NF4 table (absmax per block of a
flattened [N, K] weight) and so cannot hold a learned table; MatMulBlockQuantizedFp4Weight is NVFP4 on CUDA.
None takes a table per output channel, so the table is applied with a Gather, which every runtime has. (NF4 with
groups along K could later go to MatMulBnb4, whose kernel keeps the weight packed at run time; here one emitter
serves every table.)

Storage, the only weight initializers: ``weight_codes`` uint8, the row-major [K, N] codes bit-packed into a 1-D
buffer (``pack_codes``): 4-bit codes two per byte, the even index in the low nibble; 3-bit codes as two bit
planes, the low 2 bits four per byte followed by the high bit eight per byte (3 bits per weight exactly, padded to
a multiple of 8 codes). ``weight_lut`` is the table as the CodebookWeight holds it (float16 or int8),
``weight_lut_scale`` its float16 scales, plus int64 offsets of K + N entries. No float copy of the weight is stored.

Unpacking uses Mod rather than BitwiseAnd so models exported below opset 18 need no opset change (which would
change the meaning of their other ops); every op used exists since opset 13. onnxruntime folds the all-constant
unpack-and-Gather subgraph when it creates the session, so it then multiplies float weights: the file is small,
the session's memory and speed are those of the float model.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphq.algorithms.codebook import CodebookWeight
from graphq.errors import GraphqError
from graphq.graph_utils import NodeBuilder
from graphq.linear_layers import LinearLayer
from graphq.passes.matmulnbits import replace_node_output

# Bit planes a code is stored in, low bits first: (bits of the plane, codes per byte).
PLANES = {4: ((4, 2),), 3: ((2, 4), (1, 8))}
MIN_OPSET = 13  # Mod on integers (10), Gather, BitShift (11), Reshape / Slice with tensor inputs


def packed_length(count: int, bits: int) -> int:
    """Bytes that ``count`` codes take in ``pack_codes``' layout."""
    padded = _padded_count(count, bits)
    return sum(padded // per_byte for _, per_byte in PLANES[bits])


def _padded_count(count: int, bits: int) -> int:
    multiple = max(per_byte for _, per_byte in PLANES[bits])
    return -(-count // multiple) * multiple


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes -> uint8 bytes along the last axis, plane after plane (see the module docstring); leading axes stay.

    The emitter packs the flattened row-major [K, N] codes (one 1-D buffer); artifacts pack each output row."""
    if bits not in PLANES:
        raise GraphqError(f"no code packing for {bits} bits (supported: {sorted(PLANES)})")
    codes = np.asarray(codes, dtype=np.uint8)
    if codes.size and int(codes.max()) >= 1 << bits:
        raise GraphqError(f"a code is {int(codes.max())}, too large for {bits} bits")
    lead, count = codes.shape[:-1], codes.shape[-1]
    padded = np.zeros((*lead, _padded_count(count, bits)), dtype=np.uint8)
    padded[..., :count] = codes
    planes, low = [], 0
    for plane_bits, per_byte in PLANES[bits]:
        fields = ((padded >> low) & ((1 << plane_bits) - 1)).reshape(*lead, -1, per_byte)
        byte = np.zeros(fields.shape[:-1], dtype=np.uint8)
        for i in range(per_byte):
            byte |= (fields[..., i] << (i * plane_bits)).astype(np.uint8)
        planes.append(byte)
        low += plane_bits
    return np.concatenate(planes, axis=-1)


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack_codes``: the first ``count`` codes of each row of the last axis, uint8 (the numpy twin
    of the emitted graph)."""
    if bits not in PLANES:
        raise GraphqError(f"no code packing for {bits} bits (supported: {sorted(PLANES)})")
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.shape[-1] != packed_length(count, bits):
        raise GraphqError(f"{packed.shape[-1]} packed bytes do not hold {count} {bits}-bit codes")
    lead, padded = packed.shape[:-1], _padded_count(count, bits)
    codes = np.zeros((*lead, padded), dtype=np.uint8)
    start, low = 0, 0
    for plane_bits, per_byte in PLANES[bits]:
        plane = packed[..., start : start + padded // per_byte]
        shifts = np.arange(per_byte, dtype=np.uint8) * plane_bits
        fields = (plane[..., None] >> shifts) % np.uint8(1 << plane_bits)
        codes += (fields.reshape(*lead, padded) << low).astype(np.uint8)
        start += padded // per_byte
        low += plane_bits
    return codes[..., :count]


def emit_lut(model: ir.Model, layer: LinearLayer, cw: CodebookWeight) -> None:
    """Replace the layer's MatMul/Gemm by a MatMul over the weight gathered from its packed codes and tables."""
    graph = model.graph
    k, n = cw.shape
    if (k, n) != (layer.in_features, layer.out_features):
        raise GraphqError(f"{layer.name}: codebook weight is {k}x{n}, the layer is {layer.in_features}x{layer.out_features}")
    opset = model.opset_imports.get("", 0)
    if opset < MIN_OPSET:
        raise GraphqError(f"{layer.name}: LUT weights need opset >= {MIN_OPSET}, the model has {opset}: re-export it")
    table_groups, table_columns, levels = cw.table.shape
    if cw.table_scales is None and (table_groups, table_columns) != (cw.n_groups, n):
        raise GraphqError(f"{layer.name}: a shared table {cw.table.shape} needs per-group scales")
    name = layer.name
    builder = NodeBuilder(graph, f"{name}.lut_", f"{name}.")
    op, const, nodes = builder.op, builder.const, builder.nodes

    def int64s(*values: int) -> np.ndarray:
        return np.array(values, dtype=np.int64)

    # Codes: each bit plane's bytes -> [bytes, per_byte] fields -> flat, weighted by the plane's position.
    packed = const("weight_codes", pack_codes(cw.codes.reshape(-1), cw.bits))
    padded = _padded_count(k * n, cw.bits)
    codes, start, low = None, 0, 0
    for plane_bits, per_byte in PLANES[cw.bits]:
        plane_bytes = padded // per_byte
        plane = packed
        if len(PLANES[cw.bits]) > 1:
            plane = op("Slice", [packed, const(f"plane{low}_start", int64s(start)),
                                 const(f"plane{low}_end", int64s(start + plane_bytes))], f"plane{low}")
        column = op("Reshape", [plane, const("as_column", int64s(-1, 1))], f"plane{low}_column")
        shifted = op("BitShift", [column, const(f"plane{low}_shifts", np.arange(per_byte, dtype=np.uint8) * plane_bits)],
                     f"plane{low}_shifted", direction="RIGHT")
        fields = op("Mod", [shifted, const(f"plane{low}_modulus", np.array(1 << plane_bits, dtype=np.uint8))],
                    f"plane{low}_fields")
        flat = op("Reshape", [op("Cast", [fields], f"plane{low}_int64", to=ir.DataType.INT64),
                              const("as_flat", int64s(-1))], f"plane{low}_flat")
        if low:
            flat = op("Mul", [flat, const(f"plane{low}_weight", np.array(1 << low, dtype=np.int64))], f"plane{low}_high")
        codes = flat if codes is None else op("Add", [codes, flat], f"codes_to_bit{low + plane_bits}")
        start += plane_bytes
        low += plane_bits
    if padded != k * n:
        codes = op("Slice", [codes, const("codes_start", int64s(0)), const("codes_end", int64s(k * n))], "codes_unpadded")
    codes = op("Reshape", [codes, const("weight_shape", int64s(k, n))], "codes")

    # Index into the flattened [n_groups, N, levels] table: ((g(k) * N) + n) * levels + code.
    index = op("Add", [codes, const("weight_lut_column_offset", (np.arange(n, dtype=np.int64) * levels)[None, :])],
               "index_in_group")
    if cw.n_groups > 1:
        row_offset = (cw.group_of_row() * n * levels)[:, None]
        index = op("Add", [index, const("weight_lut_row_offset", row_offset)], "index")

    table = op("Cast", [const("weight_lut", cw.table)], "table_float", to=ir.DataType.FLOAT)
    if cw.table_scales is not None:
        scales = cw.table_scales.astype(np.float16)[..., None]  # [n_groups, N, 1] broadcasts over the entries
        table = op("Mul", [table, op("Cast", [const("weight_lut_scale", scales)], "scale_float", to=ir.DataType.FLOAT)],
                   "table_scaled")
    flat_table = op("Reshape", [table, const("as_flat", int64s(-1))], "table_flat")
    weight = op("Gather", [flat_table, index], "weight", axis=0)
    if layer.dtype != ir.DataType.FLOAT:
        weight = op("Cast", [weight], "weight_cast", to=layer.dtype)
    weight.shape = ir.Shape([k, n])
    weight.type = ir.TensorType(layer.dtype)

    old = layer.node
    result = op("MatMul", [layer.input, weight], "matmul")
    if old.op_type == "Gemm" and len(old.inputs) > 2 and old.inputs[2] is not None:
        result = op("Add", [result, old.inputs[2]], "bias")
    graph.insert_before(old, nodes)
    replace_node_output(graph, old, result)
