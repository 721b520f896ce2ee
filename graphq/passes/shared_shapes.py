"""Share the decoder layers' shape arithmetic: each layer of an exported decoder recomputes the same shapes (of its
own past key, its reshaped query, ...) with dozens of Shape / Gather / Unsqueeze / Concat ops, which onnxruntime
runs at every decode step and which do not shrink with the weights (about half of an int4 decode step's kernel
time on SmolLM2, bench/results/speed.md). A Shape op of layer i whose input has layer 0's counterpart with the same
declared shape (equal static dims, equal named symbolic dims) reads that counterpart instead; the chains that then
compute the same values from the same inputs are merged (onnx_ir's common-subexpression pass) and the rest dropped.
The function is unchanged: equal declared shapes are equal at run time.
"""

from __future__ import annotations

import re

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

_LAYER = re.compile(r"layers\.\d+([./])")
_PRESENT = re.compile(r"^present\.\d+\.")


def _counterpart_name(name: str) -> str | None:
    """The name of layer 0's tensor in the place of ``name`` (optimum's naming), or None outside the layers."""
    renamed = _PRESENT.sub("present.0.", _LAYER.sub(r"layers.0\1", name))
    return renamed if renamed != name else None


def same_declared_shape(a: ir.Value, b: ir.Value) -> bool:
    """Both shapes fully declared and equal: every dim the same int, or the same named symbolic dim."""
    if a.dtype != b.dtype or a.shape is None or b.shape is None or len(a.shape) != len(b.shape):
        return False
    for x, y in zip(a.shape, b.shape):
        if isinstance(x, int) or isinstance(y, int):
            if x != y:
                return False
        elif x.value is None or x.value != y.value:
            return False
    return True


def share_layer_shapes(model: ir.Model) -> int:
    """Rewrite ``model`` in place as the module says; returns how many Shape ops now read layer 0's tensors."""
    graph = model.graph
    produced = {value.name: value for node in graph for value in node.outputs if value.name}
    moved = 0
    for node in graph:
        if node.op_type != "Shape" or node.domain not in ("", "ai.onnx") or not node.inputs or node.inputs[0] is None:
            continue
        value = node.inputs[0]
        name = _counterpart_name(value.name or "")
        target = produced.get(name) if name else None
        if target is None or target is value or not same_declared_shape(value, target):
            continue
        node.replace_input_with(0, target)
        moved += 1
    if moved:
        common_passes.CommonSubexpressionEliminationPass()(model)
        common_passes.RemoveUnusedNodesPass()(model)
    return moved
