"""Layer-by-layer calibration (capture in onnxruntime), AWQ scale folding, and the calibrated methods on tiny models."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from graphq import GraphqError, QuantConfig, quantize
from graphq.cli import main
from graphq.decoder_layers import decoder_regions
from graphq.export import export
from graphq.algorithms.awq import ChannelMagnitude
from graphq.algorithms.gptq import HessianAccumulator
from graphq.passes.fold import apply_fold, fold_target, input_readers
from graphq.linear_layers import find_linear_layers
from graphq.model_io import save_model
from graphq.runtimes.layerwise import LayerwiseCalibration, graph_input_feeds
from graphq.runtimes import submodel
from graphq.runtimes.ort import OrtCausalLM

from conftest import build_tiny_model

CALIB_TEXTS = [
    "the quick brown fox jumps over the lazy dog and then it rests in the sun for a while.",
    "she said that they would come home early, but the rain kept them at the old inn all night.",
    "numbers like 12 and 345 appear; so do marks: commas, colons; and 'quotes' (in brackets).",
] * 4


@pytest.fixture(scope="module")
def mha_qwen2(tmp_path_factory):
    """A tiny Qwen2 with as many KV heads as heads, so o_proj scales can fold into v_proj (which has a bias)."""
    root = tmp_path_factory.mktemp("mha")
    hf = build_tiny_model("qwen2", root / "hf", seed=3, kv_heads=4)
    export(hf, root / "onnx")
    return root / "onnx"


def _samples(n: int, length: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.concatenate([[1], rng.integers(3, 90, size=length - 1)]) for _ in range(n)]


@pytest.mark.parametrize("kind, user_buffers, skip_layer_0", [
    ("llama", False, False), ("qwen2", False, False), ("llama", True, False), ("llama", False, True)])
def test_captured_inputs_equal_the_full_model_activations(tiny_models, kind, user_buffers, skip_layer_0, monkeypatch):
    """skip_layer_0: no linear of decoder layer 0 is calibrated (all excluded), so the walk must still run it."""
    # Real models pass their large initializers to onnxruntime as user buffers; tiny ones only when forced.
    monkeypatch.setattr(submodel, "_USER_BUFFER_MIN_BYTES", 0 if user_buffers else 1 << 40)
    path = tiny_models[kind]["onnx"] / "model.onnx"
    model = ir.load(path)
    layers = find_linear_layers(model)  # lm_head included: the tail region is captured too
    if skip_layer_0:
        layers = [layer for layer in layers if layer.layer_index != 0]
    samples = _samples(3, 24)
    calibration = LayerwiseCalibration(model, layers, samples, {"hessian": HessianAccumulator, "magnitude": ChannelMagnitude},
                                       tokens_per_input=10**6)
    captured = {}
    for region, region_layers, stats in calibration:
        assert {l.layer_index for l in region_layers} == {region.index}
        for name, entry in stats.items():
            captured[name] = entry
    assert len(captured) == (1 if skip_layer_0 else 2) * 4 + 1  # per layer: attention input, o_proj input, MLP input, down_proj input; lm_head
    proto = onnx.load(str(path))
    for name in captured:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = {name: [] for name in captured}
    for ids in samples:
        for name, array in zip(captured, session.run(list(captured), graph_input_feeds(model.graph, ids))):
            reference[name].append(array.reshape(-1, array.shape[-1]))
    for name, entry in captured.items():
        full = np.concatenate(reference[name]).astype(np.float64)
        np.testing.assert_allclose(entry.token_sample(), full, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(entry.hessian.hessian(), 2 * full.T @ full / len(full), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(entry.magnitude.mean(), np.abs(full).mean(axis=0), rtol=1e-5)


def test_regions_split_the_decoder_into_layers(tiny_models):
    model = ir.load(tiny_models["llama"]["onnx"] / "model.onnx")
    regions = decoder_regions(model, find_linear_layers(model))
    assert [r.index for r in regions] == [0, 1, None]
    # Each layer hands exactly one hidden state to the next; the tail holds only what follows the last layer.
    assert len(regions[0].stream_outputs) == 1 and regions[0].stream_outputs[0] in regions[1].stream_inputs
    assert regions[1].stream_outputs[0] in regions[2].stream_inputs
    assert {n.op_type for n in regions[2].nodes} >= {"MatMul"} and "Gather" not in {n.op_type for n in regions[2].nodes}


@pytest.mark.parametrize("which", ["llama", "qwen2", "mha"])
def test_awq_scale_folding_leaves_float_logits_unchanged(tiny_models, mha_qwen2, tmp_path, which):
    source = mha_qwen2 if which == "mha" else tiny_models[which]["onnx"]
    ids = _samples(1, 20)[0]
    before = OrtCausalLM(source).logits(ids)
    model = ir.load(source / "model.onnx")
    layers = [l for l in find_linear_layers(model) if l.role != "lm_head"]
    rng = np.random.default_rng(1)
    folded_roles = set()
    for index in (0, 1):
        region = [l for l in layers if l.layer_index == index]
        readers, every = input_readers(model, region)
        for _, group in readers:
            scales = rng.uniform(0.25, 4.0, size=group[0].in_features).astype(np.float32)
            target = fold_target(group, every)
            if target["kind"] != "none":
                apply_fold(model, group, target, np.zeros_like(scales), scales)
                folded_roles.update(l.role for l in group)
    expected = {"q", "k", "v", "gate", "up", "down"} | ({"o"} if which == "mha" else set())
    assert folded_roles == expected
    save_model(model, tmp_path / "model.onnx")
    after = OrtCausalLM(tmp_path / "model.onnx").logits(ids)
    assert np.abs(after - before).max() < 1e-4 * max(1.0, np.abs(before).max())
    # The folds really rewrote the weights (so an unchanged logit is not an untouched model).
    folded = ir.load(tmp_path / "model.onnx")
    q_proj = next(l for l in find_linear_layers(folded) if l.name == "model.layers.0.self_attn.q_proj")
    original = next(l for l in find_linear_layers(ir.load(source / "model.onnx")) if l.name == q_proj.name)
    assert not np.allclose(q_proj.weight_kn(), original.weight_kn())


@pytest.mark.parametrize("method,fmt", [("awq", "matmulnbits"), ("gptq", "qdq"), ("awq+gptq", "matmulnbits")])
def test_calibrated_methods_beat_rtn_and_run_in_onnxruntime(tiny_models, tmp_path, method, fmt):
    source = tiny_models["qwen2"]["onnx"]
    config = QuantConfig(scheme="w4a16", group_size=32, symmetric=False, method=method, calib_texts=CALIB_TEXTS,
                         num_samples=12, seq_len=64, format=fmt)
    result = quantize(source, config, tmp_path / "out", progress=False)
    entries = [e for e in result.report["layers"] if "skipped" not in e]
    assert len(entries) == 14 and all(e["method"] == method for e in entries)
    error = np.mean([e["output_error"] for e in entries])
    rtn = np.mean([e["output_error_rtn"] for e in entries])
    assert error < 0.9 * rtn, (error, rtn)
    logits = OrtCausalLM(result.output_dir).logits(_samples(1, 16)[0])
    float_logits = OrtCausalLM(source).logits(_samples(1, 16)[0])
    assert np.isfinite(logits).all() and not np.allclose(logits, float_logits)
    assert result.report["peak_rss_bytes"] > 0


def test_calibrated_quantization_is_deterministic(tiny_models, tmp_path, capsys):
    source = tiny_models["llama"]["onnx"]
    config = QuantConfig(method="awq+gptq", group_size=32, calib_texts=CALIB_TEXTS, num_samples=6, seq_len=48, seed=7)
    first = quantize(source, config, tmp_path / "a", progress=False)
    # Under GQA o_proj's input channels are not v_proj's output channels: nothing absorbs its scales, and the user
    # is told so in one line instead of getting a silently different method.
    unscaled = [e["name"] for e in first.report["layers"] if "awq_skipped" in e]
    assert unscaled and all(name.endswith("o_proj") for name in unscaled)
    warning = [line for line in capsys.readouterr().err.splitlines() if "AWQ scales could not be folded" in line]
    assert len(warning) == 1 and f"for {len(unscaled)} linear layer(s), e.g. {unscaled[0]}" in warning[0]
    # down_proj's scales fold into up_proj's output columns: up_proj is marked so that verify compares it fairly.
    entries = {e["name"]: e for e in first.report["layers"]}
    rescaled = {name for name, e in entries.items() if e.get("output_rescaled")}
    folded_down = {name for name, e in entries.items() if name.endswith("down_proj") and e.get("awq_ratio")}
    assert rescaled and rescaled == {name.replace("down_proj", "up_proj") for name in folded_down}
    second = quantize(source, config, tmp_path / "b", progress=False)
    a, b = ir.load(first.model_file), ir.load(second.model_file)
    for name, value in a.graph.initializers.items():
        np.testing.assert_array_equal(value.const_value.numpy(), b.graph.initializers[name].const_value.numpy())


def test_too_few_calibration_tokens_warn_and_still_give_a_valid_model(tiny_models, tmp_path):
    source = tiny_models["llama"]["onnx"]
    config = QuantConfig(method="gptq", group_size=32, calib_texts=["a short one."], num_samples=1, seq_len=16)
    result = quantize(source, config, tmp_path / "out", progress=False)
    warnings = [w for e in result.report["layers"] for w in e.get("warnings", [])]
    assert any("rank-deficient" in w for w in warnings)
    assert np.isfinite(OrtCausalLM(result.output_dir).logits(_samples(1, 8)[0])).all()


def test_missing_calibration_file_is_one_clear_error(tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["quantize", str(tiny_models["llama"]["onnx"]), "-o", str(out), "--method", "awq",
                 "--calib", str(tmp_path / "nope.txt"), "--seq-len", "64", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nope.txt does not exist" in err[0]
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_sequence_longer_than_the_context_is_refused(tiny_models, tmp_path):
    config = QuantConfig(method="gptq", calib_texts=CALIB_TEXTS, seq_len=512)  # the tiny models hold 256 positions
    with pytest.raises(GraphqError, match="longer than the model's context of 256"):
        quantize(tiny_models["llama"]["onnx"], config, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_calibration_jsonl_without_the_field_is_refused(tiny_models, tmp_path):
    calib = tmp_path / "calib.jsonl"
    calib.write_text(json.dumps({"prompt": "hello"}) + "\n")
    config = QuantConfig(method="awq", calib=str(calib), seq_len=64)
    with pytest.raises(GraphqError, match="no 'text'"):
        quantize(tiny_models["llama"]["onnx"], config, tmp_path / "out", progress=False)


def test_the_tail_is_left_out_unless_a_linear_there_is_calibrated(tiny_models):
    """A tied lm_head reads the transposed embedding; walking the tail for nothing held it per sample (memory)."""
    model = ir.load(tiny_models["qwen2"]["onnx"] / "model.onnx")
    every = find_linear_layers(model)
    decoder = [layer for layer in every if layer.layer_index is not None]
    without = LayerwiseCalibration(model, decoder, _samples(2, 8), {}, all_layers=every)
    assert [r.index for r in without.regions] == [0, 1]
    with_tail = LayerwiseCalibration(model, every, _samples(2, 8), {}, all_layers=every)
    assert [r.index for r in with_tail.regions] == [0, 1, None] or not any(l.layer_index is None for l in every)


def _capture_with_damaged_weights(source, propagate: str) -> dict[str, np.ndarray]:
    """Every linear input's captured Gram, each layer's weights scrambled after its capture (a stand-in for
    quantization that no later layer could miss)."""
    from graphq.algorithms.awq import InputGram
    from graphq.passes.weights import set_layer_weight

    model = ir.load(source / "model.onnx")
    layers = [layer for layer in find_linear_layers(model) if layer.layer_index is not None]
    calibration = LayerwiseCalibration(model, layers, _samples(3, 16), {"gram": InputGram}, propagate=propagate)
    grams = {}
    for _, region_layers, stats in calibration:
        grams.update({name: entry.gram.gram() for name, entry in stats.items()})
        for layer in region_layers:
            set_layer_weight(model, layer, layer.weight_kn()[::-1].copy())
    return grams


def test_float_propagation_calibrates_later_layers_on_the_float_models_activations(tiny_models):
    """propagate='float' hands each layer the float model's hidden states whatever was done to the layers before it
    (one onnxruntime run a layer); 'quantized' hands it the edited layers' outputs."""
    source = tiny_models["llama"]["onnx"]
    float_run = _capture_with_damaged_weights(source, "float")
    quantized_run = _capture_with_damaged_weights(source, "quantized")
    model = ir.load(source / "model.onnx")
    layers = [layer for layer in find_linear_layers(model) if layer.layer_index is not None]
    from graphq.algorithms.awq import InputGram

    undamaged = {}
    for _, _, stats in LayerwiseCalibration(model, layers, _samples(3, 16), {"gram": InputGram}):
        undamaged.update({name: entry.gram.gram() for name, entry in stats.items()})
    assert float_run.keys() == quantized_run.keys() == undamaged.keys() and len(undamaged) == 8
    for name in undamaged:
        np.testing.assert_array_equal(float_run[name], undamaged[name])
    first_layer = {layer.input.name for layer in layers if layer.layer_index == 0}
    for name in undamaged:
        if name in first_layer:
            np.testing.assert_array_equal(quantized_run[name], undamaged[name])
        else:
            assert not np.allclose(quantized_run[name], undamaged[name], rtol=1e-3)
    for unresolved in ("fp32", "auto"):  # auto is the caller's to resolve per method sequence
        with pytest.raises(ValueError, match="propagate"):
            LayerwiseCalibration(model, layers, _samples(1, 8), {}, propagate=unresolved)


def test_propagate_option_reaches_the_engine_and_bad_values_are_refused(tiny_models, tmp_path, capsys):
    source = tiny_models["llama"]["onnx"]
    base = dict(method="awq", group_size=32, calib_texts=CALIB_TEXTS, num_samples=4, seq_len=32)
    fast = quantize(source, QuantConfig(**base, propagate="float"), tmp_path / "float", progress=False)
    slow = quantize(source, QuantConfig(**base, propagate="quantized"), tmp_path / "quantized", progress=False)
    entries = [{e["name"]: e for e in r.report["layers"]} for r in (fast, slow)]
    first = [name for name in entries[0] if ".layers.0." in name]
    later = [name for name in entries[0] if ".layers.1." in name]
    assert first and later
    for name in first:  # the first layer sees the same inputs either way
        assert entries[0][name]["output_error"] == entries[1][name]["output_error"]
    assert any(entries[0][name]["output_error"] != entries[1][name]["output_error"] for name in later)
    # auto (the default): float for awq alone, quantized as soon as gptq is in the sequence
    default = quantize(source, QuantConfig(**base), tmp_path / "auto", progress=False)
    assert [e["output_error"] for e in default.report["layers"] if "skipped" not in e] == \
        [e["output_error"] for e in fast.report["layers"] if "skipped" not in e]
    errors = {}
    for propagate in ("auto", "quantized", "float"):
        run = quantize(source, QuantConfig(**{**base, "method": "awq+gptq"}, propagate=propagate),
                       tmp_path / f"awq-gptq-{propagate}", progress=False)
        errors[propagate] = [e["output_error"] for e in run.report["layers"] if "skipped" not in e]
    assert errors["auto"] == errors["quantized"] != errors["float"]
    assert main(["quantize", str(source), "-o", str(tmp_path / "bad"), "--method", "awq", "--propagate", "fp16"]) != 0
    assert "--propagate" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    with pytest.raises(GraphqError, match="unknown --propagate 'fp16'"):
        QuantConfig(method="awq", propagate="fp16").validate()


def test_per_channel_awq_scores_on_the_whole_gram(tiny_models, tmp_path):
    """Group -1 is one group of every input channel: AWQ's block-diagonal scoring is then the whole Gram's."""
    config = QuantConfig(method="awq", group_size=-1, calib_texts=CALIB_TEXTS, num_samples=4, seq_len=32)
    result = quantize(tiny_models["llama"]["onnx"], config, tmp_path / "out", progress=False)
    entries = [e for e in result.report["layers"] if "output_error" in e]
    assert entries and all(e["output_error"] <= e["output_error_rtn"] * 1.0001 for e in entries)
    assert any(e.get("awq_ratio") for e in entries)
