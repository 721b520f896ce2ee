"""Both output formats on both tiny models: valid ONNX, loadable in onnxruntime, and logits equal to the torch
model with every quantized nn.Linear replaced by its fake-quantized weight (computed here, independently, in torch).

Tolerance: graphq and the torch reference round the same float32 numbers, so the only difference left is the
order of float32 accumulation in the matmuls. Measured: max |logit diff| <= 2.1e-7 over all 16 combinations
(logits are ~1 in size), while quantizing changes the logits by 3.7e-3 (w8 per-channel) to 7e-2 (w4 g32).
ATOL = 1e-5 is ~50x above the noise and ~370x below the smallest quantization effect; each test also asserts the
effect is far above ATOL, so a float (unquantized) model or a wrong grid would fail.
"""

from __future__ import annotations

import copy
import hashlib
import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import graphq
from graphq.cli import main as cli_main
from graphq.config import QuantConfig
from graphq.linear_layers import find_linear_layers
from graphq.runtimes.ort import OrtCausalLM

ATOL = 1e-5
KINDS = ["llama", "qwen2"]
FORMATS = ["matmulnbits", "qdq"]
# id -> (scheme, bits, group_size, symmetric)
SCHEMES = {
    "w4-g32-sym": ("w4a16", 4, 32, True),
    "w4-g32-asym": ("w4a16", 4, 32, False),
    "w8-perchannel-sym": ("w8a16", 8, -1, True),
    "w4-g128-asym": ("w4a16", 4, 128, False),  # 128 > K (64 and 96): one group per column
}
IDS = np.random.default_rng(0).integers(3, 96, size=48)


def fake_quantize(weight, bits: int, group_size: int, symmetric: bool):
    """A torch nn.Linear weight [out, in] fake-quantized in groups along the input dim (float32 math)."""
    import torch

    w = weight.detach().to(torch.float32)
    k = w.shape[1]
    if group_size == -1 or group_size > k:
        group_size = k
    out = torch.empty_like(w)
    for start in range(0, k, group_size):
        g = w[:, start : start + group_size]
        if symmetric:
            # The value of largest magnitude (first on ties) lands on -2^(b-1); the scale carries its sign.
            qmin = -(2 ** (bits - 1))
            extreme = g.gather(1, g.abs().argmax(dim=1, keepdim=True))
            scale = extreme / qmin
            scale = torch.where(scale == 0, torch.ones_like(scale), scale)
            q = torch.clamp(torch.round(g / scale), qmin, -qmin - 1)
            out[:, start : start + group_size] = q * scale
        else:
            qmax = 2**bits - 1
            low = g.amin(dim=1, keepdim=True).clamp(max=0)
            high = g.amax(dim=1, keepdim=True).clamp(min=0)
            scale = (high - low) / qmax
            scale = torch.where(scale == 0, torch.ones_like(scale), scale)
            zero = torch.clamp(torch.round(-low / scale), 0, qmax)
            q = torch.clamp(torch.round(g / scale) + zero, 0, qmax)
            out[:, start : start + group_size] = (q - zero) * scale
    return out


@pytest.fixture(scope="module")
def float_models(tiny_models):
    import torch
    from transformers import AutoModelForCausalLM

    return {
        kind: AutoModelForCausalLM.from_pretrained(str(tiny_models[kind]["hf"]), dtype=torch.float32).eval()
        for kind in KINDS
    }


def torch_logits(model) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.as_tensor(IDS).reshape(1, -1), use_cache=False).logits[0].numpy()


def fake_quantized_logits(float_model, bits, group_size, symmetric, skip=lambda name: name == "lm_head"):
    import torch

    model = copy.deepcopy(float_model)
    if model.config.tie_word_embeddings:  # quantizing lm_head must not touch the embedding table
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    done = []
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not skip(name):
                module.weight.copy_(fake_quantize(module.weight, bits, group_size, symmetric))
                done.append(name)
    return torch_logits(model), done


def assert_logits_match(onnx_logits, reference, float_logits):
    assert onnx_logits.shape == reference.shape
    diff = float(np.abs(onnx_logits - reference).max())
    effect = float(np.abs(float_logits - reference).max())
    assert diff < ATOL, f"onnxruntime vs torch fake-quant: max abs diff {diff:.3g} (quantization effect {effect:.3g})"
    assert effect > 100 * ATOL, f"quantization changed the logits by only {effect:.3g}"


def tree_hashes(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def input_hashes(tiny_models):
    return {kind: tree_hashes(tiny_models[kind]["onnx"]) for kind in KINDS}


def expected_weight_bytes(k, n, bits, group_size, symmetric):
    n_groups = -(-k // (k if group_size == -1 else group_size))
    total_bits = k * n * bits + n_groups * n * 32 + (0 if symmetric else n_groups * n * bits)
    return total_bits // 8


@pytest.mark.parametrize("scheme_id", list(SCHEMES))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_torch_fake_quant(tiny_models, float_models, input_hashes, tmp_path, kind, fmt, scheme_id):
    scheme, bits, group_size, symmetric = SCHEMES[scheme_id]
    source = tiny_models[kind]["onnx"]
    config = QuantConfig(scheme=scheme, group_size=group_size, symmetric=symmetric, format=fmt)
    result = graphq.quantize(source, config, tmp_path / "q", progress=False)

    # Valid ONNX, with the expected ops and no float weight left for the quantized layers.
    proto = onnx.load(result.model_file)
    onnx.checker.check_model(proto)
    op_counts = {}
    for node in proto.graph.node:
        op_counts[node.op_type] = op_counts.get(node.op_type, 0) + 1
    n_quantized = 14  # 7 per decoder layer; lm_head stays float by default
    if fmt == "matmulnbits":
        assert op_counts.get("MatMulNBits") == n_quantized
        assert op_counts.get("MatMul") == 20 - n_quantized  # attention's two per layer plus lm_head
        assert op_counts.get("DequantizeLinear") is None
    else:
        assert op_counts.get("DequantizeLinear") == n_quantized
        assert op_counts.get("MatMul") == 20
        assert op_counts.get("MatMulNBits") is None
    source_weights = {layer.name: layer.weight.name for layer in find_linear_layers(ir.load(source / "model.onnx"))}
    initializers = {t.name for t in proto.graph.initializer}
    assert source_weights["lm_head"] in initializers
    assert not initializers & {w for name, w in source_weights.items() if name != "lm_head"}

    # Logits through graphq's own onnxruntime wrapper vs the torch fake-quantized model.
    onnx_logits = OrtCausalLM(result.output_dir).logits(IDS)
    reference, done = fake_quantized_logits(float_models[kind], bits, group_size, symmetric)
    assert len(done) == n_quantized
    assert_logits_match(onnx_logits, reference, torch_logits(float_models[kind]))

    # The report lists every layer with its scheme, bits, effective group size and sizes.
    report = json.loads((result.output_dir / "report.json").read_text())
    assert report == result.report
    assert report["config"]["scheme"] == scheme and report["config"]["format"] == fmt
    assert report["config"]["symmetric"] is symmetric
    assert report["layers_quantized"] == n_quantized and report["layers_float"] == 1
    layers = {entry["name"]: entry for entry in report["layers"]}
    assert len(layers) == 15
    assert layers["lm_head"]["scheme"] == "float" and "skipped" in layers["lm_head"]
    for name, entry in layers.items():
        if name == "lm_head":
            continue
        k, n = entry["in_features"], entry["out_features"]
        effective = -1 if group_size == -1 or group_size >= k else group_size
        assert entry["scheme"] == scheme, name
        assert entry["bits"] == bits and entry["symmetric"] is symmetric and entry["format"] == fmt
        assert entry["group_size"] == effective, name
        assert entry["weight_bytes_before"] == k * n * 4
        assert entry["weight_bytes_after"] == expected_weight_bytes(k, n, bits, effective, symmetric), name
        assert 0 < entry["weight_relative_mse"] < (0.05 if bits == 4 else 0.001)
    assert report["linear_weight_bytes_before"] == sum(e["weight_bytes_before"] for e in layers.values() if "skipped" not in e)
    assert report["linear_weight_bytes_after"] < report["linear_weight_bytes_before"] / (3 if bits == 4 else 1.5)
    assert report["model_bytes_after"] < report["model_bytes_before"]
    # Side files (tokenizer, config) come along.
    assert (result.output_dir / "tokenizer.json").is_file() and (result.output_dir / "config.json").is_file()

    assert tree_hashes(source) == input_hashes[kind], "quantize changed its input folder"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_quantize_lm_head(tiny_models, float_models, input_hashes, tmp_path, kind, fmt):
    source = tiny_models[kind]["onnx"]
    out = tmp_path / "q"
    code = cli_main(["quantize", str(source), "-o", str(out), "--scheme", "w4a16", "--group-size", "32", "--sym",
                     "--format", fmt, "--quantize-lm-head", "--quiet"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["layers_quantized"] == 15 and report["layers_float"] == 0
    head = next(e for e in report["layers"] if e["name"] == "lm_head")
    assert head["scheme"] == "w4a16" and "skipped" not in head and head["bits"] == 4

    onnx_logits = OrtCausalLM(out).logits(IDS)
    reference, done = fake_quantized_logits(float_models[kind], 4, 32, True, skip=lambda name: False)
    assert "lm_head" in done and len(done) == 15
    assert_logits_match(onnx_logits, reference, torch_logits(float_models[kind]))
    # ... and differs from quantizing all but lm_head, so lm_head really was quantized.
    without_head, _ = fake_quantized_logits(float_models[kind], 4, 32, True)
    assert np.abs(onnx_logits - without_head).max() > 100 * ATOL

    # The embedding Gather still reads the float table, unchanged.
    model = ir.load(out / "model.onnx")
    (gather,) = [node for node in model.graph if node.op_type == "Gather" and node.inputs[0].is_initializer()]
    table = gather.inputs[0]
    assert table.dtype == ir.DataType.FLOAT
    embedding = float_models[kind].model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(table.const_value.numpy(), embedding)
    assert tree_hashes(source) == input_hashes[kind]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_exclude_keeps_layers_float(tiny_models, float_models, tmp_path, kind, fmt):
    out = tmp_path / "q"
    code = cli_main(["quantize", str(tiny_models[kind]["onnx"]), "-o", str(out), "--group-size", "32", "--asym",
                     "--format", fmt, "--exclude", "down_proj", "--quiet"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    skipped = {e["name"]: e["skipped"] for e in report["layers"] if "skipped" in e}
    assert set(skipped) == {"lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    assert "down_proj" in skipped["model.layers.0.mlp.down_proj"]
    assert report["layers_quantized"] == 12

    # The down_proj MatMuls still read their original float weights.
    modules = dict(float_models[kind].named_modules())
    downs = [layer for layer in find_linear_layers(ir.load(out / "model.onnx")) if layer.role == "down"]
    assert len(downs) == 2
    for layer in downs:
        assert layer.node.op_type == "MatMul" and layer.weight.dtype == ir.DataType.FLOAT
        np.testing.assert_array_equal(layer.weight_kn(), modules[layer.name].weight.detach().numpy().T)

    onnx_logits = OrtCausalLM(out).logits(IDS)
    reference, done = fake_quantized_logits(
        float_models[kind], 4, 32, False, skip=lambda name: name == "lm_head" or name.endswith("down_proj")
    )
    assert len(done) == 12
    assert_logits_match(onnx_logits, reference, torch_logits(float_models[kind]))
