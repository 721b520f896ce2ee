"""Fuse each decoder layer's attention into onnxruntime's GroupQueryAttention contrib op (rotary embedding inside).

An exported decoder computes attention from about a hundred small ops per layer: reshapes and transposes of the
query, key and value, the rotary embedding, the concatenation with the past key and value, repeat_kv, the causal
mask, the two products and the softmax. At batch-1 decode most of a step's kernels are these ops, and they do not
shrink with the weights (bench/results/speed.md). One GroupQueryAttention node per layer computes the same thing:
it takes the projections' outputs [batch, sequence, heads * head_dim] and the past key / value [batch, kv_heads,
past, head_dim] and returns the attention output and the present key / value, so the model keeps its inputs and
outputs.

What changes for a caller: positions come from the attention mask (each row's count of ones), not from
``position_ids``, which is then unused; so batches must be right-padded (or unpadded), as onnxruntime-genai's models
are. Only the graph plumbing lives here: the rotary tables come from the model's config (``attention_spec``).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from graphq.errors import GraphqError

CONTRIB_DOMAIN = "com.microsoft"
_HEADS_FIRST = (0, 2, 1, 3)  # [batch, seq, heads, dim] <-> [batch, heads, seq, dim]
_SEARCH_LIMIT = 64  # nodes visited when walking between a layer's anchors (its attention is ~100 ops in all)
_SHAPED_BY_LATER_INPUTS = {"Reshape", "Expand", "Slice", "Unsqueeze", "Squeeze", "Tile", "Pad", "Gather"}
_FLOAT_TYPES = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16}


@dataclass(frozen=True)
class AttentionSpec:
    """What GroupQueryAttention needs to know that the graph does not say plainly."""

    num_heads: int
    kv_heads: int
    head_dim: int
    scale: float
    rotary_cos: np.ndarray  # [max_positions, head_dim / 2], attention scaling (YaRN etc.) folded in
    rotary_sin: np.ndarray


@dataclass
class LayerAttention:
    """One layer's attention as the values around it: what GroupQueryAttention reads and what it replaces."""

    index: int
    query: ir.Value
    key: ir.Value
    value: ir.Value
    past_key: ir.Value
    past_value: ir.Value
    present_key: ir.Value
    present_value: ir.Value
    output: ir.Value


def attention_spec(config: dict) -> AttentionSpec:
    """The spec of a Hugging Face decoder from its config.json, rotary tables computed by transformers' own rope
    initialisers (default, linear, llama3, yarn, ...)."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    model_type = config.get("model_type")
    if not model_type:
        raise GraphqError("attention fusion needs the export's config.json (model_type, heads, rope): restore it")
    hf_config = AutoConfig.for_model(**config)
    num_heads = getattr(hf_config, "num_attention_heads", None)
    if not num_heads:
        raise GraphqError(f"attention fusion: config.json of a '{model_type}' names no num_attention_heads")
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    # Attention variants GroupQueryAttention would compute differently (or the scale the graph applies is not
    # 1/sqrt(head_dim)): refused rather than fused into a different function.
    sliding = getattr(hf_config, "sliding_window", None) and getattr(hf_config, "use_sliding_window", True)
    sliding = sliding or "sliding_attention" in (getattr(hf_config, "layer_types", None) or [])
    for key, present in (("a sliding window", sliding),
                         ("attn_logit_softcapping", getattr(hf_config, "attn_logit_softcapping", None)),
                         ("attention_multiplier", getattr(hf_config, "attention_multiplier", None))):
        if present:
            raise GraphqError(f"attention fusion does not handle {key} ({model_type}): quantize without --fuse-attention")
    rope = getattr(hf_config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "dynamic" or rope_type not in ROPE_INIT_FUNCTIONS:
        raise GraphqError(f"attention fusion does not handle rope type '{rope_type}': quantize without --fuse-attention")
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    inv_freq = np.asarray(inv_freq, dtype=np.float64)
    if 2 * inv_freq.size != head_dim:
        raise GraphqError(f"attention fusion does not handle partial rotary embeddings ({2 * inv_freq.size} of "
                          f"{head_dim} dims): quantize without --fuse-attention")
    positions = np.arange(hf_config.max_position_embeddings, dtype=np.float64)
    angles = np.outer(positions, inv_freq)
    query_scale = getattr(hf_config, "query_pre_attn_scalar", None) or head_dim
    return AttentionSpec(num_heads=num_heads, kv_heads=kv_heads, head_dim=head_dim,
                         scale=1.0 / math.sqrt(query_scale),
                         rotary_cos=(np.cos(angles) * attention_factor).astype(np.float32),
                         rotary_sin=(np.sin(angles) * attention_factor).astype(np.float32))


def _int_list(node: ir.Node, name: str) -> tuple[int, ...] | None:
    attribute = node.attributes.get(name)
    return tuple(attribute.as_ints()) if attribute is not None else None


def _is_heads_transpose(node: ir.Node | None) -> bool:
    return node is not None and node.op_type == "Transpose" and _int_list(node, "perm") == _HEADS_FIRST


def _split_heads_source(node: ir.Node) -> ir.Value | None:
    """For Transpose(Reshape(x)) splitting [batch, seq, heads * dim] into heads: x, else None."""
    reshape = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
    if reshape is None or reshape.op_type != "Reshape" or reshape.inputs[0] is None:
        return None
    source = reshape.inputs[0]
    return source if source.shape is None or len(source.shape) == 3 else None


def _data_inputs(node: ir.Node) -> list[ir.Value]:
    """The inputs carrying tensor data, not shapes, indices or axes."""
    if node.op_type == "Shape":
        return []
    inputs = node.inputs[:1] if node.op_type in _SHAPED_BY_LATER_INPUTS else node.inputs
    return [value for value in inputs if value is not None]


def _walk(start: ir.Value, forward: bool, stop) -> list[ir.Node]:
    """Nodes where ``stop(node)`` holds, reached from ``start`` along data inputs without passing through one
    (bounded search)."""
    found, seen, queue = [], set(), deque([start])
    while queue and len(seen) < _SEARCH_LIMIT:
        value = queue.popleft()
        if forward:
            nodes = [use.node for use in value.uses() if any(v is value for v in _data_inputs(use.node))]
        else:
            nodes = [value.producer()]
        for node in nodes:
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if stop(node):
                found.append(node)
                continue
            queue.extend(node.outputs if forward else _data_inputs(node))
    return found


def _is_activation_matmul(node: ir.Node) -> bool:
    return node.op_type == "MatMul" and all(v is not None and v.const_value is None for v in node.inputs)


def _one(nodes: list[ir.Node], what: str, index: int) -> ir.Node:
    if len(nodes) != 1:
        raise GraphqError(f"attention fusion: layer {index} has {len(nodes)} {what} where one was expected (an "
                          "attention this pass does not recognise): quantize without --fuse-attention")
    return nodes[0]


def _concat_with_past(present: ir.Value, past: ir.Value, index: int) -> ir.Value:
    concat = present.producer()
    if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 2 or concat.inputs[0] is not past:
        raise GraphqError(f"attention fusion: layer {index}'s {present.name} is not the past concatenated with the "
                          "new tokens (a quantized KV cache?): quantize without --fuse-attention")
    return concat.inputs[1]


def find_layer_attention(graph: ir.Graph) -> list[LayerAttention]:
    """Every layer's attention, matched from its past / present cache (optimum's ``past_key_values.{i}.key`` and
    ``present.{i}.key`` names) to the projections around it."""
    inputs = {value.name: value for value in graph.inputs}
    outputs = {value.name: value for value in graph.outputs}
    layers = []
    index = 0
    while f"present.{index}.key" in outputs:
        past_key, past_value = inputs.get(f"past_key_values.{index}.key"), inputs.get(f"past_key_values.{index}.value")
        present_key, present_value = outputs[f"present.{index}.key"], outputs.get(f"present.{index}.value")
        if past_key is None or past_value is None or present_value is None:
            raise GraphqError(f"attention fusion: layer {index} lacks its past/present key and value: export the model "
                              "with its KV cache (optimum's text-generation-with-past)")
        new_value = _concat_with_past(present_value, past_value, index)
        value_split = new_value.producer()
        value = _split_heads_source(value_split) if _is_heads_transpose(value_split) else None
        rotated_key = _concat_with_past(present_key, past_key, index)
        key_split = _one(_walk(rotated_key, False, _is_heads_transpose), "key head splits", index)
        if key_split is rotated_key.producer():
            raise GraphqError(f"attention fusion: layer {index}'s key has no rotary embedding: quantize without "
                              "--fuse-attention")
        key = _split_heads_source(key_split)
        scores = _one(_walk(present_key, True, _is_activation_matmul), "query-key products", index)
        query_split = _one(_walk(scores.inputs[0], False, _is_heads_transpose), "query head splits", index)
        query = _split_heads_source(query_split)
        mixed = _one(_walk(present_value, True, _is_activation_matmul), "attention-value products", index)
        merge = [use.node for use in mixed.outputs[0].uses()]
        reshape = [use.node for use in merge[0].outputs[0].uses()] if len(merge) == 1 else []
        if None in (value, key, query) or len(merge) != 1 or not _is_heads_transpose(merge[0]) or len(reshape) != 1 \
                or reshape[0].op_type != "Reshape" or not _walk(mixed.inputs[0], False, lambda n: n is scores):
            raise GraphqError(f"attention fusion: layer {index}'s attention is not the plain grouped-query pattern "
                              "(projections split into heads, rotary, softmax; q/k norms are not): quantize without "
                              "--fuse-attention")
        layers.append(LayerAttention(index, query, key, value, past_key, past_value, present_key, present_value,
                                     reshape[0].outputs[0]))
        index += 1
    return layers


def _attention_mask(graph: ir.Graph) -> ir.Value:
    mask = next((value for value in graph.inputs if value.name == "attention_mask"), None)
    if mask is None:
        raise GraphqError("attention fusion needs the model's attention_mask input: export it with one")
    return mask


def _sequence_lengths(graph: ir.Graph) -> tuple[ir.Value, ir.Value]:
    """seqlens_k (each row's last position, int32 [batch]) and total_sequence_length (int32 [1]) from the mask."""
    mask = _attention_mask(graph)
    tape = ir.tape.Tape()
    axes = tape.initializer(ir.tensor(np.array([1], dtype=np.int64), name="graphq.attention.sum_axes"))
    one = tape.initializer(ir.tensor(np.array(1, dtype=np.int64), name="graphq.attention.one"))
    counts = tape.op("ReduceSum", [mask, axes], attributes={"keepdims": 0})
    last = tape.op("Sub", [counts, one])
    seqlens = tape.op("Cast", [last], attributes={"to": ir.DataType.INT32},
                      output=ir.Value(name="graphq.attention.seqlens_k"))
    total = tape.op("Cast", [tape.op("Shape", [mask], attributes={"start": 1, "end": 2})],
                    attributes={"to": ir.DataType.INT32}, output=ir.Value(name="graphq.attention.total_length"))
    graph.extend(tape.nodes)
    for initializer in tape.initializers:
        graph.register_initializer(initializer)
    return seqlens, total


def check_fusable(model: ir.Model, config: dict) -> None:
    """Refuse up front, before a long quantization, a model whose attention this pass cannot fuse."""
    attention_spec(config)
    if not find_layer_attention(model.graph):
        raise GraphqError("attention fusion needs the KV cache outputs (present.N.key): export the model with past "
                          "key/values (optimum's text-generation-with-past)")
    _attention_mask(model.graph)


def fuse_attention(model: ir.Model, spec: AttentionSpec) -> int:
    """Rewrite ``model`` in place as the module says; returns how many layers were fused (0: nothing matched)."""
    graph = model.graph
    layers = find_layer_attention(graph)
    if not layers:
        return 0
    dtype = layers[0].past_key.dtype
    if dtype not in _FLOAT_TYPES:
        raise GraphqError(f"attention fusion: the KV cache is {dtype}, GroupQueryAttention takes float or float16")
    seqlens, total = _sequence_lengths(graph)
    cos = ir.Value(name="graphq.attention.cos_cache",
                   const_value=ir.tensor(spec.rotary_cos.astype(_FLOAT_TYPES[dtype]), name="graphq.attention.cos_cache"))
    sin = ir.Value(name="graphq.attention.sin_cache",
                   const_value=ir.tensor(spec.rotary_sin.astype(_FLOAT_TYPES[dtype]), name="graphq.attention.sin_cache"))
    graph.register_initializer(cos)
    graph.register_initializer(sin)
    model.opset_imports.setdefault(CONTRIB_DOMAIN, 1)
    position = {id(value): i for i, value in enumerate(graph.outputs)}
    for layer in layers:
        node = ir.Node(
            CONTRIB_DOMAIN, "GroupQueryAttention",
            [layer.query, layer.key, layer.value, layer.past_key, layer.past_value, seqlens, total, cos, sin],
            attributes=[ir.AttrInt64("num_heads", spec.num_heads), ir.AttrInt64("kv_num_heads", spec.kv_heads),
                        ir.AttrFloat32("scale", spec.scale), ir.AttrInt64("do_rotary", 1),
                        ir.AttrInt64("rotary_interleaved", 0)],
            num_outputs=3, name=f"/model/layers.{layer.index}/self_attn/GroupQueryAttention")
        graph.append(node)
        attended, present_key, present_value = node.outputs
        attended.name = f"/model/layers.{layer.index}/self_attn/GroupQueryAttention_output_0"
        ir.convenience.replace_all_uses_with(layer.output, attended)
        for old, new in ((layer.present_key, present_key), (layer.present_value, present_value)):
            name, old.name = old.name, f"{old.name}.unfused"
            new.name, new.type, new.shape = name, old.type, old.shape
            graph.outputs[position[id(old)]] = new
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.TopologicalSortPass()(model)
    return len(layers)
