"""W4A8 (int4 per-group weights, int8 activations): static (per-tensor, calibrated) and dynamic (per token).

The onnxruntime output of the emitted graph is compared with a numpy fake-quant reference: the torch model with
each quantized linear's weight replaced by ``grid.fake_quantize_weight`` (4 bits, the run's group size) and its
input by ``grid.fake_quantize`` (the reported input_scale / input_offset) or ``grid.fake_quantize_per_token``.
Both sides round the same float32 numbers onto the same grids; what is left is float32 accumulation order (and
onnxruntime's DequantizeLinear + MatMul -> MatMulNBits fusion at ORT_ENABLE_ALL, which graphq's sessions run with
float activations). ATOL 1e-5 as in test_w8a8: a wrong zero point, block layout or rounding moves logits by far
more (quantization moves them by > 1e-3 here).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest

import graphq
from graphq.algorithms.grid import fake_quantize, fake_quantize_per_token, fake_quantize_weight
from graphq.cli import main as cli_main
from graphq.config import QuantConfig
from graphq.errors import GraphqError

from test_w8a8 import IDS, LEVELS, onnx_logits

KINDS = ["llama", "qwen2"]
GROUP = 32  # divides the tiny models' hidden (64) and intermediate (96) sizes
ATOL = 1e-5


@pytest.fixture(scope="module")
def float_models(tiny_models):
    import torch
    from transformers import AutoModelForCausalLM

    return {kind: AutoModelForCausalLM.from_pretrained(str(tiny_models[kind]["hf"]), dtype=torch.float32).eval()
            for kind in KINDS}


def reference_logits(float_model, layers: dict[str, dict] | None, symmetric: bool = False) -> np.ndarray:
    """Torch logits with the numpy fake quantization of every linear in ``layers`` (None: none quantized)."""
    import torch

    model = copy.deepcopy(float_model)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())

    def activation(entry):
        def hook(module, args):
            x = args[0].numpy()
            if entry["scheme"] == "w4a8":
                q = fake_quantize(x, entry["input_scale"], entry["input_offset"])
            else:
                q = fake_quantize_per_token(x)
            return (torch.from_numpy(q),)

        return hook

    with torch.no_grad():
        for name, module in model.named_modules():
            if layers is not None and isinstance(module, torch.nn.Linear) and name in layers:
                w_kn = module.weight.detach().numpy().T
                module.weight.copy_(torch.from_numpy(fake_quantize_weight(w_kn, 4, GROUP, symmetric).T.copy()))
                module.register_forward_pre_hook(activation(layers[name]))
        logits = model(input_ids=torch.as_tensor(IDS).reshape(1, -1), use_cache=False).logits[0]
    return logits.numpy()


def quantize(tiny_models, kind, tmp_path, scheme, name="q", **options):
    config = QuantConfig(scheme=scheme, group_size=GROUP, num_samples=4, seq_len=64, **options)
    return graphq.quantize(tiny_models[kind]["onnx"], config, tmp_path / name, progress=False)


def quantized_layers(report) -> dict[str, dict]:
    return {e["name"]: e for e in report["layers"] if "skipped" not in e}


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("scheme", ["w4a8", "w4a8-dynamic"])
@pytest.mark.parametrize("kind", KINDS)
def test_onnxruntime_equals_numpy_fake_quant(tiny_models, float_models, tiny_text, tmp_path, kind, scheme, symmetric):
    result = quantize(tiny_models, kind, tmp_path, scheme, calib=str(tiny_text), symmetric=symmetric,
                      save_format=["onnx"])
    proto = onnx.load(result.model_file)
    onnx.checker.check_model(proto)
    ops = [n.op_type for n in proto.graph.node]
    int4 = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
    weights = [t for t in proto.graph.initializer if t.name.endswith(".weight_quantized")]
    assert len(weights) == 14 and {t.data_type for t in weights} == ({onnx.TensorProto.INT4} if symmetric
                                                                    else {onnx.TensorProto.UINT4}) and int4
    blocked = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" and a.i == GROUP for a in n.attribute)]
    assert len(blocked) == 14
    assert "MatMulInteger" not in ops and "MatMulNBits" not in ops
    assert ops.count("QuantizeLinear") == (14 if scheme == "w4a8" else 0)
    layers = quantized_layers(result.report)
    assert len(layers) == 14
    for entry in layers.values():
        assert entry["scheme"] == scheme and entry["bits"] == 4 and entry["group_size"] == GROUP
        assert entry["symmetric"] is symmetric and entry["format"] == "qdq" and entry["method"] == "rtn"
        if scheme == "w4a8":
            assert entry["input_scale"] > 0 and -128 <= entry["input_offset"] <= 127
            assert entry["activations"].startswith("int8 per tensor, static")
        else:
            assert entry["activations"].startswith("int8 per token, dynamic")
    float_logits = reference_logits(float_models[kind], None)
    reference = reference_logits(float_models[kind], layers, symmetric)
    effect = float(np.abs(float_logits - reference).max())
    assert effect > 100 * ATOL, f"quantization changed the logits by only {effect:.3g}"
    for level in LEVELS:
        diff = float(np.abs(onnx_logits(result.model_file, level) - reference).max())
        assert diff < ATOL, f"{level}: onnxruntime vs numpy fake-quant max abs diff {diff:.3g} (effect {effect:.3g})"


def artifact_roundtrip(result, tmp_path, name="rebuilt") -> np.ndarray:
    from graphq.artifacts.rebuild import load_artifacts

    rebuilt = load_artifacts(result.output_dir, tmp_path / name)
    level = LEVELS[1]
    return float(np.abs(onnx_logits(rebuilt, level) - onnx_logits(result.model_file, level)).max())


@pytest.mark.parametrize("pack", [True, False], ids=["packed-v1", "unpacked-v0"])
@pytest.mark.parametrize("scheme", ["w4a8", "w4a8-dynamic"])
def test_mindie_artifacts_round_trip(tiny_models, tiny_text, tmp_path, scheme, pack):
    """The msModelSlim W4A8 layout (two-level scales, *_second tensors) rebuilds the quantized model exactly."""
    from graphq.artifacts.inspect import inspect_path
    from graphq.artifacts.reader import open_artifacts
    from graphq.artifacts.safetensors_io import SafetensorsStore

    result = quantize(tiny_models, "qwen2", tmp_path, scheme, calib=str(tiny_text), pack=pack)
    tag = scheme.replace("-", "_")
    description = json.loads((result.output_dir / f"quant_model_description_{tag}.json").read_text())
    assert description["model_quant_type"] == ("W4A8" if scheme == "w4a8" else "W4A8_DYNAMIC")
    assert ("version" in description) is pack  # msModelSlim's format version 1.0.0: int4 packed along n
    assert json.loads((result.output_dir / "config.json").read_text())["quantize"] == tag
    store = SafetensorsStore(result.output_dir, f"quant_model_weight_{tag}")
    prefix = "model.layers.0.self_attn.q_proj"  # qwen2: q has a bias
    down = "model.layers.0.mlp.down_proj"
    n, k = 64, 64
    expected = {
        "weight": ("I8", (n // 2, k) if pack else (n, k)),
        "weight_scale": ("F32", (n, 1)), "weight_offset": ("F32", (n, 1)),
        "weight_scale_second": ("F32", (n, k // GROUP)), "weight_offset_second": ("F32", (n, k // GROUP)),
    }
    if scheme == "w4a8":
        expected |= {"input_scale": ("F32", (1,)), "input_offset": ("F32", (1,))}
    if pack:
        expected["scale_bias"] = ("F32", (n, 1))
    for suffix, spec in expected.items():
        assert store.specs[f"{prefix}.{suffix}"] == spec, suffix
    assert description[f"{prefix}.bias"] == "FLOAT" and f"{prefix}.deq_scale" not in store.specs
    if pack:
        assert store.specs[f"{down}.scale_bias"] == ("F32", (64, 16))  # row-parallel
    first = store.get(f"{prefix}.weight_scale")
    assert np.all(np.log2(first) == np.round(np.log2(first)))  # the first level is a power of two
    artifacts = open_artifacts(result.output_dir)
    assert artifacts.group_size_of(prefix) == GROUP and artifacts.layer_schemes[down] == scheme
    # The two levels multiply back to the group scales the ONNX holds.
    proto = onnx.load(result.model_file)
    scales = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}[f"{prefix}.weight_scale"]
    assert np.array_equal(store.get(f"{prefix}.weight_scale_second") * first, scales.T)
    assert artifact_roundtrip(result, tmp_path) == 0.0
    (onnx_part, artifact_part) = inspect_path(result.output_dir)
    assert onnx_part.schemes[scheme].layers == 14 and artifact_part.schemes[scheme].layers == 14


def test_vllm_ascend_w4a8_dynamic_per_channel_round_trip(tiny_models, tmp_path):
    """vllm-ascend's W4A8_DYNAMIC (ascendV1 description, group_size 0 per channel: no *_second tensors)."""
    from graphq.artifacts.safetensors_io import SafetensorsStore

    config = QuantConfig(scheme="w4a8-dynamic", group_size=-1, target="vllm-ascend")
    result = graphq.quantize(tiny_models["llama"]["onnx"], config, tmp_path / "q", progress=False)
    description = json.loads((result.output_dir / "quant_model_description.json").read_text())
    assert (description["version"], description["model_quant_type"], description["group_size"]) == \
        ("1.0.0", "W4A8_DYNAMIC", 0)
    store = SafetensorsStore(result.output_dir, "quant_model_weight_w4a8_dynamic")
    prefix = "model.layers.0.mlp.down_proj"  # [64, 96]
    assert store.specs[f"{prefix}.weight"] == ("I8", (32, 96)) and store.specs[f"{prefix}.weight_scale"] == ("F32", (64, 1))
    assert f"{prefix}.weight_scale_second" not in store.specs
    assert artifact_roundtrip(result, tmp_path) == 0.0


def test_group_not_dividing_in_features_round_trips(tiny_models, tmp_path):
    """g64 on the tiny models' 96 intermediate channels: ceil(96 / 64) = 2 second-level scale columns (as W4A16's
    layout does); load-artifacts reads the group size back from them."""
    from graphq.artifacts.reader import open_artifacts

    config = QuantConfig(scheme="w4a8-dynamic", group_size=64)
    result = graphq.quantize(tiny_models["llama"]["onnx"], config, tmp_path / "q", progress=False)
    artifacts = open_artifacts(result.output_dir)
    down = "model.layers.0.mlp.down_proj"
    assert artifacts.store.specs[f"{down}.weight_scale_second"] == ("F32", (64, 2)) and artifacts.group_size_of(down) == 64
    assert artifact_roundtrip(result, tmp_path) == 0.0


def test_calibrated_weights_smoothing_and_fallback(tiny_models, tiny_text, tmp_path):
    """AWQ rounds the int4 weights under w4a8 (after SmoothQuant, on the smoothed model); --act-fallback keeps
    the worst input group's activations float (W4A16); the artifacts still rebuild the model exactly."""
    result = quantize(tiny_models, "llama", tmp_path, "w4a8", calib=str(tiny_text), method="awq",
                      smooth="smoothquant", act_fallback=1)
    layers = quantized_layers(result.report)
    assert {e["method"] for e in layers.values()} == {"awq"}
    assert all("output_error" in e and "output_error_rtn" in e for e in layers.values())
    # Static W4A8: AWQ's scale search scored the inputs on their per-tensor int8 grid too.
    assert all(e["awq_scored_activations"].startswith("int8 per tensor") for e in layers.values())
    assert result.report["smoothing"]["groups"]
    # The alpha search scored the weights on the grid they are rounded onto: int4 per group, not W8A8's int8.
    assert all(g["weight_grids"] == [f"int4 g{GROUP} asym"] for g in result.report["smoothing"]["groups"])
    fallback = [e for e in layers.values() if "activation_fallback" in e]
    assert fallback and {e["scheme"] for e in fallback} == {"w4a16"} and all("input_scale" not in e for e in fallback)
    assert {e["scheme"] for e in layers.values()} == {"w4a8", "w4a16"}
    assert artifact_roundtrip(result, tmp_path) == 0.0
    # AWQ beats RTN on the layers' own inputs (the point of calibrated weights under W4A8).
    assert np.mean([e["output_error"] for e in layers.values()]) < np.mean([e["output_error_rtn"] for e in layers.values()])


def test_smoothing_weight_grid_is_the_layers_own(tiny_models):
    """The grid the smoothing alpha search scores per layer: int4 per group (group size, symmetry) for W4A8,
    int8 per channel symmetric for a W8A8 layer given by scheme_overrides; a group covering K is per channel."""
    from graphq.activation_quantize import weight_grid
    from graphq.algorithms.smoothing import INT8_PER_CHANNEL, WeightGrid
    from graphq.linear_layers import find_linear_layers
    from graphq.model_io import load_model

    layers = {l.name: l for l in find_linear_layers(load_model(tiny_models["llama"]["onnx"]))}
    q, down = layers["model.layers.0.self_attn.q_proj"], layers["model.layers.0.mlp.down_proj"]
    config = QuantConfig(scheme="w4a8", group_size=GROUP, scheme_overrides={"*down_proj": "w8a8"}).validate()
    assert weight_grid(q, config) == WeightGrid(4, GROUP, False)
    assert weight_grid(down, config) == INT8_PER_CHANNEL
    sym = QuantConfig(scheme="w4a8-dynamic", group_size=128, symmetric=True).validate()
    assert weight_grid(q, sym) == WeightGrid(4, -1, True)  # 128 >= K = 64: per channel
    assert weight_grid(q, QuantConfig(scheme="w8a8").validate()) == INT8_PER_CHANNEL


def test_dynamic_with_gptq(tiny_models, tiny_text, tmp_path):
    result = quantize(tiny_models, "qwen2", tmp_path, "w4a8-dynamic", calib=str(tiny_text), method="gptq",
                      save_format=["onnx"])
    layers = quantized_layers(result.report)
    assert {e["method"] for e in layers.values()} == {"gptq"} and {e["scheme"] for e in layers.values()} == {"w4a8-dynamic"}


@pytest.mark.parametrize("options, phrase", [
    (dict(format="matmulnbits"), "is emitted as QDQ"),
    (dict(method="wanda", sparsity=0.5), "does not prune"),
])
def test_config_refusals(options, phrase):
    with pytest.raises(GraphqError, match=phrase):
        QuantConfig.from_dict({"scheme": "w4a8", **options})


def test_config_accepts_the_4bit_options():
    config = QuantConfig.from_dict({"scheme": "w4a8", "method": "awq+gptq", "group_size": 64, "symmetric": True,
                                    "smooth": "os+", "act_method": "mse", "act_fallback": 2})
    sub = config.for_scheme("w4a8")
    assert (sub.format, sub.method, sub.group_size, sub.is_symmetric, sub.bits) == ("qdq", "awq+gptq", 64, True, 4)
    assert not QuantConfig.from_dict({"scheme": "w4a8-dynamic"}).is_symmetric  # 4-bit default: asymmetric
    assert QuantConfig.from_dict({"scheme": "w4a8", "format": "qdq"}).format == "qdq"
    # A YAML without format, with flags on top: the default format is no explicit --format matmulnbits.
    assert QuantConfig(scheme="w4a8").validate().for_scheme("w4a8").format == "qdq"


def test_target_refusals_before_work(tiny_models, tmp_path, capsys):
    base = ["quantize", str(tiny_models["llama"]["onnx"]), "-o", str(tmp_path / "out"), "--quiet", "--seq-len", "64"]
    cases = [
        (["--scheme", "w4a8", "--target", "vllm-ascend", "--group-size", "32"], "no static W4A8 linear"),
        (["--scheme", "w4a8-dynamic", "--group-size", "64", "--target", "vllm-ascend"], "which group size 64 does not divide"),
        (["--scheme", "w4a8", "--format", "matmulnbits"], "is emitted as QDQ"),
        (["--scheme", "w4a8-dynamic", "--group-size", "32", "--target", "gguf"], "--target gguf has no layout for w4a8-dynamic"),
        (["--scheme", "w4a8-dynamic", "--group-size", "32", "--target", "compressed-tensors"],
         "--target compressed-tensors has no layout for w4a8-dynamic"),
    ]
    for extra, phrase in cases:
        capsys.readouterr()
        assert cli_main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and phrase in err[0], err
        assert not (tmp_path / "out").exists()
