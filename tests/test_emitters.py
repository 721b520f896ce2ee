"""Every registered emitter on a hand-built one-linear graph (torch-free): onnxruntime computes what the grid's
numpy reference says, and the emitter names the value that carries the layer's output."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphq.algorithms.grid import fake_quantize_per_token, range_to_qparams, fake_quantize
from graphq.algorithms.rtn import quantize_rtn
from graphq.errors import GraphqError
from graphq.linear_layers import find_linear_layers
from graphq.passes.emitters import EMITTERS, emitter_for
from graphq.runtimes.ort import session_options

K, N, T = 64, 48, 10


def one_linear_model(kind: str, rng: np.random.Generator) -> tuple[ir.Model, np.ndarray, np.ndarray | None]:
    """x [1, T, K] -> MatMul (+ Add bias) or Gemm (transB, bias) -> y, named like an HF layer."""
    weight = rng.standard_normal((K, N)).astype(np.float32) * 0.1
    bias = rng.standard_normal(N).astype(np.float32) if kind != "matmul" else None
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, T, K] if kind != "gemm" else [T, K])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [numpy_helper.from_array(weight if kind != "gemm" else weight.T.copy(), "model.layers.0.mlp.up_proj.weight")]
    if kind == "gemm":
        inits.append(numpy_helper.from_array(bias, "model.layers.0.mlp.up_proj.bias"))
        nodes = [helper.make_node("Gemm", ["x", inits[0].name, inits[1].name], ["y"], transB=1,
                                  name="/model/layers.0/mlp/up_proj/Gemm")]
    else:
        nodes = [helper.make_node("MatMul", ["x", inits[0].name], ["mm" if bias is not None else "y"],
                                  name="/model/layers.0/mlp/up_proj/MatMul")]
        if bias is not None:
            inits.append(numpy_helper.from_array(bias, "model.layers.0.mlp.up_proj.bias"))
            nodes.append(helper.make_node("Add", ["mm", inits[1].name], ["y"], name="/model/layers.0/mlp/up_proj/Add"))
    graph = helper.make_graph(nodes, "one_linear", [x], [y], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.serde.deserialize_model(proto), weight, bias


def run(model: ir.Model, x: np.ndarray, output: str) -> np.ndarray:
    proto = ir.serde.serialize_model(model)
    if output not in [o.name for o in proto.graph.output]:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(output, TensorProto.FLOAT, None))
    session = ort.InferenceSession(proto.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"])
    return session.run([output], {"x": x})[0]


@pytest.mark.parametrize("kind", ["matmul", "matmul_bias", "gemm"])
@pytest.mark.parametrize("scheme, format", sorted(EMITTERS))
def test_emitter_matches_its_numpy_reference(scheme, format, kind):
    rng = np.random.default_rng(0)
    model, weight, bias = one_linear_model(kind, rng)
    x = rng.standard_normal((1, T, K) if kind != "gemm" else (T, K)).astype(np.float32)
    x[..., 5] *= 20.0  # an outlier channel, so activation quantization is visibly at work
    (layer,) = find_linear_layers(model)
    bits, group, symmetric = {"w4a16": (4, 32, False), "w8a16": (8, -1, True), "w4a8": (4, 32, False),
                              "w4a8-dynamic": (4, 32, True)}.get(scheme, (8, -1, True))
    qw = quantize_rtn(layer.weight_kn(), bits, group, symmetric)
    if format == "lut":  # codebook emitters take a CodebookWeight (3 or 4 bits, tables per group of 32 inputs)
        from graphq.algorithms.codebook import lut_quantize

        qw = lut_quantize(layer.weight_kn(), int(scheme[1]), 32)
    details: dict = {}
    if scheme in ("w8a8", "w8a8s", "w4a8"):  # static per-tensor activations (w8a8s: the sparse lowbit weight runs as W8A8)
        qp = range_to_qparams(float(x.min()), float(x.max()))
        details = {"input_scale": qp.scale, "input_offset": qp.offset}
        x_ref = fake_quantize(x, qp.scale, qp.offset)
    elif scheme in ("w8a8-dynamic", "w4a8-dynamic"):
        x_ref = fake_quantize_per_token(x)
    else:
        x_ref = x
    output = emitter_for(scheme, format).emit(model, layer, qw, details)
    assert not [l for l in find_linear_layers(model)], "the float linear is still in the graph"
    assert not any(np.array_equal(v.const_value.numpy(), weight) or np.array_equal(v.const_value.numpy(), weight.T)
                   for v in model.graph.initializers.values() if v.const_value is not None and v.const_value.numpy().size == weight.size)
    expected = x_ref.astype(np.float64) @ qw.dequantize().astype(np.float64) + (0 if bias is None else bias)
    got = run(model, x, output)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert output == "y"  # the emitters keep the layer's output name, here a graph output


def test_unknown_pair_is_one_clear_error():
    with pytest.raises(GraphqError, match="w8a8 cannot be written as matmulnbits: use --format qdq"):
        emitter_for("w8a8", "matmulnbits")
