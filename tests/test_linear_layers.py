"""The graph model: every linear layer of the tiny Llama / Qwen2 exports named and wired as in Hugging Face,
plus synthetic graphs (Gemm with transB and bias, weights through Transpose or Cast) quantized end to end."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphq
from graphq.algorithms.rtn import quantize_rtn
from graphq.config import QuantConfig
from graphq.linear_layers import find_linear_layers, input_groups

HIDDEN, INTERMEDIATE, KV_OUT, N_LAYERS, VOCAB = 64, 96, 2 * 16, 2, 96
# module -> (role, in_features, out_features, producer_kind, producer suffix under model.layers.{i})
EXPECTED = {
    "self_attn.q_proj": ("q", HIDDEN, HIDDEN, "norm", "input_layernorm"),
    "self_attn.k_proj": ("k", HIDDEN, KV_OUT, "norm", "input_layernorm"),
    "self_attn.v_proj": ("v", HIDDEN, KV_OUT, "norm", "input_layernorm"),
    "self_attn.o_proj": ("o", HIDDEN, HIDDEN, "attention", "self_attn"),
    "mlp.gate_proj": ("gate", HIDDEN, INTERMEDIATE, "norm", "post_attention_layernorm"),
    "mlp.up_proj": ("up", HIDDEN, INTERMEDIATE, "norm", "post_attention_layernorm"),
    "mlp.down_proj": ("down", INTERMEDIATE, HIDDEN, "gated_activation", "mlp"),
}


def torch_model(hf_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()


def torch_modules(model) -> dict:
    return dict(model.named_modules())


@pytest.fixture(scope="module")
def graphs(tiny_models):
    """kind -> (ir model, layers by name, torch modules by name)."""
    result = {}
    for kind, paths in tiny_models.items():
        model = ir.load(paths["onnx"] / "model.onnx")
        layers = find_linear_layers(model)
        result[kind] = (model, layers, torch_modules(torch_model(paths["hf"])))
    return result


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_every_decoder_linear_is_found_and_named(graphs, kind):
    _, layers, _ = graphs[kind]
    names = [layer.name for layer in layers]
    expected = [f"model.layers.{i}.{module}" for i in range(N_LAYERS) for module in EXPECTED] + ["lm_head"]
    assert sorted(names) == sorted(expected)
    assert len(set(names)) == len(names)
    for layer in layers:
        if layer.name == "lm_head":
            continue
        index = int(layer.name.split(".")[2])
        module = layer.name.split(".", 3)[3]
        role, in_features, out_features, _, _ = EXPECTED[module]
        assert layer.layer_index == index, layer.name
        assert layer.role == role, layer.name
        assert (layer.in_features, layer.out_features) == (in_features, out_features), layer.name
        assert layer.weight_kn().shape == (in_features, out_features)
        assert layer.node.op_type == "MatMul"
        assert layer.dtype == ir.DataType.FLOAT


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_lm_head(graphs, kind):
    _, layers, modules = graphs[kind]
    (head,) = [layer for layer in layers if layer.role == "lm_head"]
    assert head.name == "lm_head"
    assert head.layer_index is None
    assert (head.in_features, head.out_features) == (HIDDEN, VOCAB)
    assert head.producer_kind == "norm"
    assert head.producer_name == "model.norm"
    np.testing.assert_array_equal(head.norm_weight.const_value.numpy(), modules["model.norm"].weight.detach().numpy())
    np.testing.assert_array_equal(head.weight_kn(), modules["lm_head"].weight.detach().numpy().T)
    if kind == "qwen2":
        # Tied: lm_head reads the embedding table through a Transpose.
        assert head.weight_transposed
        assert [op.op_type for op in head.weight_path] == ["Transpose"]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_embeddings_are_never_linear_layers(graphs, kind):
    model, layers, _ = graphs[kind]
    gathers = [node for node in model.graph if node.op_type == "Gather" and node.inputs[0].is_initializer()]
    assert any("embed_tokens" in node.inputs[0].name for node in gathers)
    layer_nodes = {id(layer.node) for layer in layers}
    assert not any(id(node) in layer_nodes for node in gathers)
    assert all(layer.node.op_type in ("MatMul", "Gemm") for layer in layers)
    assert not any("embed" in layer.name for layer in layers)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_weights_equal_torch_linear_weights_transposed(graphs, kind):
    _, layers, modules = graphs[kind]
    for layer in layers:
        torch_weight = modules[layer.name].weight.detach().numpy()
        np.testing.assert_array_equal(layer.weight_kn(), torch_weight.T, err_msg=layer.name)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_producers_and_shared_inputs(graphs, kind):
    _, layers, modules = graphs[kind]
    by_name = {layer.name: layer for layer in layers}
    for i in range(N_LAYERS):
        prefix = f"model.layers.{i}"
        for module, (_, _, _, kind_expected, producer_suffix) in EXPECTED.items():
            layer = by_name[f"{prefix}.{module}"]
            assert layer.producer_kind == kind_expected, layer.name
            assert layer.producer_name == f"{prefix}.{producer_suffix}", layer.name
            assert layer.producer_node is not None
            if kind_expected == "norm":
                norm = modules[f"{prefix}.{producer_suffix}"]
                np.testing.assert_array_equal(layer.norm_weight.const_value.numpy(), norm.weight.detach().numpy())
            else:
                assert layer.norm_weight is None
        qkv = [f"{prefix}.self_attn.{p}_proj" for p in "qkv"]
        for name in qkv:
            assert sorted(by_name[name].shares_input_with) == sorted(set(qkv) - {name})
        gate, up = f"{prefix}.mlp.gate_proj", f"{prefix}.mlp.up_proj"
        assert by_name[gate].shares_input_with == [up]
        assert by_name[up].shares_input_with == [gate]
        assert by_name[gate].input is by_name[up].input
        assert by_name[f"{prefix}.self_attn.o_proj"].shares_input_with == []
        assert by_name[f"{prefix}.mlp.down_proj"].shares_input_with == []
        # input and post-attention norms are different ops with different weights
        assert by_name[qkv[0]].norm_weight is not by_name[gate].norm_weight
    groups = [sorted(layer.name for layer in group) for group in input_groups(layers)]
    assert sorted(f"model.layers.0.self_attn.{p}_proj" for p in "qkv") in groups
    assert len(groups) == N_LAYERS * 4 + 1  # qkv, o, gate/up, down per layer, and lm_head


def test_qwen2_biases(graphs):
    _, layers, modules = graphs["qwen2"]
    for layer in layers:
        torch_bias = getattr(modules[layer.name], "bias", None)
        if layer.role in ("q", "k", "v"):
            assert torch_bias is not None
            assert layer.bias is not None and layer.bias_node is not None, layer.name
            assert layer.bias_node.op_type == "Add"
            np.testing.assert_array_equal(layer.bias_array(), torch_bias.detach().numpy(), err_msg=layer.name)
            assert layer.output is layer.bias_node.outputs[0]
        else:
            assert torch_bias is None
            assert layer.bias is None and layer.bias_array() is None, layer.name
            assert layer.output is layer.node.outputs[0]


def test_llama_has_no_biases(graphs):
    _, layers, _ = graphs["llama"]
    assert all(layer.bias is None for layer in layers)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_external_data_gives_the_same_layers(graphs, tiny_models, tmp_path, kind):
    model = ir.load(tiny_models[kind]["onnx"] / "model.onnx")
    target = tmp_path / "model.onnx"
    ir.save(model, target, external_data="model.onnx.data")
    assert (tmp_path / "model.onnx.data").stat().st_size > target.stat().st_size  # the weights really moved
    reloaded = find_linear_layers(ir.load(target))
    _, original, _ = graphs[kind]
    assert [layer.describe() for layer in reloaded] == [layer.describe() for layer in original]
    for a, b in zip(reloaded, original):
        np.testing.assert_array_equal(a.weight_kn(), b.weight_kn())
        if b.bias is not None:
            np.testing.assert_array_equal(a.bias_array(), b.bias_array())
        if b.norm_weight is not None:
            np.testing.assert_array_equal(a.norm_weight.const_value.numpy(), b.norm_weight.const_value.numpy())


# ---------------------------------------------------------------- synthetic graphs

K, N = 64, 24


def _synthetic_weight(seed=0):
    return np.random.default_rng(seed).standard_normal((K, N)).astype(np.float32) * 0.1


def _save(graph, folder, opset=18):
    folder.mkdir()
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    onnx.save(model, folder / "model.onnx")
    return folder


def gemm_model(folder):
    """y = Gemm(x, W^T stored [N, K], C) with transB=1 and a constant bias."""
    w_kn = _synthetic_weight(1)
    bias = np.linspace(-1, 1, N).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w_nk", "bias"], ["y"], transB=1, name="/model/layers.0/mlp/up_proj/Gemm")],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", N])],
        [numpy_helper.from_array(np.ascontiguousarray(w_kn.T), "w_nk"), numpy_helper.from_array(bias, "bias")],
    )
    return _save(graph, folder), w_kn, bias


def transpose_model(folder):
    """y = Relu(x @ Transpose(W stored [N, K])): the linear's output feeds another op."""
    w_kn = _synthetic_weight(2)
    graph = helper.make_graph(
        [
            helper.make_node("Transpose", ["w_nk"], ["w_t"], perm=[1, 0], name="/model/layers.3/mlp/down_proj/Transpose"),
            helper.make_node("MatMul", ["x", "w_t"], ["h"], name="/model/layers.3/mlp/down_proj/MatMul"),
            helper.make_node("Relu", ["h"], ["y"], name="/relu"),
        ],
        "transpose",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, N])],
        [numpy_helper.from_array(np.ascontiguousarray(w_kn.T), "w_nk")],
    )
    return _save(graph, folder), w_kn, None


def cast_model(folder):
    """y = x @ Cast(W fp16 -> fp32): the linear's output is the graph output."""
    w_kn = _synthetic_weight(3).astype(np.float16)
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["w16"], ["w32"], to=TensorProto.FLOAT, name="/lm_head/Cast"),
            helper.make_node("MatMul", ["x", "w32"], ["y"], name="/lm_head/MatMul"),
        ],
        "cast",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", N])],
        [numpy_helper.from_array(w_kn, "w16")],
    )
    return _save(graph, folder), w_kn.astype(np.float32), None


SYNTHETIC = {
    "gemm_transB_bias": (gemm_model, "model.layers.0.mlp.up_proj", "up", 0, "Gemm"),
    "transpose": (transpose_model, "model.layers.3.mlp.down_proj", "down", 3, "MatMul"),
    "cast_fp16": (cast_model, "lm_head", "lm_head", None, "MatMul"),
}


@pytest.mark.parametrize("case", list(SYNTHETIC))
def test_synthetic_graph_model(tmp_path, case):
    build, name, role, index, op_type = SYNTHETIC[case]
    folder, w_kn, bias = build(tmp_path / "model")
    (layer,) = find_linear_layers(ir.load(folder / "model.onnx"))
    assert layer.name == name and layer.role == role and layer.layer_index == index
    assert layer.node.op_type == op_type
    assert (layer.in_features, layer.out_features) == (K, N)
    assert layer.dtype == ir.DataType.FLOAT
    assert layer.producer_kind == "input"
    np.testing.assert_array_equal(layer.weight_kn(), w_kn)
    if bias is None:
        assert layer.bias is None
    else:
        np.testing.assert_array_equal(layer.bias_array(), bias)
    if case == "cast_fp16":
        assert layer.weight.dtype == ir.DataType.FLOAT16
        assert [op.op_type for op in layer.weight_path] == ["Cast"]


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
@pytest.mark.parametrize("case", list(SYNTHETIC))
def test_synthetic_graph_quantized_output(tmp_path, case, fmt):
    build, name, *_ = SYNTHETIC[case]
    folder, w_kn, bias = build(tmp_path / "model")
    config = QuantConfig(scheme="w4a16", group_size=32, symmetric=False, format=fmt, quantize_lm_head=True)
    result = graphq.quantize(folder, config, tmp_path / "out", progress=False)
    quantized = onnx.load(result.model_file)
    onnx.checker.check_model(quantized)
    assert [o.name for o in quantized.graph.output] == ["y"]
    # The float weight is gone from the quantized model.
    float_weights = [t.name for t in quantized.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16) and tuple(t.dims) in ((K, N), (N, K))]
    assert float_weights == []
    op_types = [node.op_type for node in quantized.graph.node]
    assert ("MatMulNBits" in op_types) == (fmt == "matmulnbits")
    assert ("DequantizeLinear" in op_types) == (fmt == "qdq")
    assert result.report["layers_quantized"] == 1 and result.report["layers"][0]["name"] == name

    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(str(result.model_file), options, providers=["CPUExecutionProvider"])
    x_shape = [5, 3, K] if case == "transpose" else [5, K]
    x = np.random.default_rng(9).standard_normal(x_shape).astype(np.float32)
    (y,) = session.run(None, {"x": x})

    dequantized = quantize_rtn(w_kn, 4, 32, symmetric=False).dequantize().astype(np.float64)
    expected = x.astype(np.float64) @ dequantized
    if bias is not None:
        expected = expected + bias
    if case == "transpose":
        expected = np.maximum(expected, 0)
    np.testing.assert_allclose(y, expected, atol=2e-5, rtol=0)
    float_output = x.astype(np.float64) @ w_kn.astype(np.float64) + (0 if bias is None else bias)
    if case == "transpose":
        float_output = np.maximum(float_output, 0)
    assert np.abs(float_output - expected).max() > 1e-3  # the check above can tell quantized from float
