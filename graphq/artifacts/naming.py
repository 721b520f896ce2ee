"""Hugging Face names for the float tensors of an ONNX graph that stay float (embeddings, norms, float linears).

Optimum keeps Hugging Face names for most parameters (``model.embed_tokens.weight``, ``model.norm.weight``, biases)
but linear weights may be anonymous (``onnx::MatMul_123``, stored [in, out]); those are named from the graph model
(graphq.linear_layers) as ``<module>.weight`` in Hugging Face's [out, in] layout. Norm weights are named by the norm
module (``<norm>.weight``) so a norm whose weight was rewritten (AWQ folding, copy-on-write) keeps its name.
The same function names the tensors of the quantized graph (writer) and of the float export (load-artifacts).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphq.linear_layers import LinearLayer
from graphq.passes.weights import set_layer_weight

FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}


def is_hf_name(name: str | None) -> bool:
    return bool(name) and not name.startswith("onnx::") and "/" not in name and not name.endswith(".graphq_copy")


@dataclass
class FloatSource:
    """Where a float tensor lives in the graph: an initializer, or a float linear layer's weight (any layout)."""

    value: ir.Value | None = None
    layer: LinearLayer | None = None

    def array(self) -> np.ndarray:
        if self.layer is not None:
            w = self.layer.weight.const_value.numpy()
            return np.ascontiguousarray(w if self.layer.weight_transposed else w.T)  # [out, in]
        return self.value.const_value.numpy()

    @property
    def shape(self) -> tuple[int, ...]:
        if self.layer is not None:
            return (self.layer.out_features, self.layer.in_features)
        return tuple(self.value.const_value.shape)

    @property
    def dtype(self) -> np.dtype:
        tensor = (self.layer.weight if self.layer is not None else self.value).const_value
        return np.dtype(tensor.dtype.numpy())

    def store(self, model: ir.Model, array: np.ndarray) -> None:
        if self.layer is not None:
            set_layer_weight(model, self.layer, np.asarray(array).T)
        else:
            self.value.const_value = ir.Tensor(np.ascontiguousarray(array), name=self.value.name)


def float_tensor_sources(model: ir.Model, layers: list[LinearLayer], quantized: set[str]) -> dict[str, FloatSource]:
    """HF name -> source of every float tensor not belonging to a quantized layer, in graph initializer order."""
    quantized_prefixes = tuple(f"{name}." for name in quantized)
    named: dict[int, str] = {}
    for layer in layers:
        if layer.norm_weight is not None and layer.producer_name:
            named.setdefault(id(layer.norm_weight), f"{layer.producer_name}.weight")
    sources: dict[str, FloatSource] = {}
    handled: set[int] = set()
    for layer in layers:
        own_name = f"{layer.name}.weight"
        if layer.weight.name == own_name or not is_hf_name(layer.weight.name):
            handled.add(id(layer.weight))  # an anonymous (or own-named) weight is this layer's alone
            if layer.name not in quantized:
                sources[own_name] = FloatSource(layer=layer)
        if layer.bias is not None and not is_hf_name(layer.bias.name):
            handled.add(id(layer.bias))
            if layer.name not in quantized:
                sources[f"{layer.name}.bias"] = FloatSource(value=layer.bias)
    for value in model.graph.initializers.values():
        if id(value) in handled or value.const_value is None or value.dtype not in FLOAT_TYPES:
            continue
        name = named.get(id(value), value.name)
        if not is_hf_name(name) or name.startswith(quantized_prefixes) or name in sources:
            continue
        if name.startswith(("present.", "past_key_values.")):  # KV-cache QDQ parameters: stored as kv_cache_* tensors
            continue
        sources[name] = FloatSource(value=value)
    return sources
