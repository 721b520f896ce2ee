"""Sensitivity analysis and the precision plans it drives (--disable-level, --target-bits), on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest

from graphq import GraphqError, QuantConfig, quantize
from graphq.algorithms.mixed_precision import WeightGrid, bits_budget_plan
from graphq.cli import main
from graphq.linear_layers import find_linear_layers
from graphq.model_io import copy_side_files, load_model, save_model
from graphq.passes.weights import set_layer_weight, set_norm_weight
from graphq.sensitivity import SensitivityReport, analyze

DAMAGED = "model.layers.0.self_attn.v_proj"


@pytest.fixture(scope="module")
def damaged_model(tiny_models, tmp_path_factory):
    """The tiny Llama with one linear that RTN cannot represent: a huge weight in the first row of every group of
    32 inputs, on input channels the norm before it zeroes (so the float model does not see them), which stretches
    every group's range until 4-bit rounding flattens the layer's useful weights to zero."""
    source = tiny_models["llama"]["onnx"]
    target = tmp_path_factory.mktemp("damaged")
    model = load_model(source / "model.onnx")
    layer = next(l for l in find_linear_layers(model) if l.name == DAMAGED)
    gain = layer.norm_weight.const_value.numpy().copy()
    gain[::32] = 0.0
    set_norm_weight(model, layer, gain)
    weight = layer.weight_kn().copy()
    weight[::32] = 100.0 * np.abs(weight).max()
    set_layer_weight(model, layer, weight)
    save_model(model, target / "model.onnx")
    copy_side_files(source, target)
    return target


def test_a_damaged_layer_ranks_first_and_the_report_round_trips(damaged_model, tiny_text, tmp_path):
    config = QuantConfig(scheme="w4a16", group_size=32, calib=str(tiny_text), seq_len=64)
    report = analyze(damaged_model, config, num_windows=2, progress=False)
    assert report.ranking[0] == DAMAGED
    assert len(report.layers) == 14  # 2 layers x 7 linears, lm_head float
    first, rest = report.layers[0], report.layers[1:]
    assert first.kl > 10 * max(e.kl for e in rest) and first.proxy > max(e.proxy for e in rest)
    assert all(e.kl >= 0 and 0 <= e.top1_agreement <= 1 for e in report.layers)
    again = SensitivityReport.load(report.save(tmp_path / "s.json"))
    assert again.ranking == report.ranking and again.layers[0].kl == first.kl
    # Deterministic: the same windows give the same numbers.
    assert analyze(damaged_model, config, num_windows=2, progress=False).layers[0].kl == first.kl


@pytest.mark.parametrize("scheme", ["w4a16", "w8a16", "w8a8", "w8a8-dynamic"])
def test_disable_level_keeps_exactly_the_n_most_sensitive_float(tiny_models, tiny_text, tmp_path, scheme):
    source = tiny_models["qwen2"]["onnx"]
    base = dict(scheme=scheme, group_size=32, calib=str(tiny_text), num_samples=4, seq_len=64)
    ranking = analyze(source, QuantConfig(**base), num_windows=2, progress=False).ranking
    result = quantize(source, QuantConfig(**base, disable_level=3, sensitivity_windows=2), tmp_path / "q", progress=False)
    planned = [e for e in result.report["layers"] if "precision_plan" in e]
    assert sorted(e["name"] for e in planned) == sorted(ranking[:3])
    assert all(e["scheme"] == "float" and "skipped" in e for e in planned)
    assert result.report["layers_quantized"] == 14 - 3
    assert result.report["precision_plan"]["kind"] == "disable_level"


def test_disable_level_with_a_fallback_scheme_and_a_saved_ranking(tiny_models, tiny_text, tmp_path):
    source = tiny_models["llama"]["onnx"]
    sensitivity = tmp_path / "sensitivity.json"
    assert main(["analyze", str(source), "-o", str(sensitivity), "--scheme", "w4a16", "--group-size", "32",
                 "--calib", str(tiny_text), "--windows", "2", "--seq-len", "64", "--quiet"]) == 0
    ranking = SensitivityReport.load(sensitivity).ranking
    config = QuantConfig(scheme="w4a16", group_size=32, disable_level=2, fallback_scheme="w8a16",
                         sensitivity_file=str(sensitivity))
    result = quantize(source, config, tmp_path / "q", progress=False)
    schemes = {e["name"]: e["scheme"] for e in result.report["layers"]}
    assert [name for name in ranking if schemes[name] == "w8a16"] == ranking[:2]
    assert sum(s == "w4a16" for s in schemes.values()) == 12
    # A ranking made for another scheme is refused in one line.
    with pytest.raises(GraphqError, match="ranks linears under w4a16"):
        quantize(source, QuantConfig(scheme="w8a16", disable_level=1, sensitivity_file=str(sensitivity)),
                 tmp_path / "q2", progress=False)


def test_target_bits_spends_the_budget_on_the_most_sensitive(tiny_models, tiny_text, tmp_path):
    source = tiny_models["llama"]["onnx"]
    config = QuantConfig(scheme="w4a16", group_size=32, target_bits=6.0, calib=str(tiny_text), seq_len=64,
                         sensitivity_windows=2)
    result = quantize(source, config, tmp_path / "q", progress=False)
    layers = [e for e in result.report["layers"] if "skipped" not in e]
    grids = {e["scheme"]: WeightGrid(e["bits"], e["group_size"], e["symmetric"]) for e in layers}  # as quantized
    assert grids["w8a16"] == WeightGrid(8, 32, True)
    total = sum(grids[e["scheme"]].storage_bits(e["in_features"], e["out_features"]) for e in layers)
    weights = sum(e["in_features"] * e["out_features"] for e in layers)
    assert total / weights <= 6.0
    assert result.report["precision_plan"]["bits_per_weight"] == pytest.approx(total / weights, abs=1e-4)
    upgraded = [e for e in layers if e["scheme"] == "w8a16"]
    assert upgraded and len(upgraded) < len(layers)
    # No linear left at 4 bits would still fit in the budget (the greedy plan used it up).
    spare = 6.0 * weights - total
    for e in layers:
        if e["scheme"] == "w4a16":
            extra = grids["w8a16"].storage_bits(e["in_features"], e["out_features"]) - \
                grids["w4a16"].storage_bits(e["in_features"], e["out_features"])
            assert extra > spare


def test_budget_plan_arithmetic_and_refusals():
    shapes = {"a": (64, 64), "b": (64, 128), "c": (128, 64)}
    base, up = WeightGrid(4, 32, False), WeightGrid(8, -1, True)
    # Base 5.125 bits/weight; b (most sensitive) would overshoot 6.0 and is passed over for a; c then no longer fits.
    chosen, reached = bits_budget_plan(["b", "a", "c"], shapes, base, up, 6.0)
    assert chosen == ["a"] and reached == pytest.approx((5.125 * 20480 + 3.375 * 4096) / 20480)
    with pytest.raises(ValueError, match="already takes"):
        bits_budget_plan(["a"], shapes, base, up, 4.0)
    # By cost per extra bit: two small linears with 0.4 and 0.3 of the large one's cost beat it at a budget that
    # holds either the two small ones or the large one.
    shapes = {"large": (128, 128), "small1": (64, 64), "small2": (64, 64), "rest": (256, 256)}
    costs = {"large": 1.0, "small1": 0.4, "small2": 0.3, "rest": 0.0}
    ranking = ["large", "small1", "small2", "rest"]
    budget = (sum(base.storage_bits(*v) for v in shapes.values())
              + up.storage_bits(128, 128) - base.storage_bits(128, 128)) / sum(k * n for k, n in shapes.values())
    assert bits_budget_plan(ranking, shapes, base, up, budget)[0] == ["large"]
    chosen, reached = bits_budget_plan(ranking, shapes, base, up, budget, costs=costs)
    assert chosen == ["small1", "small2"] and reached <= budget
    with pytest.raises(GraphqError, match="--target-bits mixes weight-only"):
        QuantConfig(scheme="w8a8", target_bits=6.0).validate()
    with pytest.raises(GraphqError, match="give one"):
        QuantConfig(target_bits=4.5, disable_level=2).validate()


def test_kl_equals_a_model_with_only_that_linear_quantized(tiny_models, tiny_text, tmp_path):
    """The switch graph, run from the linear's own decoder layer, measures what a separately built model with that
    one linear fake-quantized gives end to end."""
    from graphq.algorithms.rtn import quantize_rtn
    from graphq.calibration_data import calibration_samples
    from graphq.evaluate import log_softmax
    from graphq.runtimes.ort import OrtCausalLM
    from graphq.tokenizer import load_tokenizer

    source = tiny_models["qwen2"]["onnx"]
    config = QuantConfig(scheme="w4a16", group_size=32, calib=str(tiny_text), seq_len=64)
    report = analyze(source, config, num_windows=2, progress=False)
    windows = calibration_samples(load_tokenizer(source), path=str(tiny_text), num_samples=2, seq_len=64, seed=0,
                                  max_context=256)
    reference = OrtCausalLM(source)
    for entry in (report.layers[0], report.layers[-1], next(e for e in report.layers if e.layer_index == 1)):
        model = load_model(source / "model.onnx")
        layer = next(l for l in find_linear_layers(model) if l.name == entry.name)
        set_layer_weight(model, layer, quantize_rtn(layer.weight_kn(), 4, 32, False).dequantize())
        (tmp_path / entry.name).mkdir()
        save_model(model, tmp_path / entry.name / "model.onnx")
        candidate = OrtCausalLM(tmp_path / entry.name / "model.onnx")
        kl = positions = 0
        for ids in windows:
            p, q = log_softmax(reference.logits(ids)), log_softmax(candidate.logits(ids))
            kl += float((np.exp(p) * (p - q)).sum())
            positions += len(ids)
        assert entry.kl == pytest.approx(kl / positions, rel=1e-3, abs=1e-9)
