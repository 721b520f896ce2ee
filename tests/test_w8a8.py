"""W8A8: activation range methods against numpy references, the streaming calibration engine (bounded memory),
W8A8 static / dynamic models in onnxruntime against a torch fake-quant reference at both optimisation levels,
KV-cache int8, mixed schemes, the constant-activation guard, and bad input.

Tolerance of the onnxruntime-vs-torch comparison: both round the same float32 numbers onto the same grids; what
is left is float32 accumulation order. Measured max |logit diff| over the 8 static/dynamic x level cases: 2.1e-7,
while quantization moves the logits by 4.4e-3 to 5.8e-2. ATOL = 1e-5 is ~50x above the noise; a wrong zero point,
scale, rounding mode or a saturating integer kernel moves logits by far more. (A float32 difference could flip
the rounding of an activation sitting exactly on a half step; none does on these inputs.)
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import graphq
from graphq.algorithms.activation_ranges import (
    ActivationStats,
    Histogram,
    entropy_threshold,
    fake_quantize,
    method_range,
    range_to_qparams,
)
from graphq.cli import main as cli_main
from graphq.config import QuantConfig
from graphq.runtimes.ort import session_options

KINDS = ["llama", "qwen2"]
IDS = np.random.default_rng(1).integers(3, 96, size=64)
ATOL = 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Range methods on known distributions.


def distributions() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    uniform = rng.uniform(-1.0, 3.0, size=(4000, 32)).astype(np.float32)
    gaussian = rng.normal(0.0, 1.0, size=(4000, 32)).astype(np.float32)
    gaussian[rng.integers(0, 4000, 6), rng.integers(0, 32, 6)] = [30, -25, 40, 22, -35, 28]  # rare outliers
    return {"uniform": uniform, "gaussian_outliers": gaussian}


def stats_of(x: np.ndarray, chunks: int = 7, reservoir: int = 0) -> ActivationStats:
    """Stream ``x`` in chunks through both passes, as the calibration engine does."""
    stats = ActivationStats(x.shape[1], reservoir_rows=reservoir, seed=0)
    for part in np.array_split(x, chunks):
        stats.add_ranges(part)
    stats.start_histogram()
    for part in np.array_split(x, chunks):
        stats.add_histogram(part)
    return stats


def true_mse(x: np.ndarray, lo: float, hi: float) -> float:
    qp = range_to_qparams(lo, hi)
    return float(np.mean((fake_quantize(x, qp.scale, qp.offset) - x) ** 2))


@pytest.mark.parametrize("name", ["uniform", "gaussian_outliers"])
def test_streaming_statistics_equal_whole_array_statistics(name):
    x = distributions()[name]
    stats = stats_of(x, reservoir=256)
    assert stats.min == x.min() and stats.max == x.max()
    np.testing.assert_array_equal(stats.channel_min, x.min(axis=0))
    np.testing.assert_array_equal(stats.channel_max, x.max(axis=0))
    limit = max(abs(x.min()), abs(x.max()))
    reference, _ = np.histogram(x, bins=len(stats.histogram.counts), range=(-limit, limit))
    # Bin assignment (float32 arithmetic) differs from numpy's (float64) only for values within rounding of an
    # edge, which land in the neighbouring bin: cumulative counts differ by a handful at most.
    assert np.abs(np.cumsum(stats.histogram.counts) - np.cumsum(reference)).max() <= 3
    assert stats.histogram.counts.sum() == x.size
    tokens = stats.tokens
    assert tokens.shape == (256 + 8, x.shape[1])  # the reservoir and the 8 rows of largest |x|
    assert np.abs(tokens).max() == np.abs(x).max()
    rows = {r.tobytes(): i for i, r in enumerate(x)}
    positions = np.array([rows[t.tobytes()] for t in tokens])  # every kept row is a real row...
    assert 0.35 < positions.mean() / len(x) < 0.65  # ...drawn from the whole stream, not only its start


@pytest.mark.parametrize("name", ["uniform", "gaussian_outliers"])
def test_minmax_and_percentile_match_numpy(name):
    x = distributions()[name]
    stats = stats_of(x)
    assert method_range(stats, "minmax") == (x.min(), x.max())
    bin_width = 2 * stats.histogram.limit / len(stats.histogram.counts)
    for p in (99.0, 99.9, 99.99):
        lo, hi = method_range(stats, "percentile", p)
        # In a sparse tail, numpy interpolates between order statistics and the histogram within a bin: accept
        # anything between the quantiles 10% of the tail mass either side, widened by one bin.
        d = 0.1 * (100 - p)
        lo_range = np.percentile(x, [100 - p - d, 100 - p + d])
        hi_range = np.percentile(x, [p - d, p + d])
        assert lo_range[0] - bin_width <= lo <= lo_range[1] + bin_width, (p, lo, lo_range)
        assert hi_range[0] - bin_width <= hi <= hi_range[1] + bin_width, (p, hi, hi_range)


@pytest.mark.parametrize("name", ["uniform", "gaussian_outliers"])
def test_mse_range_is_near_the_brute_force_optimum(name):
    x = distributions()[name]
    lo, hi = method_range(stats_of(x), "mse")
    found = true_mse(x, lo, hi)
    # Brute force on the raw values: both clip points on a grid of fractions of the extremes.
    grid = np.linspace(0.02, 1.0, 50)
    best = min(true_mse(x, x.min() * a, x.max() * b) for a in grid for b in grid)
    assert found <= 1.05 * best, (found, best)
    assert found <= 1.01 * true_mse(x, x.min(), x.max())
    if name == "uniform":
        assert hi > 0.95 * x.max() and lo < 0.95 * x.min()  # nothing worth clipping in a uniform


def test_mse_clips_a_heavy_tail():
    x = np.random.default_rng(3).standard_t(4, size=(4000, 32)).astype(np.float32)  # Student t, 4 dof
    lo, hi = method_range(stats_of(x), "mse")
    assert hi < 0.9 * x.max() and lo > 0.9 * x.min()
    assert true_mse(x, x.min(), x.max()) > 1.1 * true_mse(x, lo, hi)


def reference_entropy_threshold(abs_counts: np.ndarray, limit: float, target: int = 128) -> float:
    """TensorRT's KL calibration written out loop by loop (independent of the vectorised implementation)."""
    best_i, best_kl = None, np.inf
    n = len(abs_counts)
    for i in range(target, n + 1):
        p = [float(c) for c in abs_counts[:i]]
        p[-1] += float(abs_counts[i:].sum())
        q = [0.0] * i
        for level in range(target):
            members = [j for j in range(i) if (j * target) // i == level]
            total = sum(float(abs_counts[j]) for j in members)
            nonempty = [j for j in members if abs_counts[j] > 0]
            for j in nonempty:
                q[j] = total / len(nonempty)
        p_sum, q_sum = sum(p), sum(q)
        kl = sum((a / p_sum) * np.log((a / p_sum) / max(b / q_sum, 1e-12)) for a, b in zip(p, q) if a > 0)
        if kl < best_kl:
            best_kl, best_i = kl, i
    return (best_i + 0.5) * limit / n


def test_entropy_matches_loop_reference_and_clips_outliers():
    x = distributions()["gaussian_outliers"]
    limit = float(np.abs(x).max())
    counts, _ = np.histogram(np.abs(x), bins=512, range=(0, limit))
    assert entropy_threshold(counts, limit) == pytest.approx(reference_entropy_threshold(counts, limit))
    lo, hi = method_range(stats_of(x), "entropy")
    assert 2.5 < hi < 10 and -10 < lo < -2.5, (lo, hi)  # a few sigma, far below the outliers (22..40)


def test_constant_activations_get_a_positive_scale_and_a_note():
    zeros = range_to_qparams(0.0, 0.0)
    assert zeros.scale > 0 and zeros.note and "constant" in zeros.note
    assert np.all(fake_quantize(np.zeros(5), zeros.scale, zeros.offset) == 0)
    stats = stats_of(np.zeros((64, 8), dtype=np.float32), chunks=2)
    for method in ("minmax", "percentile", "entropy", "mse"):
        qp = range_to_qparams(*method_range(stats, method))
        assert qp.scale > 0 and np.isfinite(qp.scale) and qp.note, method
    constant = range_to_qparams(2.5, 2.5)  # widened to [0, 2.5]: a real range, exact at 2.5
    assert constant.scale == pytest.approx(2.5 / 255) and constant.note is None


# ---------------------------------------------------------------------------------------------------------------
# Whole models against torch.


@pytest.fixture(scope="module")
def float_models(tiny_models):
    import torch
    from transformers import AutoModelForCausalLM

    return {
        kind: AutoModelForCausalLM.from_pretrained(str(tiny_models[kind]["hf"]), dtype=torch.float32).eval()
        for kind in KINDS
    }


def int8_weight_torch(weight):
    """Per-output-channel symmetric int8: the largest magnitude lands on -128 (sign carried by the scale)."""
    import torch

    extreme = weight.gather(1, weight.abs().argmax(dim=1, keepdim=True))
    scale = extreme / -128.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.clamp(torch.round(weight / scale), -128, 127) * scale


def reference_logits(float_model, activation, layers: dict[str, dict] | None = None) -> np.ndarray:
    """Torch logits with every quantized nn.Linear's weight fake-quantized and its input quantized by
    ``activation(name, x)``."""
    import torch

    model = copy.deepcopy(float_model)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head" and (layers is None or name in layers):
                module.weight.copy_(int8_weight_torch(module.weight))
                module.register_forward_pre_hook(lambda m, args, name=name: (activation(name, args[0]),))
        logits = model(input_ids=torch.as_tensor(IDS).reshape(1, -1), use_cache=False).logits[0]
    return logits.numpy()


def static_activation(layers: dict[str, dict]):
    import torch

    def quantize(name, x):
        entry = layers[name]
        scale = torch.tensor(entry["input_scale"], dtype=torch.float32)
        offset = entry["input_offset"]
        q = torch.clamp(torch.round(x / scale) + offset, -128, 127)
        return (q - offset) * scale

    return quantize


def dynamic_activation(name, x):
    import torch

    scale = torch.clamp(x.abs().amax(dim=-1, keepdim=True), min=1e-12) / 127.0
    return torch.clamp(torch.round(x / scale), -127, 127) * scale


def onnx_logits(model_file, level: ort.GraphOptimizationLevel) -> np.ndarray:
    options = session_options()
    options.graph_optimization_level = level
    session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    feeds = {}
    for spec in session.get_inputs():
        if spec.name == "input_ids":
            feeds[spec.name] = IDS.reshape(1, -1).astype(np.int64)
        elif spec.name == "attention_mask":
            feeds[spec.name] = np.ones((1, len(IDS)), dtype=np.int64)
        elif spec.name == "position_ids":
            feeds[spec.name] = np.arange(len(IDS), dtype=np.int64).reshape(1, -1)
        else:
            feeds[spec.name] = np.zeros((1, spec.shape[1], 0, spec.shape[3]), dtype=np.float32)
    return session.run(["logits"], feeds)[0][0]


LEVELS = [ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL]


def assert_matches(model_file, reference, float_logits):
    effect = float(np.abs(float_logits - reference).max())
    assert effect > 100 * ATOL, f"quantization changed the logits by only {effect:.3g}"
    for level in LEVELS:
        logits = onnx_logits(model_file, level)
        diff = float(np.abs(logits - reference).max())
        assert diff < ATOL, f"{level}: onnxruntime vs torch fake-quant max abs diff {diff:.3g} (effect {effect:.3g})"


@pytest.mark.parametrize("kind", KINDS)
def test_w8a8_static_matches_torch_fake_quant(tiny_models, float_models, tiny_text, tmp_path, kind):
    config = QuantConfig(scheme="w8a8", act_method="percentile", percentile=99.9, calib=str(tiny_text),
                         num_samples=8, seq_len=64)
    result = graphq.quantize(tiny_models[kind]["onnx"], config, tmp_path / "q", progress=False)
    proto = onnx.load(result.model_file)
    onnx.checker.check_model(proto)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == 14 and ops.count("DequantizeLinear") == 28  # 2 decoder layers x 7
    layers = {e["name"]: e for e in result.report["layers"] if "skipped" not in e}
    assert len(layers) == 14
    for entry in layers.values():
        assert entry["input_scale"] > 0 and -128 <= entry["input_offset"] <= 127 and entry["bits"] == 8
        assert entry["activation_method"] == "percentile"
    # q/k/v read one input and get one range.
    for i in range(2):
        qkv = {layers[f"model.layers.{i}.self_attn.{p}_proj"]["input_scale"] for p in "qkv"}
        assert len(qkv) == 1
    assert result.report["integer_format"]["onnxruntime_kernel"].startswith("U8U8")
    float_logits = reference_logits(float_models[kind], lambda name, x: x, layers={})
    reference = reference_logits(float_models[kind], static_activation(layers), layers)
    assert_matches(result.model_file, reference, float_logits)


@pytest.mark.parametrize("kind", KINDS)
def test_w8a8_dynamic_matches_torch_fake_quant(tiny_models, float_models, tmp_path, kind):
    result = graphq.quantize(tiny_models[kind]["onnx"], QuantConfig(scheme="w8a8-dynamic"), tmp_path / "q",
                             progress=False)
    proto = onnx.load(result.model_file)
    onnx.checker.check_model(proto)
    assert [n.op_type for n in proto.graph.node].count("MatMulInteger") == 14
    float_logits = reference_logits(float_models[kind], lambda name, x: x, layers={})
    reference = reference_logits(float_models[kind], dynamic_activation)
    assert_matches(result.model_file, reference, float_logits)


def test_auto_reports_its_choice_and_kv_cache_int8(tiny_models, tiny_text, tmp_path):
    from graphq.runtimes.ort import OrtCausalLM

    source = tiny_models["qwen2"]["onnx"]
    config = QuantConfig(scheme="w8a8", act_method="auto", kv_cache="int8", calib=str(tiny_text), num_samples=6,
                         seq_len=64)
    result = graphq.quantize(source, config, tmp_path / "q", progress=False)
    report = json.loads((result.output_dir / "report.json").read_text())
    for entry in (e for e in report["layers"] if "skipped" not in e):
        errors = entry["activation_output_errors"]
        assert set(errors) == {"minmax", "percentile", "entropy", "mse"}
        assert entry["activation_method"] == min(errors, key=errors.get)
    assert sum(report["activation_calibration"]["methods_chosen"].values()) == 14
    kv = report["kv_cache"]
    assert kv["type"] == "int8" and sorted(kv["layers"]) == ["0", "1"]
    for entry in kv["layers"].values():
        for key in ("key_scale", "key_offset", "value_scale", "value_offset"):
            assert len(entry[key]) == 2  # per KV head
        assert all(s > 0 for s in entry["key_scale"] + entry["value_scale"])
    # The cache onnxruntime returns lies on the int8 grid of each head.
    model = OrtCausalLM(result.output_dir)
    names = [o.name for o in model.session.get_outputs() if o.name.startswith("present.")]
    outputs = model.session.run(names, model._feeds(IDS.reshape(1, -1), None, 0))
    for name, value in zip(names, outputs):
        _, layer, part = name.split(".")
        scale = np.asarray(kv["layers"][layer][f"{part}_scale"], dtype=np.float32)[None, :, None, None]
        offset = np.asarray(kv["layers"][layer][f"{part}_offset"])[None, :, None, None]
        q = value / scale + offset
        assert np.abs(q - np.round(q)).max() < 1e-3 and q.min() >= -128.001 and q.max() <= 127.001
    # Decoding with the int8 cache still follows the float model closely on this random tiny model.
    float_model = OrtCausalLM(source)
    agree = np.mean(model.logits(IDS).argmax(-1) == float_model.logits(IDS).argmax(-1))
    assert agree > 0.9


def test_mixed_schemes_by_pattern_from_yaml(tiny_models, tiny_text, tmp_path):
    config_file = tmp_path / "mixed.yaml"
    config_file.write_text(
        "scheme: w8a8\nact_method: minmax\nnum_samples: 4\nseq_len: 32\n"
        f"calib: {tiny_text}\nscheme_overrides:\n  '*down_proj': w8a16\nexclude: ['*layers.1.self_attn.o_proj']\n"
    )
    out = tmp_path / "q"
    assert cli_main(["quantize", str(tiny_models["llama"]["onnx"]), "-o", str(out), "--config", str(config_file),
                     "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    by_name = {e["name"]: e for e in report["layers"]}
    assert by_name["model.layers.0.mlp.down_proj"]["scheme"] == "w8a16"
    assert by_name["model.layers.0.mlp.down_proj"]["format"] == "matmulnbits"
    assert "input_scale" not in by_name["model.layers.0.mlp.down_proj"]
    assert by_name["model.layers.1.self_attn.o_proj"]["scheme"] == "float"
    assert by_name["model.layers.0.mlp.up_proj"]["scheme"] == "w8a8" and "input_scale" in by_name["model.layers.0.mlp.up_proj"]
    ops = [n.op_type for n in onnx.load(out / "model.onnx").graph.node]
    assert ops.count("MatMulNBits") == 2 and ops.count("QuantizeLinear") == 11
    onnx_logits(out / "model.onnx", LEVELS[0])  # runs


# ---------------------------------------------------------------------------------------------------------------
# Memory: calibration streams; peak RSS does not grow with the number of samples.

_RSS_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import onnx_ir as ir
    from graphq.calibration_data import calibration_samples
    from graphq.tokenizer import load_tokenizer
    from graphq.linear_layers import find_linear_layers
    from graphq.runtimes.activation_capture import ActivationCapture, kv_cache_outputs

    model_dir, text, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    model = ir.load(model_dir / "model.onnx")
    layers = [l for l in find_linear_layers(model) if l.role != "lm_head"]
    samples = calibration_samples(load_tokenizer(model_dir), path=text, num_samples=n, seq_len=256, seed=0)
    assert len(samples) == n
    capture = ActivationCapture(model, layers, kv_cache_outputs(model))
    result = capture.calibrate(samples, histograms=True, reservoir_rows=512)
    hwm = next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM"))
    print(hwm * 1024, result.peak_sample_bytes)
    """
)


def test_calibration_peak_memory_does_not_grow_with_samples(tiny_models, tiny_text):
    peaks = {}
    for n in (32, 128):
        proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tiny_models["llama"]["onnx"]), str(tiny_text), str(n)],
                              capture_output=True, text=True, check=True)
        peak, sample_bytes = map(int, proc.stdout.split())
        peaks[n] = peak
    kept_if_not_streamed = 96 * sample_bytes  # what 96 more samples' captured activations would add
    assert kept_if_not_streamed > 30 * 2**20
    growth = peaks[128] - peaks[32]
    assert growth < 0.1 * kept_if_not_streamed, (peaks, sample_bytes)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2.


def one_error(capsys, argv, *fragments):
    capsys.readouterr()
    code = cli_main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip() and "it/s" not in l and "\r" not in l]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("graphq: error: "), lines
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), lines[0]


def test_bad_input_is_one_line(capsys, tiny_models, tmp_path):
    model = tiny_models["llama"]["onnx"]
    out = tmp_path / "out"
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "   "}\n{"text": ""}\n')
    one_error(capsys, ["quantize", model, "-o", out, "--scheme", "w8a8", "--seq-len", 64, "--calib", empty],
              "no usable records")
    wrong_field = tmp_path / "field.jsonl"
    wrong_field.write_text('{"prompt": "hello there"}\n')
    one_error(capsys, ["quantize", model, "-o", out, "--scheme", "w8a8", "--seq-len", 64, "--calib", wrong_field],
              "field")
    one_error(capsys, ["quantize", model, "-o", out, "--scheme", "w8a8", "--seq-len", "1000"], "longer than", "256")
    one_error(capsys, ["quantize", model, "-o", out, "--scheme", "w8a8", "--act-method", "kl"], "activation method", "entropy")
    one_error(capsys, ["quantize", model, "-o", out, "--scheme", "w8a8", "--percentile", "20"], "--percentile")
    one_error(capsys, ["quantize", model, "-o", out, "--scheme", "w8a8", "--method", "gptq"], "rtn")
    one_error(capsys, ["quantize", model, "-o", out, "--kv-cache", "int4"], "kv-cache")
    one_error(capsys, ["quantize", model, "-o", out, "--smooth", "smoothquant"], "w8a8")
    one_error(capsys, ["quantize", model, "-o", out, "--scheme", "w8a8", "--smooth-alpha", "2"], "smooth-alpha")
    assert not out.exists()


def test_smoothing_and_fallback_in_the_w8a8_pipeline(tiny_models, tiny_text, tmp_path):
    """--smooth runs calibrate -> smooth -> range pass on the smoothed model -> emit; --act-fallback keeps the
    worst input groups' activations float. Both models run and stay close to float."""
    from graphq.runtimes.ort import OrtCausalLM

    source = tiny_models["llama"]["onnx"]
    float_logits = OrtCausalLM(source).logits(IDS)
    config = QuantConfig(scheme="w8a8", act_method="percentile", smooth="smoothquant", smooth_alpha=0.5,
                         act_fallback=2, calib=str(tiny_text), num_samples=6, seq_len=64)
    result = graphq.quantize(source, config, tmp_path / "q", progress=False)
    report = result.report
    smoothing = report["smoothing"]
    assert smoothing["method"] == "smoothquant" and smoothing["groups"]
    assert all(g["weight_grids"] == ["int8 per channel sym"] for g in smoothing["groups"])  # W8A8's weight grid
    assert report["activation_calibration"]["passes"] == 2  # ranges before smoothing, histograms after
    fallback = [e for e in report["layers"] if "activation_fallback" in e]
    groups = {tuple(sorted([e["name"], *e["shares_input_with"]])) for e in fallback}
    assert len(groups) == 2 and all(e["scheme"] == "w8a16" and "input_scale" not in e for e in fallback)
    quantized = [e for e in report["layers"] if e["scheme"] == "w8a8"]
    assert len(quantized) + len(fallback) == 14
    ranked = sorted((e for e in report["layers"] if "activation_worst_token_error" in e),
                    key=lambda e: -e["activation_worst_token_error"])
    assert {e["name"] for e in fallback} == {e["name"] for e in ranked[: len(fallback)]}
    ops = [n.op_type for n in onnx.load(result.model_file).graph.node]
    assert ops.count("QuantizeLinear") == len(quantized)
    logits = OrtCausalLM(result.output_dir).logits(IDS)
    assert 0 < np.abs(logits - float_logits).max() < 0.1
    assert np.mean(logits.argmax(-1) == float_logits.argmax(-1)) > 0.9


def test_kv_cache_int8_is_per_head_fake_quant_of_the_float_cache(tiny_models, tiny_text, tmp_path):
    """Reference check: layer 0's cache with --kv-cache int8 is exactly the per-head uint8 fake quantization (reported
    scale / offset) of the cache the same weights give without it; later layers then see the quantized cache."""
    from graphq.runtimes.ort import OrtCausalLM

    source = tiny_models["llama"]["onnx"]
    common = dict(scheme="w8a16", calib=str(tiny_text), num_samples=4, seq_len=48)
    plain = graphq.quantize(source, QuantConfig(**common), tmp_path / "plain", progress=False)
    with_kv = graphq.quantize(source, QuantConfig(kv_cache="int8", **common), tmp_path / "kv", progress=False)
    kv = with_kv.report["kv_cache"]["layers"]

    def present(path):
        model = OrtCausalLM(path)
        names = [o.name for o in model.session.get_outputs() if o.name.startswith("present.")]
        return dict(zip(names, model.session.run(names, model._feeds(IDS.reshape(1, -1), None, 0))))

    before, after = present(plain.output_dir), present(with_kv.output_dir)
    for part in ("key", "value"):
        scale = np.asarray(kv["0"][f"{part}_scale"], dtype=np.float32)[None, :, None, None]
        zero_point = np.asarray(kv["0"][f"{part}_offset"])[None, :, None, None] + 128
        x = before[f"present.0.{part}"]
        expected = (np.clip(np.round(x / scale) + zero_point, 0, 255) - zero_point) * scale
        np.testing.assert_allclose(after[f"present.0.{part}"], expected, rtol=1e-5, atol=1e-6)
        assert not np.allclose(expected, x)  # the cache really is quantized
    assert not np.allclose(after["present.1.key"], before["present.1.key"], atol=1e-6)
