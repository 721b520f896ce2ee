"""The passes every ONNX model graphq writes goes through last, quantize's export and load-artifacts alike, so a
rebuilt graph is the one quantize wrote: MatMulNBits' accuracy level, the decoder layers' shared shape arithmetic,
and (when asked) attention fused into GroupQueryAttention."""

from __future__ import annotations

import onnx_ir as ir

from graphq.passes.fuse_attention import attention_spec, fuse_attention
from graphq.passes.matmulnbits import set_accuracy_level
from graphq.passes.shared_shapes import share_layer_shapes


def finish_graph(model: ir.Model, model_config: dict, accuracy_level: int = 0, fuse: bool = False) -> int:
    """Rewrite ``model`` in place (``model_config``: the export's config.json, read only to fuse); returns how many
    layers' attention was fused."""
    if accuracy_level:
        set_accuracy_level(model, accuracy_level)
    share_layer_shapes(model)
    return fuse_attention(model, attention_spec(model_config)) if fuse else 0
