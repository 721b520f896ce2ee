"""KV-cache int8: QuantizeLinear/DequantizeLinear on every ``present.<i>.key|value`` with calibrated per-head scales.

Symmetric (offset 0, scale = max |x| / 127 per head), because the consumers of the artifacts (MindIE's and
vllm-ascend's C8 cache, issue 13) apply symmetric per-channel scales: the artifacts repeat each head's scale over
its head_dim channels, so a runtime applying them computes what this graph computes.

The QDQ pair is placed on the value the graph outputs as ``present.*`` (the past concatenated with the new keys or
values), and every consumer of that value (the attention) reads the dequantized copy, so onnxruntime computes with
what an int8 cache would hold. Feeding it back as ``past_key_values`` re-quantizes exactly (same grid), so the
cache stays on the grid across decoding steps. Per head: asymmetric uint8 along axis 1 (heads) of
[batch, heads, seq, head_dim]; offsets are reported in the signed convention (zero point u8 = offset + 128).
"""

from __future__ import annotations

import re

import numpy as np
import onnx_ir as ir

from graphq.algorithms.activation_ranges import QMIN, TINY_SCALE
from graphq.graph_utils import add_initializer, set_opset
from graphq.passes.qdq import QDQ_IR_VERSION, QDQ_OPSET

_PRESENT = re.compile(r"present\.(\d+)\.(key|value)")


def kv_qparams(head_min: np.ndarray, head_max: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per-head symmetric scales (float32) and offsets (all 0, signed convention), with notes for constant heads."""
    scales, notes = [], []
    for head, (lo, hi) in enumerate(zip(head_min, head_max)):
        scale = np.float32(max(abs(float(lo)), abs(float(hi))) / 127.0)
        if not scale > 0 or not np.isfinite(scale):
            scale = np.float32(TINY_SCALE)
            notes.append(f"head {head}: constant values (range [{lo:g}, {hi:g}]): scale set to {TINY_SCALE:g} instead of 0")
        scales.append(scale)
    return np.asarray(scales, dtype=np.float32), np.zeros(len(scales), dtype=np.int64), notes


def emit_kv_qdq(model: ir.Model, output_name: str, scales: np.ndarray, offsets: np.ndarray) -> None:
    """Insert per-head QDQ (axis 1) on the graph output ``output_name``; its consumers read the dequantized copy."""
    graph = model.graph
    index = next(i for i, v in enumerate(graph.outputs) if v.name == output_name)
    value = graph.outputs[index]
    producer = value.producer()
    float_type = value.dtype.numpy() if value.dtype is not None else np.float32
    per_tensor = len(scales) == 1
    scale = add_initializer(graph, f"{output_name}.kv_scale", (scales[0] if per_tensor else scales).astype(float_type))
    zero_points = (offsets - QMIN).astype(np.uint8)
    zero_point = add_initializer(graph, f"{output_name}.kv_zero_point", zero_points[0] if per_tensor else zero_points)
    attributes = {} if per_tensor else {"axis": 1}
    quantize = ir.node("QuantizeLinear", inputs=[value, scale, zero_point], attributes=attributes,
                       name=f"{output_name}.kv_quantize")
    quantize.outputs[0].name = f"{output_name}.kv_quantized"
    dequantize = ir.node("DequantizeLinear", inputs=[quantize.outputs[0], scale, zero_point], attributes=attributes,
                         name=f"{output_name}.kv_dequantize")
    result = dequantize.outputs[0]
    result.shape, result.type = value.shape, value.type
    consumers = [(use.node, use.idx) for use in value.uses() if use.node is not quantize]
    for node, idx in consumers:
        node.replace_input_with(idx, result)
    if producer is not None:
        graph.insert_after(producer, [quantize, dequantize])
    else:
        graph.insert_before(graph[0], [quantize, dequantize])
    value.name = f"{output_name}.float"
    graph.outputs[index] = result
    result.name = output_name
    set_opset(model, "", QDQ_OPSET)
    model.ir_version = max(model.ir_version or 0, QDQ_IR_VERSION)


def quantize_kv_cache(model: ir.Model, kv_stats: dict) -> dict:
    """QDQ every present.* output from its calibrated per-head ranges; returns report["kv_cache"]."""
    layers: dict[str, dict] = {}
    notes: list[str] = []
    for name, stats in kv_stats.items():
        match = _PRESENT.fullmatch(name)
        if match is None or stats.head_min is None:
            continue
        scales, offsets, head_notes = kv_qparams(stats.head_min, stats.head_max)
        emit_kv_qdq(model, name, scales, offsets)
        entry = layers.setdefault(match.group(1), {})
        entry[f"{match.group(2)}_scale"] = [float(s) for s in scales]
        entry[f"{match.group(2)}_offset"] = [int(o) for o in offsets]
        notes.extend(f"{name} {n}" for n in head_notes)
    report = {"type": "int8", "granularity": "per-head", "symmetric": True, "layers": dict(sorted(layers.items(), key=lambda kv: int(kv[0])))}
    if notes:
        report["notes"] = notes
    return report
