"""One fold for AWQ and smoothing: scales folded past every reader of an input, so linears the scheme leaves out
(excluded, or under another scheme) still compute what they computed before."""

from __future__ import annotations

import numpy as np
import pytest

from graphq import QuantConfig, quantize
from graphq.linear_layers import find_linear_layers
from graphq.model_io import load_model, save_model
from graphq.runtimes.layerwise import LayerwiseCalibration
from graphq.runtimes.ort import OrtCausalLM
from graphq.selection import skip_reason
from graphq.weight_methods import quantize_region, resolve_methods, statistics_needed

SPLITS = [
    pytest.param(dict(exclude=["*.k_proj"]), id="exclude-k"),
    pytest.param(dict(exclude=["*.up_proj"]), id="exclude-up"),
    pytest.param(dict(exclude=["*.q_proj", "*.gate_proj"]), id="exclude-q-gate"),
    pytest.param(dict(scheme_overrides={"*.v_proj": "w8a16"}), id="override-v"),
    pytest.param(dict(scheme_overrides={"*.gate_proj": "w8a16", "*.k_proj": "w8a8"}), id="override-gate-k"),
]


def _samples(n: int, length: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.concatenate([[1], rng.integers(3, 90, size=length - 1)]) for _ in range(n)]


def awq_folded_float_model(source, config: QuantConfig, target):
    """Run AWQ's transforms (scale search + fold) and rounding on the scheme's linears, emit nothing, save the
    still-float model: it must compute what the source computes."""
    model = load_model(source / "model.onnx")
    layers = find_linear_layers(model)
    chosen = [l for l in layers
              if not skip_reason(l, config.exclude, config.quantize_lm_head) and config.scheme_for(l.name) == config.scheme]
    methods = resolve_methods(config.method)
    calibration = LayerwiseCalibration(model, chosen, _samples(4, 32), statistics_needed(methods))
    ratios = []
    for _, region_layers, stats in calibration:
        region = quantize_region(model, region_layers, stats, config.for_scheme(config.scheme), methods, layers)
        ratios += [r.entry.get("awq_ratio", 0.0) for r in region.layers.values()]
    save_model(model, target / "model.onnx")
    return target, ratios


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("split", SPLITS)
def test_awq_fold_keeps_float_logits_when_a_group_is_split(tiny_models, tmp_path, kind, split):
    source = tiny_models[kind]["onnx"]
    config = QuantConfig(scheme="w4a16", group_size=32, method="awq", **split).validate()
    folded, ratios = awq_folded_float_model(source, config, tmp_path)
    assert any(r > 0 for r in ratios), "no AWQ scale was folded: the test would prove nothing"
    ids = _samples(1, 24, seed=3)[0]
    before, after = OrtCausalLM(source / "model.onnx").logits(ids), OrtCausalLM(folded / "model.onnx").logits(ids)
    assert np.abs(after - before).max() < 1e-4 * max(1.0, np.abs(before).max())
    # The left-out linears were rescaled with the rest (their rows now differ from the source's).
    excluded = [l for l in find_linear_layers(load_model(folded / "model.onnx"))
                if l.role != "lm_head" and (skip_reason(l, config.exclude, False) or config.scheme_for(l.name) != config.scheme)]
    source_weights = {l.name: l.weight_kn() for l in find_linear_layers(load_model(source / "model.onnx"))}
    assert excluded and any(not np.allclose(l.weight_kn(), source_weights[l.name]) for l in excluded)


def test_awq_with_a_split_group_quantizes_and_runs(tiny_models, tmp_path):
    source = tiny_models["qwen2"]["onnx"]
    config = QuantConfig(scheme="w4a16", group_size=32, method="awq", exclude=["*.k_proj"],
                         scheme_overrides={"*.up_proj": "w8a16"}, calib_texts=["the cat sat on the mat. " * 8] * 4,
                         num_samples=4, seq_len=32)
    result = quantize(source, config, tmp_path / "out", progress=False)
    schemes = {e["name"]: e["scheme"] for e in result.report["layers"]}
    assert schemes["model.layers.0.self_attn.k_proj"] == "float" and schemes["model.layers.0.mlp.up_proj"] == "w8a16"
    logits = OrtCausalLM(result.output_dir).logits(_samples(1, 16)[0])
    reference = OrtCausalLM(source).logits(_samples(1, 16)[0])
    assert np.isfinite(logits).all()
    # 4-bit q/v/o/gate/down with float k and 8-bit up stays close to the float model on a tiny net.
    assert np.corrcoef(logits.ravel(), reference.ravel())[0, 1] > 0.9
