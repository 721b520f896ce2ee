"""The deployment tensors of one codebook (LUT) linear layer, numpy only (no graph, no files).

Like the other layouts (``graphq.artifacts.layout``), tensors are [n, ...] = [out, ...], transposed from graphq's
[K, N] CodebookWeight, under the layer's Hugging Face name:

    ``weight``            uint8 [n, row_bytes]: row n holds output channel n's K codes in K order, packed as
                          ``graphq.passes.lut.pack_codes`` packs a flat buffer (4 bits: two per byte, even index in
                          the low nibble; 3 bits: a 2-bit plane then a 1-bit plane), each row padded to whole
                          words of codes (2 codes for 4 bits, 8 for 3 bits) so rows start on a byte.
    ``weight_lut``        [n, 2^b] (one table per output channel), [n, groups, 2^b] (per group of input channels),
                          or [1, 2^b] / [1, groups, 2^b] (one table shared by all channels: NF4, IQ4_NL, ...);
                          float16 or int8 as the CodebookWeight holds it.
    ``weight_lut_scale``  float16 [n, groups], when the table entries are scaled: w = weight_lut[...] * scale.

K, the bit width and the group size are not recoverable from the tensors alone (padding), so ``from_tensors``
takes them; the artifact description records them.
"""

from __future__ import annotations

import numpy as np

from graphq.algorithms.codebook import CodebookWeight
from graphq.errors import GraphqError
from graphq.passes.lut import PLANES, pack_codes, packed_length, unpack_codes


def to_tensors(cw: CodebookWeight) -> dict[str, np.ndarray]:
    """A CodebookWeight -> {weight, weight_lut[, weight_lut_scale]} in the layout above."""
    k, n = cw.shape
    tensors = {"weight": pack_codes(np.ascontiguousarray(cw.codes.T), cw.bits)}  # [n, row_bytes]
    table = np.transpose(cw.table, (1, 0, 2))  # [T_columns, T_groups, 2^b]
    tensors["weight_lut"] = np.ascontiguousarray(table[:, 0] if table.shape[1] == 1 else table)
    if cw.table_scales is not None:
        tensors["weight_lut_scale"] = np.ascontiguousarray(cw.table_scales.T.astype(np.float16))
    return tensors


def from_tensors(tensors: dict[str, np.ndarray], in_features: int, bits: int, group_size: int) -> CodebookWeight:
    """Inverse of ``to_tensors`` for a layer of ``in_features`` inputs (group_size -1: per output channel)."""
    if bits not in PLANES:
        raise GraphqError(f"codebook artifacts hold 3- or 4-bit codes, not {bits}-bit")
    packed = np.asarray(tensors["weight"], dtype=np.uint8)
    n = packed.shape[0]
    row_bytes = packed_length(in_features, bits)
    if packed.ndim != 2 or packed.shape[1] != row_bytes:
        raise GraphqError(
            f"codebook weight has shape {packed.shape}: expected [{n}, {row_bytes}] for {in_features} inputs at "
            f"{bits} bits"
        )
    codes = unpack_codes(packed, bits, in_features).T
    group_size = in_features if group_size == -1 or group_size >= in_features else group_size
    table = np.asarray(tensors["weight_lut"])
    table = table[:, None] if table.ndim == 2 else table
    scales = tensors.get("weight_lut_scale")
    return CodebookWeight(
        codes=np.ascontiguousarray(codes),
        table=np.ascontiguousarray(np.transpose(table, (1, 0, 2))),
        bits=bits,
        group_size=group_size,
        table_scales=None if scales is None else np.ascontiguousarray(np.asarray(scales).T),
    )
