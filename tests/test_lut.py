"""Codebook (LUT) weights: the k-means and fixed tables (numpy), and the emitted graph against its numpy reference.

Tolerance of the graph tests: the emitted graph gathers exactly the float32 values that ``cw.dequantize()``
returns (same float16 -> float32 casts and the same float32 products), so onnxruntime and numpy differ only in
the matmul's accumulation order: ~1e-7 relative. ATOL = 1e-5 on outputs of size ~1 is far above that and far
below the quantization effect, which each test asserts is > 100 * ATOL.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from graphq.algorithms.codebook import (
    IQ4NL_VALUES,
    NF4_VALUES,
    CodebookWeight,
    codebook_relative_mse,
    iq4nl_quantize,
    kmeans_1d,
    lut_quantize,
    nf4_quantize,
    nf4_values_from_quantiles,
    search_scales,
    shared_lut_quantize,
)
from graphq.errors import GraphqError
from graphq.linear_layers import find_linear_layers
from graphq.passes.lut import emit_lut, pack_codes, packed_length, unpack_codes

ATOL = 1e-5


def one_linear_model(weight_kn: np.ndarray, op: str = "MatMul", bias: np.ndarray | None = None) -> ir.Model:
    """y = x @ W (MatMul, weight stored [K, N]) or Gemm(x, W^T stored [N, K], transB=1, bias)."""
    k, n = weight_kn.shape
    if op == "MatMul":
        initializers = [helper.make_tensor("proj.weight", TensorProto.FLOAT, [k, n], weight_kn.reshape(-1))]
        nodes = [helper.make_node("MatMul", ["x", "proj.weight"], ["y"], name="/model/proj/MatMul")]
    else:
        initializers = [
            helper.make_tensor("proj.weight", TensorProto.FLOAT, [n, k], weight_kn.T.reshape(-1)),
            helper.make_tensor("proj.bias", TensorProto.FLOAT, [n], bias),
        ]
        nodes = [helper.make_node("Gemm", ["x", "proj.weight", "proj.bias"], ["y"], transB=1, name="/model/proj/Gemm")]
    graph = helper.make_graph(
        nodes, "one_linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 8
    return ir.from_proto(proto)


def run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


def weight(k: int, n: int, seed: int = 0) -> np.ndarray:
    """A heavy-tailed weight like an LLM's (Student-t), so the tables differ from a uniform grid."""
    return (np.random.default_rng(seed).standard_t(4, size=(k, n)) * 0.05).astype(np.float32)


QUANTIZERS = {
    "lut4-per-channel-fp16": lambda w: lut_quantize(w, 4),
    "lut4-g16-int8": lambda w: lut_quantize(w, 4, group_size=16, table_dtype="int8"),  # K = 40: a partial group
    "lut3-per-channel": lambda w: lut_quantize(w, 3),  # K * N = 1000 codes: not a whole number of 8-code words
    "lut3-g32-int8": lambda w: lut_quantize(w, 3, group_size=32, table_dtype="int8"),
    "nf4-g16": lambda w: nf4_quantize(w, 16),
    "iq4nl-g32": lambda w: iq4nl_quantize(w, 32),
    "shared-g16": lambda w: shared_lut_quantize(w, 4, 16),
    "shared3-g32": lambda w: shared_lut_quantize(w, 3, 32),
}


@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
@pytest.mark.parametrize("method", sorted(QUANTIZERS))
def test_emitted_graph_computes_the_dequantized_weight(method, op):
    k, n = 40, 25
    w = weight(k, n)
    bias = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    model = one_linear_model(w, op, bias)
    (layer,) = find_linear_layers(model)
    cw = QUANTIZERS[method](layer.weight_kn())
    emit_lut(model, layer, cw)
    x = np.random.default_rng(2).standard_normal((7, k)).astype(np.float32)
    expected = x @ cw.dequantize() + (bias if op == "Gemm" else 0)
    floating = x @ w + (bias if op == "Gemm" else 0)
    got = run(model, x)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    assert np.abs(floating - expected).max() > 100 * ATOL  # the graph is quantized, not the float weight

    # Only the packed codes, the tables and scales, and small index constants remain: no float [K, N] copy.
    initializers = model.graph.initializers
    assert "proj.weight" not in initializers
    assert ("proj.bias" in initializers) == (op == "Gemm")
    prefix = layer.name
    large = set()
    for value in initializers.values():
        array = value.const_value.numpy()
        if value.name == "proj.bias":
            continue
        if np.issubdtype(array.dtype, np.floating):
            assert array.size <= cw.table.size + (0 if cw.table_scales is None else cw.table_scales.size)
        if array.size > max(k, n):
            large.add(value.name)
    assert large <= {f"{prefix}.weight_codes", f"{prefix}.weight_lut", f"{prefix}.weight_lut_scale"}  # + offsets, shapes
    codes = initializers[f"{layer.name}.weight_codes"].const_value.numpy()
    assert codes.dtype == np.uint8 and codes.size == packed_length(k * n, cw.bits)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("count", [1, 7, 8, 1001])
def test_pack_unpack_round_trip(bits, count):
    codes = np.random.default_rng(count).integers(0, 1 << bits, size=count).astype(np.uint8)
    packed = pack_codes(codes, bits)
    # 4 bits: two codes per byte; 3 bits: whole words of 8 codes in 3 bytes
    assert packed.size == (-(-count // 2) if bits == 4 else -(-count // 8) * 3)
    np.testing.assert_array_equal(unpack_codes(packed, bits, count), codes)
    if bits == 4:  # two per byte, even index in the low nibble
        assert packed[0] == codes[0] | ((codes[1] if count > 1 else 0) << 4)


def test_kmeans_recovers_mixture_centres():
    rng = np.random.default_rng(0)
    true_centres = np.array([[-3.0, -1.0, 0.5, 4.0], [-0.2, 0.0, 0.1, 0.3]])
    labels = rng.integers(0, 4, size=(2, 4000))
    spread = np.array([[0.05], [0.004]])  # well separated relative to each row's gaps
    values = np.take_along_axis(true_centres, labels, axis=1) + rng.standard_normal((2, 4000)) * spread
    centres, fallback = kmeans_1d(values, 4)
    assert fallback == 0
    # ~1000 samples per centre: the mean's standard error is spread / 32, so 0.1 * spread is > 3 sigma.
    assert np.all(np.abs(centres - true_centres) < 0.1 * spread)


def test_kmeans_is_never_worse_than_the_uniform_grid():
    """Lloyd from the min..max grid only lowers the error, however heavy the tails (quantile starts alone can
    end far worse on LLM weights)."""
    values = weight(64, 200).T.astype(np.float64)  # 200 rows of 64 heavy-tailed values
    centres, _ = kmeans_1d(values, 16)
    grid = values.min(1, keepdims=True) + (values.max(1, keepdims=True) - values.min(1, keepdims=True)) * np.linspace(0, 1, 16)

    def row_error(table):
        return (np.abs(values[:, :, None] - table[:, None, :]).min(-1) ** 2).sum(1)

    assert np.all(row_error(centres) <= row_error(grid) * (1 + 1e-9))
    assert row_error(centres).sum() < 0.7 * row_error(grid).sum()
    quantile_only, _ = kmeans_1d(values, 16, inits=("quantile",))
    assert np.all(row_error(centres) <= row_error(quantile_only) * (1 + 1e-9))  # best of both starts, per row


def test_lut_is_deterministic_and_codes_are_nearest():
    w = weight(64, 48)
    first, second = lut_quantize(w, 4, seed=0), lut_quantize(w, 4, seed=0)
    np.testing.assert_array_equal(first.codes, second.codes)
    np.testing.assert_array_equal(first.table, second.table)
    # Every weight's code points at the nearest entry of its column's stored table.
    table = first.effective_table()[0]  # [N, 16]
    distance = np.abs(w.T[:, :, None] - table[:, None, :])  # [N, K, 16]
    chosen = np.take_along_axis(distance, first.codes.T[:, :, None].astype(np.int64), axis=2)[..., 0]
    np.testing.assert_allclose(chosen, distance.min(axis=2), atol=1e-7)
    assert first.codes.dtype == np.uint8 and first.codes.max() < 16


def test_lut_beats_uniform_grid_error_on_heavy_tails():
    from graphq.algorithms.rtn import quantize_rtn, weight_relative_mse

    w = weight(256, 64)
    lut = codebook_relative_mse(w, lut_quantize(w, 4))
    rtn = weight_relative_mse(w, quantize_rtn(w, 4, -1, False))
    assert lut < 0.75 * rtn  # same per-channel granularity: the learned table fits the tails


def test_bits_per_weight_counts_codes_tables_and_scales():
    k, n = 576, 64
    w = weight(k, n)
    assert lut_quantize(w, 4).bits_per_weight() == pytest.approx(4 + 16 * 16 / k)
    assert lut_quantize(w, 4, table_dtype="int8").bits_per_weight() == pytest.approx(4 + (16 * 8 + 16) / k)
    assert lut_quantize(w, 3).bits_per_weight() == pytest.approx(3 + 8 * 16 / k)
    assert lut_quantize(w, 4, group_size=64).bits_per_weight() == pytest.approx(4 + 16 * 16 / 64)
    # Fixed tables: one shared table plus a float16 scale per group of 64.
    assert nf4_quantize(w, 64).bits_per_weight() == pytest.approx(4 + 16 / 64 + 16 * 16 / (k * n))
    assert iq4nl_quantize(w, 32).bits_per_weight() == pytest.approx(4 + 16 / 32 + 16 * 8 / (k * n))
    # storage_bytes agrees with the packed buffer the emitter writes.
    cw = lut_quantize(w, 3)
    assert pack_codes(cw.codes.reshape(-1), 3).size + cw.table.nbytes == cw.storage_bytes()


def test_weighted_kmeans_lowers_weighted_error():
    k, n = 128, 32
    w = weight(k, n, seed=3)
    importance = np.random.default_rng(4).lognormal(0, 2, size=k)  # a few input channels dominate, as in LLMs
    unweighted = lut_quantize(w, 3)
    weighted = lut_quantize(w, 3, importance=importance)
    assert codebook_relative_mse(w, weighted, importance) < 0.8 * codebook_relative_mse(w, unweighted, importance)
    # ... at the price of the unweighted error, which the unweighted k-means minimises.
    assert codebook_relative_mse(w, unweighted) < codebook_relative_mse(w, weighted)


def test_nf4_matches_published_table_and_round_trips_it():
    np.testing.assert_allclose(NF4_VALUES, nf4_values_from_quantiles(), atol=1e-6)
    assert NF4_VALUES[7] == 0 and NF4_VALUES[0] == -1 and NF4_VALUES[-1] == 1 and np.all(np.diff(NF4_VALUES) > 0)
    # A weight made of NF4 values times a float16 absmax per group comes back exactly.
    rng = np.random.default_rng(0)
    k, n, group = 128, 8, 64
    scales = rng.uniform(0.01, 0.1, size=(k // group, n)).astype(np.float16).astype(np.float32)
    codes = rng.integers(0, 16, size=(k, n))
    codes[0], codes[group] = 0, 0  # each group holds its -absmax, so its absmax is its scale
    values = NF4_VALUES.astype(np.float16).astype(np.float32)[codes] * np.repeat(scales, group, axis=0)
    cw = nf4_quantize(values, group)
    np.testing.assert_array_equal(cw.codes, codes)
    np.testing.assert_allclose(cw.dequantize(), values, rtol=1e-6)


def test_iq4nl_uses_the_llama_cpp_table():
    w = weight(64, 16)
    cw = iq4nl_quantize(w, 32)
    np.testing.assert_array_equal(cw.table.reshape(-1), IQ4NL_VALUES)
    assert cw.table.dtype == np.int8 and cw.table_scales.shape == (2, 16)
    # The searched scales are no worse than the plain absmax / 127 scale with nearest codes.
    plain = (np.abs(w.reshape(2, 32, 16)).max(axis=1) / 127).astype(np.float16)
    normalised = w / np.repeat(plain.astype(np.float32), 32, axis=0)
    nearest = np.abs(normalised[:, :, None] - IQ4NL_VALUES.astype(np.float32)).argmin(axis=2).astype(np.uint8)
    plain_cw = CodebookWeight(nearest, cw.table, 4, 32, plain)
    assert codebook_relative_mse(w, cw) < codebook_relative_mse(w, plain_cw)


def test_shared_table_beats_nf4_at_the_same_storage():
    w = weight(256, 64, seed=5)
    shared, nf4 = shared_lut_quantize(w, 4, 64), nf4_quantize(w, 64)
    assert shared.bits_per_weight() == pytest.approx(nf4.bits_per_weight())
    assert shared.table.shape == (1, 1, 16) and shared.table_scales.shape == (4, 64)
    assert codebook_relative_mse(w, shared) < 0.9 * codebook_relative_mse(w, nf4)


def test_search_scales_recovers_a_scaled_table():
    table = IQ4NL_VALUES.astype(np.float64)
    rng = np.random.default_rng(0)
    true_scales = rng.uniform(-0.01, 0.01, size=(3, 5))
    codes = rng.integers(0, 16, size=(3, 5, 32))
    codes[..., 0] = 0  # -127 present: the extreme sits on one end of the table, as one candidate assumes
    rows = table[codes] * true_scales[..., None]
    np.testing.assert_allclose(search_scales(rows, np.ones_like(rows), table), true_scales, rtol=1e-9)


def test_rows_with_few_distinct_values_fall_back_to_those_values():
    k, n = 64, 4
    w = weight(k, n)
    w[:, 1] = np.random.default_rng(0).choice([-0.5, 0.0, 0.25, 1.0, 2.0], size=k)  # 5 distinct < 16 entries
    w[:, 3] = 0.125  # constant
    cw = lut_quantize(w, 4)
    assert cw.fallback_rows == 2
    np.testing.assert_array_equal(cw.dequantize()[:, [1, 3]], w[:, [1, 3]])  # exact: the values are the table
    assert np.abs(cw.dequantize()[:, 0] - w[:, 0]).max() > 0  # a normal row is still quantized


def test_output_columns_split_the_weight():
    w = weight(48, 20)
    for cw in (lut_quantize(w, 4, group_size=16), nf4_quantize(w, 16)):
        np.testing.assert_array_equal(cw.output_columns(5, 12).dequantize(), cw.dequantize()[:, 5:12])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda w: lut_quantize(w, 5), "supports"),
        (lambda w: lut_quantize(w[0], 4), "2-D"),
        (lambda w: lut_quantize(w, 4, importance=np.ones(3)), "importance has shape"),
        (lambda w: lut_quantize(w, 4, importance=-np.ones(w.shape[0])), "non-negative"),
        (lambda w: lut_quantize(np.full_like(w, np.nan), 4), "NaN"),
        (lambda w: lut_quantize(w, 4, table_dtype="int4"), "table dtype"),
        (lambda w: lut_quantize(w, 4, group_size=0), "group size"),
    ],
)
def test_bad_input_is_one_clear_error(call, message):
    with pytest.raises(GraphqError, match=message):
        call(weight(32, 8))


def test_tiny_model_logits_match_fake_quantized_model(tiny_models, tmp_path):
    """Every decoder linear of a tiny Llama export as LUT (lm_head float) = the float graph holding the
    dequantized weights, both run in onnxruntime."""
    from graphq.model_io import load_model, save_model
    from graphq.passes.weights import set_layer_weight
    from graphq.runtimes.ort import OrtCausalLM

    source = tiny_models["llama"]["onnx"]
    lut_model, reference = load_model(source), load_model(source)
    lut_layers = [layer for layer in find_linear_layers(lut_model) if layer.role != "lm_head"]
    reference_layers = {layer.name: layer for layer in find_linear_layers(reference)}
    assert len(lut_layers) == 14
    for index, layer in enumerate(lut_layers):
        bits, group = (3, -1) if index % 2 else (4, 32)
        cw = lut_quantize(layer.weight_kn(), bits, group_size=group, table_dtype="int8" if index % 3 else "float16")
        set_layer_weight(reference, reference_layers[layer.name], cw.dequantize())
        emit_lut(lut_model, layer, cw)
    for model, folder in ((lut_model, "lut"), (reference, "reference")):
        (tmp_path / folder).mkdir()
        save_model(model, tmp_path / folder / "model.onnx")
    ids = np.random.default_rng(0).integers(3, 96, size=40)
    got = OrtCausalLM(tmp_path / "lut").logits(ids)
    expected = OrtCausalLM(tmp_path / "reference").logits(ids)
    floating = OrtCausalLM(source).logits(ids)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    assert np.abs(floating - expected).max() > 1e-2
    stored = sum(v.const_value.size for v in lut_model.graph.initializers.values() if v.name.endswith("weight_codes"))
    assert stored > 0 and not any(name.endswith("proj.weight") for name in lut_model.graph.initializers)


@pytest.mark.parametrize("method", sorted(QUANTIZERS))
def test_artifact_tensors_round_trip(method):
    from graphq.artifacts.codebook import from_tensors, to_tensors

    k, n = 40, 25
    cw = QUANTIZERS[method](weight(k, n))
    tensors = to_tensors(cw)
    row_bytes = -(-k // 2) if cw.bits == 4 else -(-k // 8) * 3
    assert tensors["weight"].dtype == np.uint8 and tensors["weight"].shape == (n, row_bytes)
    lut = tensors["weight_lut"]
    if cw.table.shape[1] == 1:
        assert lut.shape[0] == 1  # one shared table
    else:
        assert lut.shape == ((n, 1 << cw.bits) if cw.per_channel else (n, cw.n_groups, 1 << cw.bits))
    back = from_tensors(tensors, k, cw.bits, cw.group_size)
    np.testing.assert_array_equal(back.codes, cw.codes)
    np.testing.assert_array_equal(back.dequantize(), cw.dequantize())
    # Row n of the packed weight is output channel n: its first code is codes[0, n] (low bits first).
    assert tensors["weight"][3, 0] & 1 == cw.codes[0, 3] & 1


def test_artifact_tensors_refuse_a_wrong_shape():
    from graphq.artifacts.codebook import from_tensors, to_tensors

    tensors = to_tensors(lut_quantize(weight(40, 8), 4))
    with pytest.raises(GraphqError, match="expected"):
        from_tensors(tensors, 64, 4, -1)


def test_pack_codes_packs_each_row_of_the_last_axis():
    codes = np.random.default_rng(0).integers(0, 8, size=(5, 13)).astype(np.uint8)
    packed = pack_codes(codes, 3)
    assert packed.shape == (5, 6)  # 13 codes -> 16 -> 4 bytes of 2-bit fields + 2 bytes of 1-bit fields
    for row in range(5):
        np.testing.assert_array_equal(packed[row], pack_codes(codes[row], 3))
    np.testing.assert_array_equal(unpack_codes(packed, 3, 13), codes)
