"""The graph model of the network: every quantizable linear layer of an ONNX LLM, named as in Hugging Face.

A linear layer is a MatMul or Gemm whose weight is a constant initializer, possibly reached through
Transpose and/or Cast. Each layer is named by its Hugging Face module path (``model.layers.0.self_attn.q_proj``),
its decoder-layer index, its role, the op that produces its input, and the linears that share that input.
Later passes (smoothing, AWQ, GPTQ, fallback) use this to find what to rewrite and where to fold scales.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

ROLE_BY_MODULE = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "qkv_proj": "qkv",
    "gate_proj": "gate",
    "up_proj": "up",
    "gate_up_proj": "gate_up",
    "down_proj": "down",
    "lm_head": "lm_head",
    "embed_out": "lm_head",
}
NORM_OPS = {"LayerNormalization", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
            "SkipLayerNormalization", "RMSNormalization"}
# Ops a weight may pass through between its initializer and the MatMul without changing its values' meaning.
_WEIGHT_PATH_OPS = {"Transpose", "Cast", "Identity"}
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")


@dataclass
class LinearLayer:
    """One quantizable linear layer: y = x @ W (+ bias), with W seen as [in_features, out_features]."""

    name: str
    role: str
    layer_index: int | None
    node: ir.Node
    weight: ir.Value
    weight_transposed: bool
    in_features: int
    out_features: int
    input: ir.Value
    weight_path: list[ir.Node] = field(default_factory=list)
    bias: ir.Value | None = None
    bias_node: ir.Node | None = None
    producer_kind: str = "other"
    producer_name: str | None = None
    producer_node: ir.Node | None = None
    norm_weight: ir.Value | None = None
    shares_input_with: list[str] = field(default_factory=list)

    @property
    def output(self) -> ir.Value:
        """The layer's output after its bias, if any."""
        return (self.bias_node or self.node).outputs[0]

    @property
    def dtype(self) -> ir.DataType:
        """The float type the layer computes in (the weight's type after any Cast on its way in)."""
        for op in self.weight_path:  # nearest the MatMul first
            if op.op_type == "Cast":
                return ir.DataType(op.attributes["to"].as_int())
        return self.weight.dtype

    def weight_kn(self) -> np.ndarray:
        """The float weight as a [in_features, out_features] array."""
        array = np.asarray(self.weight.const_value.numpy(), dtype=np.float32)
        return array.T if self.weight_transposed else array

    def bias_array(self) -> np.ndarray | None:
        if self.bias is None:
            return None
        return np.asarray(self.bias.const_value.numpy(), dtype=np.float32)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "role": self.role,
            "layer_index": self.layer_index,
            "node": self.node.name,
            "op_type": self.node.op_type,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "has_bias": self.bias is not None,
            "producer_kind": self.producer_kind,
            "producer": self.producer_name,
            "shares_input_with": self.shares_input_with,
        }


def module_path_from_node_name(node_name: str | None) -> str | None:
    """'/model/layers.0/self_attn/q_proj/MatMul' -> 'model.layers.0.self_attn.q_proj'."""
    if not node_name or "/" not in node_name:
        return None
    parts = [p for p in node_name.split("/") if p]
    if len(parts) < 2:
        return None
    return ".".join(parts[:-1])


def module_path_from_initializer(name: str | None) -> str | None:
    """'model.layers.0.self_attn.q_proj.weight' -> 'model.layers.0.self_attn.q_proj'."""
    if name and name.endswith(".weight") and not name.startswith("onnx::"):
        return name[: -len(".weight")]
    return None


def _constant_source(value: ir.Value) -> tuple[ir.Value, list[ir.Node]] | None:
    """Follow a value back through Transpose/Cast/Identity to a constant initializer.

    Exporters deduplicate equal initializers and reach the copies through Identity nodes."""
    path: list[ir.Node] = []
    while value.const_value is None:
        producer = value.producer()
        if producer is None or producer.op_type not in _WEIGHT_PATH_OPS:
            return None
        path.append(producer)
        value = producer.inputs[0]
        if value is None:
            return None
    if not value.is_initializer():
        return None
    return value, path


def _weight_is_transposed(node: ir.Node, path: list[ir.Node]) -> bool:
    transposed = False
    for op in path:
        if op.op_type == "Transpose":
            perm = op.attributes.get("perm")
            if perm is not None and list(perm.as_ints()) != [1, 0]:
                raise ValueError(f"unsupported weight transpose {list(perm.as_ints())} before {node.name}")
            transposed = not transposed
    if node.op_type == "Gemm":
        trans_b = node.attributes.get("transB")
        if trans_b is not None and trans_b.as_int():
            transposed = not transposed
    return transposed


def _single_bias_add(node: ir.Node, out_features: int) -> tuple[ir.Value, ir.Node] | None:
    """An Add right after the MatMul whose other input is a constant [N] bias."""
    uses = list(node.outputs[0].uses())
    if len(uses) != 1 or uses[0].node.op_type != "Add":
        return None
    add = uses[0].node
    other = add.inputs[1 - uses[0].idx]
    source = _constant_source(other) if other is not None else None
    if source is None or any(op.op_type != "Identity" for op in source[1]):
        return None
    if tuple(source[0].const_value.shape) != (out_features,):
        return None
    return source[0], add


def _norm_weight_of(producer: ir.Node) -> ir.Value | None:
    """The constant per-channel weight a norm multiplies by (the Mul's constant input, or the op's scale)."""
    candidates = producer.inputs[1:2] if producer.op_type in NORM_OPS else producer.inputs
    if producer.op_type not in NORM_OPS and producer.op_type != "Mul":
        return None
    for value in candidates:
        source = _constant_source(value) if value is not None else None
        if source is not None and all(op.op_type == "Identity" for op in source[1]):
            if len(source[0].const_value.shape) == 1:
                return source[0]
    return None


def _classify_producer(value: ir.Value, linear_outputs: dict[str, str]) -> tuple[str, str | None, ir.Node | None]:
    """What kind of op produces a linear layer's input: norm, linear, gated_activation, attention, input, other."""
    producer = value.producer()
    if producer is None:
        return "input", None, None
    path = module_path_from_node_name(producer.name)
    last = (path or "").rsplit(".", 1)[-1].lower()
    if producer.op_type in NORM_OPS or "norm" in last or "ln" == last or last.startswith("ln_"):
        return "norm", path, producer
    if value.name in linear_outputs:
        return "linear", linear_outputs[value.name], producer
    if producer.op_type == "Mul" and any(
        v is not None and v.name in linear_outputs for v in producer.inputs
    ):
        return "gated_activation", path, producer
    if path and ("attn" in path or "attention" in path):
        return "attention", path, producer
    return "other", path, producer


def find_linear_layers(model: ir.Model) -> list[LinearLayer]:
    """Every MatMul/Gemm in the main graph whose weight is a constant initializer, in graph order."""
    layers: list[LinearLayer] = []
    used_names: set[str] = set()
    for index, node in enumerate(model.graph):
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
            continue
        source = _constant_source(node.inputs[1])
        if source is None:
            continue
        weight, path = source
        if len(weight.const_value.shape) != 2:
            continue
        if node.op_type == "Gemm":
            trans_a = node.attributes.get("transA")
            if trans_a is not None and trans_a.as_int():
                continue
            alpha = node.attributes.get("alpha")
            beta = node.attributes.get("beta")
            if (alpha is not None and alpha.as_float() != 1.0) or (beta is not None and beta.as_float() != 1.0):
                continue
        transposed = _weight_is_transposed(node, path)
        rows, cols = weight.const_value.shape
        in_features, out_features = (cols, rows) if transposed else (rows, cols)
        name = (
            module_path_from_node_name(node.name)
            or module_path_from_initializer(weight.name)
            or f"linear_{index}"
        )
        if name in used_names:
            name = f"{name}.{node.name or index}"
        used_names.add(name)
        role = ROLE_BY_MODULE.get(name.rsplit(".", 1)[-1], "other")
        match = _LAYER_INDEX.search(name)
        bias = bias_node = None
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = node.inputs[2] if node.inputs[2].const_value is not None else None
        else:
            found = _single_bias_add(node, out_features)
            if found is not None:
                bias, bias_node = found
        layers.append(
            LinearLayer(
                name=name,
                role=role,
                layer_index=int(match.group(1)) if match else None,
                node=node,
                weight=weight,
                weight_transposed=transposed,
                in_features=int(in_features),
                out_features=int(out_features),
                input=node.inputs[0],
                weight_path=path,
                bias=bias,
                bias_node=bias_node,
            )
        )
    _link_inputs(layers)
    return layers


def _link_inputs(layers: list[LinearLayer]) -> None:
    linear_outputs = {layer.output.name: layer.name for layer in layers}
    by_input: dict[str, list[LinearLayer]] = defaultdict(list)
    for layer in layers:
        by_input[layer.input.name].append(layer)
        kind, producer_name, producer = _classify_producer(layer.input, linear_outputs)
        layer.producer_kind, layer.producer_name, layer.producer_node = kind, producer_name, producer
        if kind == "norm" and producer is not None:
            layer.norm_weight = _norm_weight_of(producer)
    for group in by_input.values():
        for layer in group:
            layer.shares_input_with = [other.name for other in group if other is not layer]


def input_groups(layers: list[LinearLayer]) -> list[list[LinearLayer]]:
    """Linears grouped by the input they share (q/k/v, gate/up, ...), in graph order."""
    groups: dict[str, list[LinearLayer]] = {}
    for layer in layers:
        groups.setdefault(layer.input.name, []).append(layer)
    return list(groups.values())
