"""Anti-outlier smoothing: scale formulas, alpha search, outlier reduction, and float-exact graph folding."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphq.algorithms.smoothing import (
    DEFAULT_ALPHA_GRID,
    INT8_PER_CHANNEL,
    InputChannelStats,
    WeightGrid,
    os_plus_scales,
    os_plus_shift,
    search_alpha,
    smoothing_factors,
    smoothquant_scales,
    w8a8_output_error,
    weight_absmax,
)
from graphq.algorithms.grid import fake_quantize_per_token, fake_quantize_range, fake_quantize_weight, range_to_qparams
from graphq.algorithms.rtn import quantize_rtn
from graphq.errors import GraphqError
from graphq.linear_layers import find_linear_layers
from graphq.model_io import load_model
from graphq.passes.smooth import smooth_linear_groups
from graphq.runtimes.layerwise import graph_input_feeds
from graphq.runtimes.submodel import SubmodelSession

K = 64


def outlier_case(seed: int = 0, t: int = 512) -> tuple[np.ndarray, list[np.ndarray]]:
    """Inputs with a few channels 40x larger (one of them off-centre), as after an LLM's norms, and two weights."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, K)).astype(np.float32)
    x[:, [3, 17, 50]] *= 40.0
    x[:, 17] += 60.0
    weights = [(rng.standard_normal((K, n)) * 0.05).astype(np.float32) for n in (48, 32)]
    return x, weights


def range_ratio(stats: InputChannelStats) -> float:
    """How much of a per-tensor int8 range the outlier channels waste: widest channel over the median channel."""
    width = stats.channel_max - stats.channel_min
    return float(width.max() / np.median(width))


# ---------------------------------------------------------------------------------------------- numpy math


def test_stats_from_rows_streams_and_samples():
    x, _ = outlier_case()
    stats = InputChannelStats.from_rows([x[:100].reshape(4, 25, K), x[100:]], max_tokens=64, seed=3)
    np.testing.assert_array_equal(stats.channel_min, x.min(axis=0))
    np.testing.assert_array_equal(stats.channel_max, x.max(axis=0))
    assert stats.tokens.shape == (64, K)
    # Every kept row is a real input row, without repeats, and the sample is reproducible.
    rows = {row.tobytes() for row in x}
    assert all(row.tobytes() in rows for row in stats.tokens)
    assert len({row.tobytes() for row in stats.tokens}) == 64
    again = InputChannelStats.from_rows([x[:100].reshape(4, 25, K), x[100:]], max_tokens=64, seed=3)
    np.testing.assert_array_equal(stats.tokens, again.tokens)
    np.testing.assert_allclose(stats.absmax(), np.abs(x).max(axis=0))
    with pytest.raises(ValueError):
        InputChannelStats.from_rows([])


def test_scale_formulas_match_direct_numpy():
    x, weights = outlier_case()
    stats = InputChannelStats.from_rows(x)
    w_max = np.concatenate([np.abs(w) for w in weights], axis=1).max(axis=1)
    np.testing.assert_array_equal(weight_absmax(weights), w_max)
    for alpha in (0.0, 0.35, 0.5, 1.0):
        expected = np.abs(x).max(axis=0).astype(np.float64) ** alpha / w_max.astype(np.float64) ** (1 - alpha)
        np.testing.assert_allclose(smoothquant_scales(stats.absmax(), w_max, alpha), expected, rtol=1e-6)
        shift, scale = smoothing_factors(stats, weights, "smoothquant", alpha)
        assert not shift.any()
        np.testing.assert_allclose(scale, expected, rtol=1e-6)

        z = (x.max(axis=0).astype(np.float64) + x.min(axis=0)) / 2
        half = np.abs(x - z).max(axis=0)
        expected_os = half**alpha / w_max.astype(np.float64) ** (1 - alpha)
        shift, scale = smoothing_factors(stats, weights, "os+", alpha)
        np.testing.assert_allclose(shift, z, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(scale, expected_os, rtol=1e-5)
        np.testing.assert_allclose(os_plus_shift(stats.channel_min, stats.channel_max), z, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(os_plus_scales(stats.channel_min, stats.channel_max, w_max, alpha), expected_os, rtol=1e-5)

    # Guards: a dead activation channel or an all-zero weight row gets s = 1, never 0 or inf.
    act = np.array([0.0, 2.0, 3.0, 1e30], dtype=np.float32)
    wmax = np.array([1.0, 0.0, 0.5, 1e-30], dtype=np.float32)
    s = smoothquant_scales(act, wmax, 0.5)
    assert s[0] == 1.0 and s[1] == 1.0 and np.isfinite(s).all() and (s > 0).all()
    assert s[2] == pytest.approx(np.sqrt(3.0 / 0.5), rel=1e-6)
    assert s[3] == pytest.approx(1e5)  # clamped
    with pytest.raises(ValueError):
        smoothquant_scales(act, wmax, 1.5)
    with pytest.raises(ValueError):
        smoothing_factors(stats, weights, "awq", 0.5)


def test_alpha_search_scores_the_emitted_grids():
    """The search's fake quantizers are the emitters': RTN int8 weights (extreme on -128), range_to_qparams'
    per-tensor activations (tiny scale for an empty range), the graph's symmetric per-token activations."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((K, 8)).astype(np.float32)
    w[3, 2] = -5.0  # a negative extreme: +-127 levels would put it on -127, the emitted grid puts it on -128
    np.testing.assert_array_equal(fake_quantize_weight(w), quantize_rtn(w, 8, -1, True).dequantize())
    assert fake_quantize_weight(w)[3, 2] == -5.0
    qp = range_to_qparams(-1.0, 3.0)
    assert qp.scale == pytest.approx(4.0 / 255) and qp.zero_point_u8 == round(1.0 / qp.scale)
    assert range_to_qparams(0.0, 0.0).scale == pytest.approx(1e-8)  # as emitted, not 1.0
    x = np.array([-1.0, 0.0, 3.0, 10.0], dtype=np.float32)
    xq = fake_quantize_range(x, -1.0, 3.0)
    assert xq[1] == 0.0 and xq[3] == pytest.approx(3.0, abs=qp.scale)  # 0 exact, saturation at the range end
    # Smoothing's unsmoothed error equals the error of the emitters' own references.
    x, weights = outlier_case(seed=3, t=64)
    stats = InputChannelStats.from_rows(x)
    ones = np.ones(K, dtype=np.float32)
    for per_token in (False, True):
        if per_token:
            xq = fake_quantize_per_token(x)
        else:
            xq = fake_quantize_range(x, x.min(), x.max())
        error = sum(np.sum((x @ w - xq @ quantize_rtn(w, 8, -1, True).dequantize()) ** 2, dtype=np.float64) for w in weights)
        norm = sum(np.sum((x @ w) ** 2, dtype=np.float64) for w in weights)
        got = w8a8_output_error(stats, weights, 0 * ones, ones, per_token=per_token)
        assert got == pytest.approx(error / norm, rel=1e-4)


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_alpha_search_scores_each_linears_own_weight_grid(symmetric):
    """With ``weight_grids`` every linear's weight is scored on its own grid (W4A8: int4 per group): the error is
    the direct numpy one, and the search, which now sees that a high alpha's large row scales coarsen whole int4
    groups, picks a lower alpha than the int8 per-channel search, with a lower int4 error than that alpha gives."""
    x, weights = outlier_case(seed=4)
    stats = InputChannelStats.from_rows(x, max_tokens=256)
    grids = [WeightGrid(4, 16, symmetric), WeightGrid(4, 32, symmetric)]
    shift, scale = smoothing_factors(stats, weights, "smoothquant", 0.7)
    xs = stats.tokens / scale
    xq = fake_quantize_range(xs, float((stats.channel_min / scale).min()), float((stats.channel_max / scale).max()))
    error = sum(np.sum((stats.tokens @ w - xq @ fake_quantize_weight(w * scale[:, None], 4, g.group_size, symmetric))
                       ** 2, dtype=np.float64) for w, g in zip(weights, grids))
    norm = sum(np.sum((stats.tokens @ w) ** 2, dtype=np.float64) for w in weights)
    assert w8a8_output_error(stats, weights, shift, scale, weight_grids=grids) == pytest.approx(error / norm, rel=1e-4)
    # The default grid is W8A8's, so existing callers (W8A8) are scored exactly as before.
    assert w8a8_output_error(stats, weights, shift, scale, weight_grids=[INT8_PER_CHANNEL] * 2) == \
        w8a8_output_error(stats, weights, shift, scale)
    alpha8, _ = search_alpha(stats, weights, "smoothquant")
    alpha4, info4 = search_alpha(stats, weights, "smoothquant", weight_grids=grids)
    assert alpha4 < alpha8
    shift8, scale8 = smoothing_factors(stats, weights, "smoothquant", alpha8)
    assert info4["error"] < w8a8_output_error(stats, weights, shift8, scale8, weight_grids=grids)
    with pytest.raises(ValueError, match="weight grids"):
        search_alpha(stats, weights, "smoothquant", weight_grids=grids[:1])


@pytest.mark.parametrize("method", ["smoothquant", "os+"])
def test_search_alpha_beats_both_ends_and_is_deterministic(method):
    x, weights = outlier_case(seed=2)
    stats = InputChannelStats.from_rows(x, max_tokens=256)
    alpha, info = search_alpha(stats, weights, method)
    assert info["alpha"] == alpha and 0.0 < alpha < 1.0
    errors = dict(zip(info["alphas"], info["errors"]))
    assert info["error"] == min(info["errors"]) == errors[alpha]
    assert info["error"] < errors[0.0] and info["error"] < errors[1.0]
    assert info["error"] < 0.5 * info["error_unsmoothed"]
    shift, scale = smoothing_factors(stats, weights, method, alpha)
    assert info["error"] == pytest.approx(w8a8_output_error(stats, weights, shift, scale), rel=1e-12)
    alpha_again, info_again = search_alpha(stats, weights, method)
    assert alpha_again == alpha and info_again["errors"] == info["errors"]
    # Coarse to fine (13 points) lands where the full 0.05 grid (21 points) does.
    assert len(info["alphas"]) == 13 and set(DEFAULT_ALPHA_GRID) >= set(info["alphas"])
    alpha_full, info_full = search_alpha(stats, weights, method, grid=DEFAULT_ALPHA_GRID)
    assert len(info_full["alphas"]) == 21 and abs(alpha_full - alpha) <= 0.05 + 1e-9
    assert info["error"] <= 1.02 * info_full["error"]


def test_output_error_matches_direct_fake_quant():
    x, weights = outlier_case(seed=4, t=128)
    stats = InputChannelStats.from_rows(x)
    shift, scale = smoothing_factors(stats, weights, "os+", 0.5)
    xs = (x - shift) / scale
    xq = fake_quantize_range(xs, xs.min(), xs.max())
    error = reference = 0.0
    for w in weights:
        ref = x.astype(np.float64) @ w
        approx = xq.astype(np.float64) @ fake_quantize_weight(w * scale[:, None]) + shift.astype(np.float64) @ w
        error += np.sum((ref - approx) ** 2)
        reference += np.sum(ref**2)
    assert w8a8_output_error(stats, weights, shift, scale) == pytest.approx(error / reference, rel=1e-3)


def test_per_token_error_matches_direct_fake_quant_and_search_still_helps():
    x, weights = outlier_case(seed=6, t=128)
    x[7] = 0.0  # an all-zero token keeps a usable scale
    xq = fake_quantize_per_token(x)
    assert not xq[7].any()
    for row, row_q in zip(x[:5], xq[:5]):  # symmetric per row: absmax / 127, as the graph computes it
        step = np.abs(row).max() / 127
        np.testing.assert_allclose(row_q, np.clip(np.round(row / step), -127, 127) * step, rtol=1e-6, atol=1e-6)
    stats = InputChannelStats.from_rows(x)
    shift, scale = smoothing_factors(stats, weights, "smoothquant", 0.5)
    xs = (x - shift) / scale
    xsq = fake_quantize_per_token(xs)
    error = reference = 0.0
    for w in weights:
        ref = x.astype(np.float64) @ w
        error += np.sum((ref - xsq.astype(np.float64) @ fake_quantize_weight(w * scale[:, None])) ** 2)
        reference += np.sum(ref**2)
    assert w8a8_output_error(stats, weights, shift, scale, per_token=True) == pytest.approx(error / reference, rel=1e-3)
    # Per-token scales already absorb the outlier tokens' range but not the outlier channels': smoothing helps.
    alpha, info = search_alpha(stats, weights, "smoothquant", per_token=True)
    assert info["error"] < 0.5 * info["error_unsmoothed"]
    assert info["error_unsmoothed"] < w8a8_output_error(stats, weights, 0 * shift, 0 * scale + 1)  # per-tensor is worse


@pytest.mark.parametrize("method", ["smoothquant", "os+"])
def test_smoothing_shrinks_the_activation_range_ratio(method):
    x, weights = outlier_case(seed=5)
    stats = InputChannelStats.from_rows(x)
    shift, scale = smoothing_factors(stats, weights, method, 0.5)
    smoothed = stats.transformed(shift, scale)
    np.testing.assert_allclose(smoothed.channel_max, ((x - shift) / scale).max(axis=0), rtol=1e-5, atol=1e-6)
    before, after = range_ratio(stats), range_ratio(smoothed)
    assert before > 30 and after < before / 4
    if method == "os+":  # centred: every channel's range is symmetric around 0
        np.testing.assert_allclose(smoothed.channel_max, -smoothed.channel_min, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- graph pass


def capture_stats(model: ir.Model, names: list[str], seed: int = 0) -> dict[str, InputChannelStats]:
    """Per-channel min/max and a token sample of the named values, over a few random sequences."""
    rng = np.random.default_rng(seed)
    session = SubmodelSession(model, {}, names)
    runs = [session.run(graph_input_feeds(model.graph, rng.integers(3, 90, size=24))) for _ in range(3)]
    return {name: InputChannelStats.from_rows([run[name] for run in runs], max_tokens=48) for name in names}


def model_outputs(model: ir.Model, ids: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    session = SubmodelSession(model, {}, names)
    return session.run(graph_input_feeds(model.graph, ids))


def present_names(model: ir.Model) -> list[str]:
    return [v.name for v in model.graph.outputs if v.name.startswith("present")]


@pytest.mark.parametrize("all_linears", [False, True])
@pytest.mark.parametrize("method", ["smoothquant", "os+"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_smoothing_keeps_float_logits(tiny_models, kind, method, all_linears):
    model = load_model(tiny_models[kind]["onnx"])
    ids = np.array([1, 5, 9, 14, 3, 30, 7, 22, 41, 8, 12, 60], dtype=np.int64)
    before = model_outputs(model, ids, ["logits"])["logits"]
    layers = find_linear_layers(model)  # lm_head too: its bias Add lands on the graph output
    names = list(dict.fromkeys(l.input.name for l in layers))
    stats = capture_stats(model, names)
    weights_before = {l.name: l.weight_kn() for l in layers}
    smoothed_stats: dict[str, InputChannelStats] = {}
    report = smooth_linear_groups(model, layers, stats, method, 0.5, all_linears, smoothed_stats=smoothed_stats)

    after = model_outputs(model, ids, ["logits"])["logits"]
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=2e-4 * np.abs(before).max())
    for layer in layers:  # every linear was rescaled, except the ones whose group was skipped
        skipped = any(layer.name in entry["layers"] for entry in report["skipped"])
        assert np.array_equal(layer.weight_kn(), weights_before[layer.name]) == skipped

    folds = {name: g["fold"] for g in report["groups"] for name in g["layers"]}
    assert folds["model.layers.0.self_attn.q_proj"] == "norm weight model.layers.0.input_layernorm"
    assert folds["model.layers.1.mlp.down_proj"] == "output columns of model.layers.1.mlp.up_proj"
    o_proj = "model.layers.0.self_attn.o_proj"  # GQA: v_proj has half of o_proj's inputs
    if all_linears:
        assert folds[o_proj] == "explicit ops on the input" and not report["skipped"]
        o_group = next(g for g in report["groups"] if o_proj in g["layers"])
        # OS+: o_proj (no bias in either model) gets a bias Add for z W, then Sub z and Mul 1/s on its input.
        assert o_group["ops_added"] == (["Add", "Sub", "Mul"] if method == "os+" else ["Mul"])
    else:
        assert [s["layers"] for s in report["skipped"]] == [[o_proj], ["model.layers.1.self_attn.o_proj"]]
        assert "GQA" in report["skipped"][0]["reason"]
    if method == "smoothquant":
        assert report["ops_added"] == (2 if all_linears else 0)  # folds only: the graph gains no ops
    else:
        down = next(g for g in report["groups"] if "model.layers.0.mlp.down_proj" in g["layers"])
        assert (down["shift_absmax"] > 0) == all_linears  # no shift through the gated product unless explicit
    for group in report["groups"]:
        assert group["error_smoothed"] >= 0 and group["scale_min"] > 0

    # The edited graph is still understood: same linears, and the smoothed stats match a fresh capture.
    again = find_linear_layers(model)
    assert [l.name for l in again] == [l.name for l in layers]
    assert {l.input.name for l in again} == {l.input.name for l in layers}
    if method == "os+":
        assert all(l.bias is not None for l in again if any(l.name in g["layers"] and g["shift_absmax"] > 0 for g in report["groups"]))
    fresh = capture_stats(model, list(smoothed_stats))
    for name, entry in smoothed_stats.items():
        np.testing.assert_allclose(fresh[name].channel_max, entry.channel_max, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(fresh[name].channel_min, entry.channel_min, rtol=1e-3, atol=1e-4)


def test_auto_alpha_on_tiny_model(tiny_models):
    model = load_model(tiny_models["llama"]["onnx"])
    ids = np.arange(2, 30, dtype=np.int64)
    before = model_outputs(model, ids, ["logits"])["logits"]
    layers = [l for l in find_linear_layers(model) if l.layer_index == 0]
    stats = capture_stats(model, list(dict.fromkeys(l.input.name for l in layers)))
    report = smooth_linear_groups(model, layers, stats, "os+", "auto")
    for group in report["groups"]:
        assert group["alpha"] in [round(0.05 * i, 2) for i in range(21)]
        assert group["error_smoothed"] < group["error_unsmoothed"]
        # OS+ auto keeps the shift only where it beats the scale alone, and says so when it drops it.
        shift_dropped = any("shift dropped" in note for note in group["notes"])
        assert (group["method"] == "smoothquant") == shift_dropped == (group["shift_absmax"] == 0)
        stats_entry = stats[group["input"]]
        weights = [l.weight_kn() for l in find_linear_layers(load_model(tiny_models["llama"]["onnx"])) if l.name in group["layers"]]
        best_plain = search_alpha(stats_entry, weights, "smoothquant")[1]["error"]
        best_shift = search_alpha(stats_entry, weights, "os+")[1]["error"]
        if group["layers"][0].endswith("down_proj"):  # no shift can pass the gated product: scale only
            best_shift = np.inf
        assert group["error_smoothed"] == pytest.approx(min(best_plain, best_shift), rel=1e-9)
    assert all(("no alpha" in s["reason"]) or ("GQA" in s["reason"]) for s in report["skipped"])
    after = model_outputs(model, ids, ["logits"])["logits"]
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=2e-4 * np.abs(before).max())


@pytest.fixture(scope="module")
def tiny_mha_llama(tmp_path_factory):
    """A tiny Llama with as many KV heads as heads, so v_proj's outputs line up with o_proj's inputs."""
    from conftest import build_tiny_model
    from graphq.export import export

    root = tmp_path_factory.mktemp("mha")
    return export(build_tiny_model("llama", root / "hf", seed=1, kv_heads=4), root / "onnx")


@pytest.mark.parametrize("method", ["smoothquant", "os+"])
def test_o_proj_folds_into_v_proj_without_gqa(tiny_mha_llama, method):
    """o_proj's scales (and OS+ shift) go into v_proj; incremental decoding with the smoothed cache agrees."""
    model = load_model(tiny_mha_llama)
    ids = np.array([1, 5, 9, 14, 3, 30, 7, 22], dtype=np.int64)
    presents = present_names(model)
    before = model_outputs(model, ids, ["logits", *presents])
    layers = find_linear_layers(model)
    stats = capture_stats(model, list(dict.fromkeys(l.input.name for l in layers)))
    report = smooth_linear_groups(model, layers, stats, method, 0.5)
    assert not report["skipped"]
    folds = {name: g["fold"] for g in report["groups"] for name in g["layers"]}
    assert folds["model.layers.1.self_attn.o_proj"] == "output columns of model.layers.1.self_attn.v_proj"
    after = model_outputs(model, ids, ["logits", *presents])
    scale = np.abs(before["logits"]).max()
    np.testing.assert_allclose(after["logits"], before["logits"], rtol=1e-4, atol=2e-4 * scale)
    np.testing.assert_allclose(after["present.0.key"], before["present.0.key"], rtol=1e-4, atol=1e-4)
    assert not np.allclose(after["present.0.value"], before["present.0.value"])  # V is stored smoothed

    # Incremental decoding with the smoothed cache gives the same next-token logits.
    feeds = graph_input_feeds(model.graph, ids[:6])
    cached = SubmodelSession(model, {}, presents).run(feeds)
    step = {name: value for name, value in graph_input_feeds(model.graph, ids[6:7]).items()}
    step["attention_mask"] = np.ones((1, 7), dtype=np.int64)
    step["position_ids"] = np.array([[6]], dtype=np.int64)
    for name in presents:
        step[name.replace("present", "past_key_values")] = cached[name]
    logits = SubmodelSession(model, {}, ["logits"]).run(step)["logits"]
    np.testing.assert_allclose(logits[0, -1], before["logits"][0, 6], rtol=1e-4, atol=2e-4 * scale)


def layernorm_model(with_bias: bool, decomposed: bool = False) -> ir.Model:
    """x -> LayerNormalization(gain, bias?) -> {MatMul Wa, MatMul Wb + bias} -> outputs ya, yb.

    ``decomposed``: the gain and bias as the Mul + Add that exports below opset 17 end a LayerNorm with."""
    rng = np.random.default_rng(7)
    h = onnx.helper
    inits = [
        onnx.numpy_helper.from_array((rng.standard_normal(K) * 0.2 + 1).astype(np.float32), "gain"),
        onnx.numpy_helper.from_array(rng.standard_normal((K, 16)).astype(np.float32), "wa"),
        onnx.numpy_helper.from_array(rng.standard_normal((K, 24)).astype(np.float32), "wb"),
        onnx.numpy_helper.from_array(rng.standard_normal(24).astype(np.float32), "bb"),
    ]
    ln_inputs = ["x", "gain"]
    if with_bias:
        inits.append(onnx.numpy_helper.from_array((rng.standard_normal(K) * 3).astype(np.float32), "beta"))
        ln_inputs.append("beta")
    nodes = [h.make_node("LayerNormalization", ln_inputs, ["n"], name="/model/layers.0/ln/LayerNorm", axis=-1)]
    if decomposed:
        inits.append(onnx.numpy_helper.from_array(np.ones(K, np.float32), "unit"))
        nodes = [
            h.make_node("LayerNormalization", ["x", "unit"], ["plain"], name="/model/layers.0/ln/LayerNorm", axis=-1),
            h.make_node("Mul", ["plain", "gain"], ["scaled"], name="/model/layers.0/ln/Mul"),
            h.make_node("Add", ["beta", "scaled"], ["n"], name="/model/layers.0/ln/Add"),
        ]
    nodes += [
        h.make_node("MatMul", ["n", "wa"], ["ya"], name="/model/layers.0/attn/a_proj/MatMul"),
        h.make_node("MatMul", ["n", "wb"], ["mb"], name="/model/layers.0/attn/b_proj/MatMul"),
        h.make_node("Add", ["mb", "bb"], ["yb"], name="/model/layers.0/attn/b_proj/Add"),
    ]
    graph = h.make_graph(
        nodes, "ln", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, K])],
        [h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ("ya", "yb")], initializer=inits,
    )
    return ir.serde.deserialize_model(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]))


@pytest.mark.parametrize("with_bias,decomposed", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("method", ["smoothquant", "os+"])
def test_layernorm_gain_and_bias_absorb_scale_and_shift(method, with_bias, decomposed):
    model = layernorm_model(with_bias, decomposed)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((200, K)).astype(np.float32)
    x[:, 9] *= 30
    before = SubmodelSession(model, {"x": (np.float32, 2)}, ["ya", "yb", "n"]).run({"x": x})
    layers = find_linear_layers(model)
    stats = {"n": InputChannelStats.from_rows(before["n"])}
    report = smooth_linear_groups(model, layers, stats, method, 0.5)
    assert report["ops_added"] == (1 if method == "os+" else 0)  # OS+: a bias Add for a_proj, nothing else
    assert report["groups"][0]["fold"].startswith("norm weight and bias")
    assert report["groups"][0]["fold"].endswith("(Mul + Add)") == decomposed
    after = SubmodelSession(model, {"x": (np.float32, 2)}, ["ya", "yb", layers[0].input.name]).run({"x": x})
    for name in ("ya", "yb"):
        np.testing.assert_allclose(after[name], before[name], rtol=1e-4, atol=1e-4 * np.abs(before[name]).max())
    smoothed = after[layers[0].input.name]
    assert range_ratio(InputChannelStats.from_rows(smoothed)) < range_ratio(stats["n"])


def test_bad_arguments_are_one_line_errors(tiny_models):
    model = load_model(tiny_models["llama"]["onnx"])
    layers = find_linear_layers(model)[:3]
    stats = capture_stats(model, [layers[0].input.name])
    with pytest.raises(GraphqError, match="unknown smoothing method 'awq'"):
        smooth_linear_groups(model, layers, stats, "awq", 0.5)
    with pytest.raises(GraphqError, match="out of range"):
        smooth_linear_groups(model, layers, stats, "smoothquant", 1.5)
    with pytest.raises(GraphqError, match="not a number"):
        smooth_linear_groups(model, layers, stats, "smoothquant", "high")
    with pytest.raises(GraphqError, match="no calibration statistics"):
        smooth_linear_groups(model, find_linear_layers(model)[:4], stats, "smoothquant", 0.5)
    wrong = {layers[0].input.name: InputChannelStats.from_rows(np.ones((4, 8), np.float32))}
    with pytest.raises(GraphqError, match="different model"):
        smooth_linear_groups(model, layers, wrong, "smoothquant", 0.5)


@pytest.mark.real_model
def test_smollm2_os_plus_keeps_logits_and_lowers_w8a8_error(smollm2, austen):
    """The real model: every q/k/v, gate/up and down group smoothed (o_proj skipped: GQA), logits unchanged."""
    from graphq.calibration_data import calibration_samples
    from graphq.evaluate import read_text, token_windows
    from graphq.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(smollm2["onnx"])
    samples = calibration_samples(tokenizer, austen["calib"], num_samples=4, seq_len=96)
    window = token_windows(tokenizer, read_text(austen["eval"]), 64, 64)[0]
    model = load_model(smollm2["onnx"])
    before = model_outputs(model, window, ["logits"])["logits"]
    layers = [l for l in find_linear_layers(model) if l.role != "lm_head"]
    names = list(dict.fromkeys(l.input.name for l in layers))
    session = SubmodelSession(model, {}, names)
    runs = [session.run(graph_input_feeds(model.graph, ids)) for ids in samples]
    stats = {name: InputChannelStats.from_rows([run[name] for run in runs], max_tokens=256) for name in names}
    del runs, session
    report = smooth_linear_groups(model, layers, stats, "os+", 0.5)
    after = model_outputs(model, window, ["logits"])["logits"]
    np.testing.assert_allclose(after, before, rtol=1e-3, atol=1e-3 * np.abs(before).max())
    assert len(report["groups"]) == 90 and len(report["skipped"]) == 30
    assert all("o_proj" in s["layers"][0] for s in report["skipped"])
    # Per layer: an Add after each RMSNorm for -z/s and a bias Add for q, k, v, gate, up (the model has no biases).
    assert report["ops_added"] == 30 * 7
    ratio = [g["error_smoothed"] / g["error_unsmoothed"] for g in report["groups"]]
    assert np.median(ratio) < 0.7, np.median(ratio)


def test_smoothed_model_saves_and_quantizes_downstream(tiny_models, tmp_path):
    """A smoothed export (OS+, with bias Adds and an Add after each RMSNorm) goes through save, graphq.quantize and
    onnxruntime like any export: the later passes find the same linears."""
    import shutil

    from graphq import QuantConfig, quantize
    from graphq.runtimes.ort import OrtCausalLM

    source = tiny_models["qwen2"]["onnx"]
    model = load_model(source)
    layers = [l for l in find_linear_layers(model) if l.role != "lm_head"]
    stats = capture_stats(model, list(dict.fromkeys(l.input.name for l in layers)))
    report = smooth_linear_groups(model, layers, stats, "os+", 0.5)
    assert report["ops_added"] > 0
    smoothed_dir = tmp_path / "smoothed"
    smoothed_dir.mkdir()
    ir.save(model, smoothed_dir / "model.onnx", external_data="model.onnx.data")
    for extra in source.iterdir():
        if not extra.name.startswith("model.onnx"):
            shutil.copy(extra, smoothed_dir / extra.name)
    ids = np.array([1, 5, 9, 14, 3, 30, 7, 22, 41, 8], dtype=np.int64)
    reference = OrtCausalLM(source).logits(ids)
    np.testing.assert_allclose(OrtCausalLM(smoothed_dir).logits(ids), reference, rtol=1e-4, atol=2e-4 * np.abs(reference).max())
    config = QuantConfig(scheme="w8a16", group_size=-1, symmetric=True, format="qdq")
    result = quantize(smoothed_dir, config, tmp_path / "w8", progress=False)
    assert result.report["layers_quantized"] == len(find_linear_layers(load_model(source))) - 1  # lm_head float
    quantized = OrtCausalLM(result.output_dir).logits(ids)
    assert np.abs(quantized - reference).max() < 0.05 * np.abs(reference).max()
