"""Sparsity (issue 10): pruning methods on one linear (exact sparsity, N:M, SparseGPT against a plain OBS reference),
the methods in quantize (every scheme, masks kept through rounding, measured sparsity in report and inspect),
W8A8S artifacts against the table, W8A8SC compress -> load-artifacts bit-identical for --tp 1, 2, 4, and bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from graphq.algorithms.gptq import gptq_quantize
from graphq.algorithms.lowbit import lowbit_steps, quantize_lowbit
from graphq.algorithms.sparsity import (
    InputSquareNorm,
    magnitude_keep_mask,
    sparsegpt_prune,
    wanda_keep_mask,
    zero_fraction,
)
from graphq.artifacts.safetensors_io import read_header
from graphq.artifacts.w8a8sc import compress_weight, decode_tile, decompress_weight, encode_tile, tile_grid
from graphq.cli import main
from graphq.config import QuantConfig
from graphq.errors import GraphqError
from graphq.quantize import quantize
from graphq.runtimes.ort import OrtCausalLM
from tests.test_cli import assert_one_error

K, N = 256, 48


def correlated_inputs(seed: int = 0, tokens: int = 2048, k: int = K) -> np.ndarray:
    """Inputs whose channels are strongly correlated (OBS has something to compensate with) and unevenly scaled."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(k, k)) * 0.3 + np.eye(k)
    scales = np.exp(rng.normal(size=k))
    return (rng.normal(size=(tokens, k)) @ mixing) * scales


def hessian_of(x: np.ndarray) -> np.ndarray:
    return 2.0 * x.T @ x / len(x)


def output_error(x: np.ndarray, weight: np.ndarray, approximation: np.ndarray) -> float:
    return float(np.sum((x @ (weight - approximation)) ** 2) / np.sum((x @ weight) ** 2))


def check_nm(keep: np.ndarray, n_keep: int, m: int) -> None:
    """Every run of m input channels of every output channel keeps exactly n_keep weights."""
    runs = keep.reshape(keep.shape[0] // m, m, keep.shape[1]).sum(axis=1)
    assert np.all(runs == n_keep), np.unique(runs)


@pytest.fixture(scope="module")
def linear():
    rng = np.random.default_rng(1)
    x = correlated_inputs()
    weight = rng.normal(size=(K, N)).astype(np.float32)
    square_norm = InputSquareNorm()
    square_norm.add(x[:1000])
    square_norm.add(x[1000:])  # streamed in two batches: the same as one
    return x, weight, hessian_of(x), square_norm.value()


@pytest.mark.parametrize("sparsity, pattern", [(0.5, None), (0.25, None), (0.0, (2, 4)), (0.0, (4, 8)), (0.0, (1, 4))])
def test_each_method_hits_the_requested_sparsity_exactly(linear, sparsity, pattern):
    x, weight, hessian, square_norm = linear
    target = sparsity if pattern is None else 1 - pattern[0] / pattern[1]
    masks = {
        "magnitude": magnitude_keep_mask(weight, sparsity, pattern),
        "wanda": wanda_keep_mask(weight, square_norm, sparsity, pattern),
    }
    pruned, _, masks["sparsegpt"], _ = sparsegpt_prune(weight, hessian, sparsity, pattern)
    _, quantized, masks["sparsegpt+w4"], _ = sparsegpt_prune(weight, hessian, sparsity, pattern, bits=4,
                                                             group_size=64, symmetric=False)
    for name, keep in masks.items():
        assert keep.shape == weight.shape
        assert 1 - keep.mean() == target, name
        if pattern is not None:
            check_nm(keep, *pattern)
    assert np.all(pruned[~masks["sparsegpt"]] == 0)
    # Asymmetric 4-bit: a pruned weight sits on its group's zero point, so it dequantizes to exactly 0.
    assert np.all(quantized.dequantize()[~masks["sparsegpt+w4"]] == 0)
    assert zero_fraction(quantized) >= target


def test_wanda_prunes_by_weight_times_input_norm(linear):
    """Wanda keeps, in each output channel, the weights with the largest |w| * ||x_k||: a channel with a huge input
    norm keeps small weights that magnitude pruning drops."""
    _, weight, _, square_norm = linear
    boosted = square_norm.copy()
    boosted[7] *= 1e8
    keep = wanda_keep_mask(weight, boosted, 0.5, None)
    assert keep[7].all()
    scores = np.abs(weight) * np.sqrt(boosted)[:, None]
    for column in range(N):
        kept, dropped = scores[keep[:, column], column], scores[~keep[:, column], column]
        assert kept.min() >= dropped.max()


def reference_sparsegpt(weight_kn, hessian, sparsity, pattern, block_size=128, damp=0.01):
    """Plain OBS, one input channel at a time with the full inverse Hessian (no Cholesky, no lazy blocks):
    prune, then w_j -= (w_i - q_i) [H_F^-1]_ij / [H_F^-1]_ii for the channels j not yet visited, then remove i
    from H_F^-1 by one step of Gaussian elimination. Masks as SparseGPT chooses them: per block of channels from
    w^2 / [H_F^-1]_ii at the block's start (per output channel), or N:M at the first channel of each run."""
    w = weight_kn.astype(np.float64).T.copy()
    n, k = w.shape
    h = hessian + damp * np.mean(np.diag(hessian)) * np.eye(k)
    inverse = np.linalg.inv(h)
    # [H_F^-1]_ii at the moment channel i is visited depends on H only: one elimination pass gives them all.
    d, scratch = np.empty(k), inverse.copy()
    for i in range(k):
        d[i] = scratch[i, i]
        scratch -= np.outer(scratch[:, i], scratch[i, :]) / scratch[i, i]
    keep = np.ones((n, k), dtype=bool)
    for i in range(k):
        if pattern is None and i % block_size == 0:
            block = slice(i, min(i + block_size, k))
            scores = w[:, block] ** 2 / d[block]
            count = int(round(sparsity * scores.shape[1]))
            order = np.argsort(scores, axis=1, kind="stable")[:, :count]
            np.put_along_axis(keep[:, block], order, False, axis=1)
        if pattern is not None and i % pattern[1] == 0:
            run = slice(i, i + pattern[1])
            scores = w[:, run] ** 2 / d[run]
            order = np.argsort(scores, axis=1, kind="stable")[:, : pattern[1] - pattern[0]]
            np.put_along_axis(keep[:, run], order, False, axis=1)
        q = np.where(keep[:, i], w[:, i], 0.0)
        error = (w[:, i] - q) / inverse[i, i]
        w[:, i:] -= np.outer(error, inverse[i, i:])
        w[:, i] = q
        inverse = inverse - np.outer(inverse[:, i], inverse[i, :]) / inverse[i, i]
    return w.T, keep.T


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_matches_a_plain_obs_reference(linear, pattern):
    x, weight, hessian, _ = linear
    expected, expected_keep = reference_sparsegpt(weight, hessian, 0.5, pattern)
    pruned, _, keep, _ = sparsegpt_prune(weight, hessian, 0.5, pattern, block_size=128)
    assert np.array_equal(keep, expected_keep)
    np.testing.assert_allclose(pruned, expected, rtol=0, atol=2e-5 * np.abs(expected).max())


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_beats_wanda_and_magnitude_on_correlated_inputs(linear, pattern):
    x, weight, hessian, square_norm = linear
    pruned, _, _, _ = sparsegpt_prune(weight, hessian, 0.5, pattern)
    sparsegpt = output_error(x, weight, pruned)
    wanda = output_error(x, weight, weight * wanda_keep_mask(weight, square_norm, 0.5, pattern))
    magnitude = output_error(x, weight, weight * magnitude_keep_mask(weight, 0.5, pattern))
    assert sparsegpt < 0.9 * wanda and sparsegpt < 0.2 * magnitude, (sparsegpt, wanda, magnitude)


def test_sparsegpt_without_pruning_is_gptq(linear):
    """Joint pruning and rounding with nothing pruned is GPTQ: the same grid rules, the same codes."""
    x, weight, hessian, _ = linear
    _, ours, _, _ = sparsegpt_prune(weight, hessian, 0.0, None, bits=4, group_size=64, symmetric=False)
    gptq, _ = gptq_quantize(weight, hessian, 4, 64, False)
    assert np.mean(ours.q == gptq.q) > 0.999
    np.testing.assert_allclose(output_error(x, weight, ours.dequantize()), output_error(x, weight, gptq.dequantize()),
                               rtol=1e-3)


def test_fixed_mask_rounding_compensates_the_pruning(linear):
    """wanda+gptq: GPTQ with Wanda's mask held fixed (SparseGPT's joint path) keeps the mask and beats rounding
    Wanda's weights to nearest."""
    from graphq.algorithms.rtn import quantize_rtn

    x, weight, hessian, square_norm = linear
    keep = wanda_keep_mask(weight, square_norm, 0.5, None)
    _, joint, kept, _ = sparsegpt_prune(weight, hessian, 0.5, None, bits=4, group_size=64, symmetric=False,
                                        keep_mask=keep)
    assert np.array_equal(kept, keep)
    assert np.all(joint.dequantize()[~keep] == 0)
    rtn = quantize_rtn(weight * keep, 4, 64, False).dequantize()
    assert output_error(x, weight, joint.dequantize()) < 0.85 * output_error(x, weight, rtn)


def test_lowbit_levels_and_outliers():
    rng = np.random.default_rng(3)
    weight = rng.normal(size=(512, 32)).astype(np.float32) * (magnitude_keep_mask(np.ones((512, 32)), 0.0, (2, 4)))
    weight[5, 3] = 40.0  # a far outlier: kept on the 8-bit grid
    qw, info = quantize_lowbit(weight, sigma_factor=3.0, fraction=0.01)
    assert qw.q.dtype == np.int8 and qw.symmetric and qw.n_groups == 1
    assert np.all(qw.q[weight == 0] == 0)  # pruned zeros stay zero (small kept weights may round to 0 too)
    scale, step, outliers = lowbit_steps(weight, 3.0, 0.01)
    assert outliers[5, 3] and outliers.sum(axis=0).max() <= int(np.ceil(0.01 * 512))
    codes = qw.q.astype(np.int64)
    inlier = ~outliers
    assert np.all((codes % step[None, :])[inlier] == 0)  # 4-bit levels j * m, j in [-8, 7]
    assert np.all((codes // step[None, :])[inlier] >= -8) and np.all((codes // step[None, :])[inlier] <= 7)
    assert abs(qw.dequantize()[5, 3] - 40.0) <= scale[3] / 2 + 1e-6
    assert info["lowbit_outlier_fraction"] > 0



def test_lowbit_gptq_keeps_the_grid_and_the_mask_and_beats_rounding_to_nearest(linear):
    """W8A8S joint path: the lowbit levels rounded with GPTQ's error feedback, the pruning mask held fixed."""
    from graphq.algorithms.lowbit import is_lowbit, lowbit_gptq

    x, weight, hessian, square_norm = linear
    pruned = weight * wanda_keep_mask(weight, square_norm, 0.5, None)
    nearest, _ = quantize_lowbit(pruned, 3.0, 0.01)
    joint, info = lowbit_gptq(pruned, hessian, 3.0, 0.01)
    scale, step, outliers = lowbit_steps(pruned, 3.0, 0.01)
    np.testing.assert_array_equal(joint.scales, nearest.scales)  # the same per-channel grid
    assert is_lowbit(joint.q, step, outliers)
    assert np.all(joint.q[pruned == 0] == 0)
    assert output_error(x, pruned, joint.dequantize()) < 0.85 * output_error(x, pruned, nearest.dequantize())
    assert info["lowbit_outlier_fraction"] == pytest.approx(float(outliers.mean()))

def test_tile_codec_is_lossless_and_smaller_for_sparse_weights():
    rng = np.random.default_rng(4)
    dense = rng.integers(-128, 128, size=(100, 200)).astype(np.int8)
    sparse = np.where(rng.random((100, 200)) < 0.5, dense, 0).astype(np.int8)
    lowbit = np.where(rng.random((100, 200)) < 0.5, rng.integers(-8, 8, size=(100, 200)) * 9, 0).astype(np.int8)
    lowbit[3, 7] = 127  # an escape
    modes = set()
    for weight in (dense, sparse, lowbit):
        packed = compress_weight(weight)
        n_index, k_index, _, _ = tile_grid(*weight.shape)
        assert packed["index"].dtype == np.int8 and packed["index"].size == n_index * k_index * 8
        assert packed["info"].dtype == np.int64
        assert np.array_equal(decompress_weight(packed["weight"], packed["index"], packed["info"]), weight)
        modes |= set(packed["index"].view(np.uint8).reshape(-1, 8)[:, 4].tolist())
    assert {mode & 0x7F for mode in modes} == {0, 1, 2}  # raw, sparse, lowbit (plain or deflated)
    assert compress_weight(sparse)["weight"].size < 0.66 * sparse.size
    assert compress_weight(lowbit)["weight"].size < 0.45 * lowbit.size
    mode, stream = encode_tile(lowbit[:64, :128])
    assert mode & 0x7F == 2 and np.array_equal(decode_tile(mode, stream, 64, 128), lowbit[:64, :128])



def test_tile_codec_deflates_bell_shaped_lowbit_codes_and_reads_version_1():
    from graphq.artifacts.w8a8sc import DEFLATED, MODE_LOWBIT

    rng = np.random.default_rng(5)
    j = np.clip(np.round(rng.normal(0, 2.0, size=(128, 256))), -7, 7)  # bell-shaped 4-bit levels, as real weights
    j[j == 0] = 1
    weight = np.where(rng.random((128, 256)) < 0.5, j * 6, 0).astype(np.int8)
    packed = compress_weight(weight)
    modes = set(packed["index"].view(np.uint8).reshape(-1, 8)[:, 4].tolist())
    assert modes == {MODE_LOWBIT | DEFLATED}
    assert np.array_equal(decompress_weight(packed["weight"], packed["index"], packed["info"]), weight)
    mode, stream = encode_tile(weight[:64, :128])
    plain_lowbit_bytes = 8192 // 8 + 64 + int(np.count_nonzero(weight[:64, :128]) + 1) // 2
    assert mode == MODE_LOWBIT | DEFLATED and len(stream) < 0.95 * plain_lowbit_bytes
    # A version-1 folder (written before deflated tiles existed) still reads.
    dense = rng.integers(-128, 128, size=(70, 40)).astype(np.int8)
    v1 = compress_weight(dense)
    v1["info"][-1] = 1
    assert np.array_equal(decompress_weight(v1["weight"], v1["index"], v1["info"]), dense)
    with pytest.raises(GraphqError, match="does not inflate"):
        decode_tile(MODE_LOWBIT | DEFLATED, b"not deflate", 64, 128)
    bad = dict(packed, info=packed["info"].copy())
    bad["info"][-1] = 9
    with pytest.raises(GraphqError, match="codec version 9"):
        decompress_weight(bad["weight"], bad["index"], bad["info"])

# --- the methods in quantize ------------------------------------------------------------------------------------

CALIB = dict(num_samples=8, seq_len=64)


def layer_entries(report: dict) -> list[dict]:
    return [e for e in report["layers"] if "skipped" not in e]


@pytest.mark.parametrize("scheme, method, extra", [
    ("w4a16", "magnitude", {"sparsity": 0.5}),
    ("w4a16", "sparsegpt", {"sparsity_pattern": "2:4"}),
    ("w4a16", "wanda+gptq", {"sparsity": 0.5, "format": "qdq"}),
    ("w8a16", "awq+wanda", {"sparsity_pattern": "4:8"}),
    ("w8a8", "sparsegpt", {"sparsity": 0.5}),
    ("w8a8-dynamic", "wanda", {"sparsity_pattern": "2:4"}),
])
def test_pruning_with_every_scheme_reports_measured_sparsity(tiny_models, tmp_path, scheme, method, extra):
    from graphq.artifacts.inspect import inspect_path

    out = tmp_path / "q"
    result = quantize(tiny_models["llama"]["onnx"], QuantConfig(scheme=scheme, method=method, **CALIB, **extra), out,
                      progress=False)
    entries = layer_entries(result.report)
    assert entries and all(0.5 <= e["sparsity"] < 0.6 for e in entries), [e["sparsity"] for e in entries]
    onnx_view = inspect_path(out)[0]
    assert set(onnx_view.sparsity) == {e["name"] for e in entries}
    for entry in entries:  # the graph holds the zeros the report measured
        assert onnx_view.sparsity[entry["name"]] == pytest.approx(entry["sparsity"], abs=1e-9)
    assert "sparsity (measured zeros)" in onnx_view.render()


def test_pruned_calibrated_model_keeps_its_zeros_and_runs(tiny_models, tmp_path, tiny_text):
    """sparsegpt (joint) has a lower output error than wanda + RTN on the same tiny model, and both run."""
    errors = {}
    for method in ("wanda", "sparsegpt"):
        result = quantize(tiny_models["qwen2"]["onnx"], QuantConfig(scheme="w8a16", method=method, sparsity=0.5,
                                                                     **CALIB), tmp_path / method, progress=False)
        errors[method] = np.mean([e["output_error"] for e in layer_entries(result.report)])
        logits = OrtCausalLM(tmp_path / method).logits(np.arange(3, 40))
        assert np.all(np.isfinite(logits))
    assert errors["sparsegpt"] < errors["wanda"]


def test_prune_command_writes_a_float_model_with_exact_zeros(tiny_models, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", str(tiny_models["llama"]["onnx"]), "-o", str(out), "--method", "sparsegpt",
                 "--sparsity-pattern", "2:4", "--num-samples", "8", "--seq-len", "64", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity"] == 0.5
    from graphq.linear_layers import find_linear_layers
    from graphq.model_io import load_model

    layers = {l.name: l for l in find_linear_layers(load_model(out / "model.onnx"))}
    for entry in report["layers"]:
        if "skipped" in entry:
            continue
        weight = layers[entry["name"]].weight_kn()
        check_nm(weight != 0, 2, 4)


# --- W8A8S and W8A8SC ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def w8a8s(tiny_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("w8a8s") / "q"
    quantize(tiny_models["llama"]["onnx"], QuantConfig(scheme="w8a8s", method="wanda", sparsity=0.5, smooth="smoothquant",
                                                       act_method="entropy", **CALIB), out, progress=False)
    return out


def test_w8a8s_artifacts_match_the_table(w8a8s):
    description = json.loads((w8a8s / "quant_model_description_w8a8s.json").read_text())
    assert description["model_quant_type"] == "W8A8S"
    assert json.loads((w8a8s / "config.json").read_text())["quantize"] == "w8a8s"
    specs, _ = read_header(w8a8s / "quant_model_weight_w8a8s.safetensors")
    layers = {name.rsplit(".", 1)[0] for name, kind in description.items() if kind == "W8A8S" and "." in name}
    assert len(layers) == 14
    for layer in layers:
        dtype, (n, k) = specs[f"{layer}.weight"]
        assert dtype == "I8"
        assert specs[f"{layer}.input_scale"] == ("F32", (1,))  # float32 model: float32 scales
        assert specs[f"{layer}.input_offset"] == ("F32", (1,))
        assert specs[f"{layer}.quant_bias"] == ("I32", (n,))
        # deq_scale holds the float32 bits in an int64 (fp32/fp16 serving), as msModelSlim writes it.
        assert specs[f"{layer}.deq_scale"] == ("I64", (n,))
        assert {"weight", "input_scale", "input_offset", "quant_bias", "deq_scale", "weight_scale", "weight_offset"} == {
            name.rsplit(".", 1)[1] for name in description if name.startswith(layer + ".")}
    report = json.loads((w8a8s / "report.json").read_text())
    assert all(0.5 <= e["sparsity"] < 0.6 for e in layer_entries(report))



def test_w8a8s_with_sparsegpt_rounds_the_lowbit_levels_by_gptq(tiny_models, tmp_path, w8a8s):
    """--method sparsegpt on w8a8s: after smoothing, GPTQ rounds the kept weights onto the lowbit levels (the
    joint path); the codes in the artifacts follow the lowbit rule and the pruned zeros stay zero."""
    from graphq.artifacts.reader import open_artifacts

    out = tmp_path / "q"
    quantize(tiny_models["llama"]["onnx"], QuantConfig(scheme="w8a8s", method="sparsegpt", sparsity=0.5,
                                                       smooth="smoothquant", **CALIB), out, progress=False)
    report = json.loads((out / "report.json").read_text())
    entries = layer_entries(report)
    assert entries and all("gptq_damp" in e and e["output_error"] < e["output_error_rtn"] for e in entries), entries[0]
    assert all(0.5 <= e["sparsity"] < 0.6 for e in entries)
    artifacts = open_artifacts(out)
    for entry in entries:
        codes = artifacts.layer_tensors(entry["name"])["weight"]
        assert codes.dtype == np.int8 and np.mean(codes == 0) >= 0.5
    report_rtn = json.loads((w8a8s / "report.json").read_text())
    assert all("gptq_damp" not in e for e in layer_entries(report_rtn))  # wanda alone: rounded to nearest

def rebuilt_logits(folder: Path, tmp_path: Path, name: str) -> np.ndarray:
    out = tmp_path / name
    assert main(["load-artifacts", str(folder), "-o", str(out)]) == 0
    return OrtCausalLM(out).logits(np.arange(3, 60))


@pytest.mark.parametrize("tp", [1, 2])
def test_compress_then_load_artifacts_is_bit_identical(w8a8s, tmp_path, tp):
    reference = rebuilt_logits(w8a8s, tmp_path, "from-w8a8s")
    np.testing.assert_array_equal(reference, OrtCausalLM(w8a8s).logits(np.arange(3, 60)))
    compressed = tmp_path / f"sc{tp}"
    assert main(["compress", str(w8a8s), "-o", str(compressed), "--tp", str(tp)]) == 0
    parts = sorted(p.name for p in compressed.iterdir() if p.is_dir())
    assert parts == [f"part{i}-of-{tp}" for i in range(tp)]
    report = json.loads((compressed / "compression.json").read_text())
    assert report["compression_ratio"] < 0.6
    assert all(e["compression_ratio"] < 0.7 for e in report["layers"].values())
    for part in parts:
        description = json.loads((compressed / part / "quant_model_description_w8a8sc.json").read_text())
        assert description["model_quant_type"] == "W8A8SC"
        specs, _ = read_header(compressed / part / "quant_model_weight_w8a8sc.safetensors")
        dtype, (x,) = specs["model.layers.0.mlp.down_proj.weight"]
        n, k = 64, 96 // tp  # row-parallel: split by input channel
        n_index, k_index, _, _ = tile_grid(n, k)
        assert dtype == "I8" and x < n * k
        assert specs["model.layers.0.mlp.down_proj.index"] == ("I8", (k_index * n_index * 8,))
        assert specs["model.layers.0.mlp.gate_proj.quant_bias"] == ("I32", (96 // tp,))  # column-parallel
    np.testing.assert_array_equal(rebuilt_logits(compressed, tmp_path, f"from-sc{tp}"), reference)


def test_compress_over_four_ranks_and_quantize_compress(tmp_path):
    """--tp 4 needs 4 key/value heads: a tiny llama with kv_heads=4, quantized with --compress --tp 4."""
    from graphq.export import export
    from tests.conftest import build_tiny_model

    export(build_tiny_model("llama", tmp_path / "hf", seed=2, kv_heads=4), tmp_path / "onnx")
    out = tmp_path / "q"
    result = quantize(tmp_path / "onnx", QuantConfig(scheme="w8a8s", method="magnitude", sparsity_pattern="2:4",
                                                     compress=True, tp_size=4, **CALIB), out, progress=False)
    assert result.report["compression"]["tp_size"] == 4
    assert result.report["compression"]["compression_ratio"] < 0.6
    reference = rebuilt_logits(out, tmp_path, "plain")
    np.testing.assert_array_equal(rebuilt_logits(out / "w8a8sc", tmp_path, "compressed"), reference)


def test_compress_copies_a_quantized_embedding_into_every_rank(tmp_path, capsys):
    """--quantize-embeddings int8 puts a W8A16 embedding beside the W8A8S linears: every rank holds it whole, with
    its type, and load-artifacts of the W8A8SC folder gives the W8A8S model's logits."""
    from graphq.export import export
    from tests.conftest import build_tiny_model

    export(build_tiny_model("llama", tmp_path / "hf", seed=3, kv_heads=2), tmp_path / "onnx")
    out = tmp_path / "q"
    result = quantize(tmp_path / "onnx", QuantConfig(scheme="w8a8s", method="magnitude", sparsity=0.5,
                                                     quantize_embeddings="int8", compress=True, tp_size=2, **CALIB),
                      out, progress=False)
    assert result.report["compression"]["tp_size"] == 2
    for rank in range(2):
        part = out / "w8a8sc" / f"part{rank}-of-2"
        description = json.loads((part / "quant_model_description_w8a8sc.json").read_text())
        specs, _ = read_header(part / "quant_model_weight_w8a8sc.safetensors")
        assert description["model.embed_tokens.weight"] == "W8A16"
        assert specs["model.embed_tokens.weight"][0] == "I8"
        assert specs["model.embed_tokens.weight"][1] == tuple(read_header(
            out / "quant_model_weight_w8a8s.safetensors")[0]["model.embed_tokens.weight"][1])
    reference = rebuilt_logits(out, tmp_path, "plain")
    np.testing.assert_array_equal(reference, OrtCausalLM(out).logits(np.arange(3, 60)))
    np.testing.assert_array_equal(rebuilt_logits(out / "w8a8sc", tmp_path, "compressed"), reference)
    capsys.readouterr()
    assert main(["inspect", str(out / "w8a8sc")]) == 0
    listing = capsys.readouterr().out
    assert re.search(r"W8A16\s+1 layers", listing) and "W8A8SC" in listing


# --- bad input ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, fragments", [
    (["--method", "wanda", "--sparsity", "1.0"], ["--sparsity", "[0, 1)"]),
    (["--method", "wanda", "--sparsity", "-0.1"], ["--sparsity"]),
    (["--method", "wanda", "--sparsity-pattern", "4:4"], ["N must be in [1, M)"]),
    (["--method", "wanda", "--sparsity-pattern", "5:4"], ["N must be in [1, M)"]),
    (["--method", "wanda", "--sparsity-pattern", "two:four"], ["N:M"]),
    (["--method", "magnitude", "--sparsity-pattern", "1:128"], ["not a multiple of 128", "model.layers.0.self_attn.q_proj"]),
    (["--method", "wanda"], ["--sparsity F"]),
    (["--sparsity", "0.5"], ["pruning method"]),
    (["--method", "wanda+sparsegpt", "--sparsity", "0.5"], ["prunes twice"]),
    (["--scheme", "w8a8", "--method", "awq+wanda", "--sparsity", "0.5"], ["weight-only"]),
    (["--scheme", "w8a8", "--method", "wanda+gptq", "--sparsity", "0.5"], ["weight-only"]),  # w8a8s only
    (["--scheme", "w8a8s", "--method", "awq+wanda", "--sparsity", "0.5"], ["weight-only", "gptq after one"]),
    (["--scheme", "w8a8s"], ["w8a8s prunes"]),
    (["--scheme", "w4a16", "--method", "wanda", "--sparsity", "0.5", "--compress"], ["--scheme w8a8s"]),
    (["--scheme", "w8a8s", "--method", "wanda", "--sparsity", "0.5", "--sigma-factor", "5"], ["--sigma-factor"]),
    (["--scheme", "w8a8s", "--method", "wanda", "--sparsity", "0.5", "--fraction", "0.5"], ["--fraction"]),
    (["--scheme", "w8a8s", "--method", "wanda", "--sparsity", "0.5", "--compress", "--tp", "4"],
     ["--tp 4", "2 key/value heads", "k_proj"]),
])
def test_bad_sparsity_input_is_one_line_and_writes_nothing(tiny_models, tmp_path, capsys, args, fragments):
    out = tmp_path / "q"
    code = main(["quantize", str(tiny_models["llama"]["onnx"]), "-o", str(out), "--quiet", "--num-samples", "4",
                 "--seq-len", "32", *args])
    captured = capsys.readouterr()
    assert_one_error(code, captured.out, captured.err, *fragments)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_prune_refuses_sequences(tiny_models, tmp_path, capsys):
    code = main(["prune", str(tiny_models["llama"]["onnx"]), "-o", str(tmp_path / "p"), "--method", "awq+wanda",
                 "--sparsity", "0.5", "--quiet"])
    captured = capsys.readouterr()
    assert_one_error(code, captured.out, captured.err, "awq", "graphq quantize")
    assert not (tmp_path / "p").exists()


def test_compress_refuses_missing_tensors_and_bad_tp(w8a8s, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for file in w8a8s.iterdir():
        if file.is_file() and file.suffix == ".json":
            (broken / file.name).write_text(file.read_text())
    tensors = load_file(str(w8a8s / "quant_model_weight_w8a8s.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.quant_bias"]
    save_file(tensors, str(broken / "quant_model_weight_w8a8s.safetensors"))
    description = json.loads((broken / "quant_model_description_w8a8s.json").read_text())
    del description["model.layers.1.mlp.up_proj.quant_bias"]
    (broken / "quant_model_description_w8a8s.json").write_text(json.dumps(description))
    code = main(["compress", str(broken), "-o", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert_one_error(code, captured.out, captured.err, "model.layers.1.mlp.up_proj.quant_bias", "missing")
    code = main(["compress", str(w8a8s), "-o", str(tmp_path / "out"), "--tp", "3"])
    captured = capsys.readouterr()
    assert_one_error(code, captured.out, captured.err, "--tp 3", "attention heads")
    assert not (tmp_path / "out").exists()


def test_a_layer_pruned_to_nothing_is_named_in_a_warning(tiny_models, tmp_path, capsys):
    result = quantize(tiny_models["llama"]["onnx"], QuantConfig(method="wanda", sparsity=0.999, **CALIB), tmp_path / "q",
                      progress=False)
    assert any(e["sparsity"] == 1.0 for e in layer_entries(result.report))
    err = capsys.readouterr().err
    assert "graphq: warning:" in err and "became all zero" in err and "model.layers." in err


def test_verify_and_html_show_sparsity_next_to_sqnr(tiny_models, tmp_path, tiny_text):
    from graphq.evaluate import read_text, token_windows
    from graphq.report_html import render_html
    from graphq.tokenizer import load_tokenizer
    from graphq.verify import format_table, verify

    float_dir = tiny_models["llama"]["onnx"]
    out = tmp_path / "q"
    result = quantize(float_dir, QuantConfig(scheme="w8a16", method="sparsegpt", sparsity=0.5, **CALIB), out,
                      progress=False)
    measured = {e["name"]: e["sparsity"] for e in layer_entries(result.report)}
    windows = token_windows(load_tokenizer(float_dir), read_text(tiny_text), 64, 256)
    checked = verify(float_dir, out, windows)
    assert {e.name: e.sparsity for e in checked.layers} == measured
    table = format_table(checked, worst=3)
    assert "sparsity" in table.splitlines()[3]
    worst = checked.worst(1)[0]
    assert f"{worst.sparsity:8.2%}" in table.splitlines()[4]
    page = render_html(checked)
    assert "<th>sparsity</th>" in page and f"<td>{worst.sparsity:.2%}</td>" in page
