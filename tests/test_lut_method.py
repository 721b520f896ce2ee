"""Issue 11 end to end: --method lut / --weight-format through quantize, the emitters, the report and artifacts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from graphq.config import QuantConfig
from graphq.errors import GraphqError
from graphq.quantize import quantize


def lut_config(**kwargs) -> QuantConfig:
    base = dict(method="lut", weight_format="lut", group_size=-1, save_format=["onnx"], num_samples=4, seq_len=32)
    base.update(kwargs)
    return QuantConfig(**base)


def logits(folder, ids):
    from graphq.runtimes.ort import OrtCausalLM

    return OrtCausalLM(folder).logits(ids)


IDS = np.random.default_rng(0).integers(3, 96, size=24)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),  # data-free, per output channel, 4 bits
        dict(scheme="w3a16", group_size=32, lut_table_dtype="int8"),
        dict(weight_format="nf4", group_size=32),
        dict(weight_format="iq4nl", group_size=32),
        dict(weight_format="shared", group_size=32),
    ],
    ids=["lut-per-channel", "lut-w3-g32-int8", "nf4", "iq4nl", "shared"],
)
def test_data_free_lut_quantizes_and_runs(tiny_models, tmp_path, kwargs):
    config = lut_config(**kwargs)
    result = quantize(tiny_models["llama"]["onnx"], config, tmp_path / "out", progress=False)
    layers = [e for e in result.report["layers"] if "skipped" not in e]
    assert layers and all(e["format"] == "lut" and e["weight_format"] == config.weight_format for e in layers)
    assert all(e["method"] == "lut" and "lut_table" in e and e["bits_per_weight"] > config.bits for e in layers)
    assert result.report["calibration_samples"] == 0
    for e in layers:  # bits per weight as documented: codes + tables (+ scales), per layer
        k, bits = e["in_features"], config.bits
        expected = {
            ("lut", "float16"): bits + 16 * (1 << bits) / (k if config.group_size == -1 else config.group_size),
            ("lut", "int8"): bits + (8 * (1 << bits) + 16) / (k if config.group_size == -1 else config.group_size),
        }.get((config.weight_format, config.lut_table_dtype))
        if config.weight_format in ("nf4", "iq4nl", "shared"):  # one shared table, a float16 scale per group
            n = e["out_features"]
            table_bits = 16 if config.weight_format != "iq4nl" else 8
            expected = bits + (16 * -(-k // config.group_size) * n + table_bits * 16) / (k * n)
        assert abs(e["bits_per_weight"] - expected) < 1e-3, (e["name"], e["bits_per_weight"], expected)
    got, floating = logits(result.output_dir, IDS), logits(tiny_models["llama"]["onnx"], IDS)
    assert np.isfinite(got).all() and 0 < np.abs(got - floating).max() < 5


@pytest.mark.parametrize("method", ["lut", "awq+lut"])
def test_calibrated_lut_weights_kmeans_by_the_hessian_diagonal(tiny_models, tiny_text, tmp_path, method):
    config = lut_config(method=method, calib=str(tiny_text))
    assert config.needs_calibration
    result = quantize(tiny_models["llama"]["onnx"], config, tmp_path / "out", progress=False)
    assert result.report["calibration_samples"] > 0
    layers = [e for e in result.report["layers"] if "skipped" not in e]
    assert all("weighted_relative_mse" in e and "output_error" in e for e in layers)
    assert np.isfinite(logits(result.output_dir, IDS)).all()
    free = quantize(tiny_models["llama"]["onnx"], lut_config(), tmp_path / "free", progress=False)
    # weighting moves the tables: the calibrated weights differ from the data-free ones
    assert [e["weight_relative_mse"] for e in layers] != [
        e["weight_relative_mse"] for e in free.report["layers"] if "skipped" not in e]


def test_data_aware_lut_lowers_the_output_error_against_data_free(tiny_models, tiny_text, tmp_path):
    """The layer-wise engine reports each linear's output error on its calibration inputs: the weighted k-means
    must not lose to the unweighted one on average (weights: the Hessian diagonal of those inputs)."""
    from graphq.weight_methods.lut import codebook_quantize
    from graphq.algorithms.gptq import HessianAccumulator

    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 64)) * np.exp(rng.normal(size=64) * 1.5)  # a few loud input channels
    w = rng.normal(size=(64, 32)).astype(np.float32)
    acc = HessianAccumulator()
    acc.add(x)
    config = lut_config()
    free = codebook_quantize(w, config).dequantize()
    aware = codebook_quantize(w, config, np.diag(acc.hessian())).dequantize()
    err = lambda approx: float(np.square(x @ (w - approx)).sum())  # noqa: E731
    assert err(aware) < err(free)



@pytest.mark.parametrize("weight_format, bits, group_size", [("shared", 3, 64), ("lut", 4, -1)])
def test_codebook_gptq_keeps_the_tables_and_lowers_the_output_error(weight_format, bits, group_size):
    """lut+gptq: the tables and scales lut learned, the codes chosen with GPTQ's error feedback."""
    from graphq.algorithms.codebook import codebook_gptq
    from graphq.algorithms.gptq import HessianAccumulator
    from graphq.weight_methods.lut import codebook_quantize

    rng = np.random.default_rng(3)
    mixing = rng.normal(size=(128, 128)) * 0.3 + np.eye(128)
    x = (rng.normal(size=(2048, 128)) @ mixing) * np.exp(rng.normal(size=128) * 0.5)  # correlated channels
    w = rng.normal(size=(128, 48)).astype(np.float32)
    acc = HessianAccumulator()
    acc.add(x)
    hessian = acc.hessian()
    config = lut_config(weight_format=weight_format, scheme=f"w{bits}a16", group_size=group_size)
    nearest = codebook_quantize(w, config, np.diag(hessian))
    fed, info = codebook_gptq(w, hessian, nearest)
    assert np.array_equal(fed.table, nearest.table)
    assert (fed.table_scales is None) == (nearest.table_scales is None)
    if fed.table_scales is not None:
        assert np.array_equal(fed.table_scales, nearest.table_scales)
    assert fed.codes.dtype == np.uint8 and fed.codes.max() < 2 ** bits
    err = lambda approx: float(np.square(x @ (w - approx)).sum())  # noqa: E731
    assert err(fed.dequantize()) < 0.8 * err(nearest.dequantize())
    assert info["damp"] > 0 and info["warnings"] == []


def test_lut_then_gptq_in_quantize(tiny_models, tiny_text, tmp_path):
    """--method awq+lut+gptq --weight-format shared: codebook layers, every layer's output error at or below the
    nearest-code one of awq+lut, and the graph runs."""
    base = dict(weight_format="shared", scheme="w3a16", group_size=32, calib=str(tiny_text))
    fed = quantize(tiny_models["llama"]["onnx"], lut_config(method="awq+lut+gptq", **base), tmp_path / "fed",
                   progress=False)
    nearest = quantize(tiny_models["llama"]["onnx"], lut_config(method="awq+lut", **base), tmp_path / "near",
                       progress=False)
    layers = [e for e in fed.report["layers"] if "skipped" not in e]
    assert layers and all(e["format"] == "lut" and "gptq_damp" in e for e in layers)
    near = {e["name"]: e for e in nearest.report["layers"] if "skipped" not in e}
    assert np.mean([e["output_error"] for e in layers]) < np.mean([near[e["name"]]["output_error"] for e in layers])
    assert fed.report["codebook"]["method"] == "awq+lut+gptq"
    assert np.isfinite(logits(fed.output_dir, IDS)).all()

@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(scheme="w8a8", method="rtn"), "cannot serve scheme w8a8"),
        (dict(scheme="w8a16"), "cannot serve scheme w8a16"),
        (dict(group_size=16), "too small for 16-entry tables"),
        (dict(weight_format="nf4", group_size=-1), "per group"),
        (dict(weight_format="nf4", scheme="w3a16", group_size=32), "cannot serve scheme w3a16"),
        (dict(weight_format="uniform"), "add --weight-format"),
        (dict(method="rtn"), "needs --method lut"),
        (dict(method="gptq"), "needs --method lut"),
        (dict(weight_format="table"), "unknown --weight-format"),
        (dict(weight_format="nf4", group_size=32, lut_table_dtype="int8"), "applies to --weight-format lut"),
        (dict(symmetric=True), "no zero point"),
        (dict(scheme="w3a16", method="rtn", weight_format="uniform"), "no uniform 3-bit kernel"),
    ],
)
def test_bad_codebook_config_is_one_line_and_writes_nothing(tiny_models, tmp_path, kwargs, message):
    with pytest.raises(GraphqError, match=message) as info:
        quantize(tiny_models["llama"]["onnx"], lut_config(**kwargs), tmp_path / "out", progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_few_distinct_weights_fall_back_and_warn(tiny_models, tmp_path, capsys):
    """A linear whose weight holds fewer distinct values than the table: those values, and a warning line."""
    from graphq.linear_layers import find_linear_layers
    from graphq.model_io import load_model, save_model
    from graphq.passes.weights import set_layer_weight
    import shutil

    source = tiny_models["llama"]["onnx"]
    folder = tmp_path / "few"
    shutil.copytree(source, folder)
    model = load_model(source)
    layer = find_linear_layers(model)[0]
    levels = np.array([-0.1, 0.0, 0.2], dtype=np.float32)
    set_layer_weight(model, layer, levels[np.arange(layer.in_features * layer.out_features) % 3].reshape(
        layer.in_features, layer.out_features))
    save_model(model, folder / "model.onnx")
    result = quantize(folder, lut_config(), tmp_path / "out", progress=False)
    entry = next(e for e in result.report["layers"] if e["name"] == layer.name)
    assert entry["weight_relative_mse"] < 1e-6 and "fewer distinct weights" in entry["warnings"][0]
    assert "warning" in capsys.readouterr().err


def test_load_artifacts_refuses_format_lut_for_uniform_layers(tiny_models, tmp_path):
    from graphq.artifacts.rebuild import load_artifacts

    out = quantize(tiny_models["llama"]["onnx"], QuantConfig(group_size=32), tmp_path / "q", progress=False).output_dir
    with pytest.raises(GraphqError, match="unknown format 'lut'"):
        load_artifacts(out, tmp_path / "rebuilt", format="lut")
    assert not (tmp_path / "rebuilt").exists()


def test_cli_lut(tiny_models, tmp_path):
    from graphq.cli import main

    out = tmp_path / "cli"
    code = main(["quantize", str(tiny_models["llama"]["onnx"]), "-o", str(out), "--method", "lut",
                 "--weight-format", "nf4", "--group-size", "32", "--quiet"])
    assert code in (0, None)
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["weight_format"] == "nf4"
    assert {e["format"] for e in report["layers"] if "skipped" not in e} == {"lut"}


def _initializers(folder):
    from graphq.model_io import load_model

    model = load_model(folder / "model.onnx")
    return {name: value.const_value.numpy() for name, value in model.graph.initializers.items()}, model


@pytest.mark.parametrize(
    "kwargs, kind",
    [
        (dict(), "W4A16_LUT"),
        (dict(scheme="w3a16", group_size=32), "W3A16_LUT"),
        (dict(weight_format="nf4", group_size=32), "NF4"),
        (dict(weight_format="shared", group_size=32, method="awq+lut", calib_texts=["the cat sat on the mat " * 8]),
         "W4A16_LUT"),
    ],
    ids=["lut", "w3-g32", "nf4", "awq+shared"],
)
def test_artifacts_round_trip_bit_identical(tiny_models, tmp_path, capsys, kwargs, kind):
    """Artifacts in lut_mode: weight (packed codes) + weight_lut (+ scale), typed; load-artifacts rebuilds the
    same graph (every initializer equal, same logits); the codes and tables dequantize to what the graph computes."""
    from graphq.artifacts.codebook import from_tensors
    from graphq.cli import main
    from safetensors.numpy import load_file

    config = lut_config(save_format=["onnx", "safetensors"], **kwargs)
    out = quantize(tiny_models["llama"]["onnx"], config, tmp_path / "q", progress=False).output_dir
    scheme = config.scheme
    description = json.loads((out / f"quant_model_description_{scheme}.json").read_text())
    assert description["model_quant_type"] == f"{scheme.upper()}_LUT"
    tensors = load_file(out / f"quant_model_weight_{scheme}.safetensors")
    report = json.loads((out / "report.json").read_text())
    quantized = [e for e in report["layers"] if "skipped" not in e]
    for entry in quantized:
        name, n, k = entry["name"], entry["out_features"], entry["in_features"]
        assert description[f"{name}.weight"] == kind and description[f"{name}.weight_lut"] == kind
        lut = tensors[f"{name}.weight_lut"]
        assert tensors[f"{name}.weight"].dtype == np.uint8 and tensors[f"{name}.weight"].shape[0] == n
        assert lut.shape[-1] == 1 << config.bits and lut.dtype == np.float16
        group = entry["group_size"]
        cw = from_tensors({s: tensors[f"{name}.{s}"] for s in ("weight", "weight_lut", "weight_lut_scale")
                           if f"{name}.{s}" in tensors}, k, config.bits, group)
        assert abs(cw.bits_per_weight() - entry["bits_per_weight"]) < 1e-3
    assert main(["load-artifacts", str(out), "-o", str(tmp_path / "rebuilt")]) == 0
    (a, model_a), (b, _) = _initializers(out), _initializers(tmp_path / "rebuilt")
    assert set(a) == set(b) and all(np.array_equal(a[name], b[name]) and a[name].dtype == b[name].dtype for name in a)
    assert np.array_equal(logits(out, IDS), logits(tmp_path / "rebuilt", IDS))
    # inspect counts the tables: artifacts and ONNX give the report's bits per weight
    weights = sum(e["in_features"] * e["out_features"] for e in quantized)
    expected = sum(e["bits_per_weight"] * e["in_features"] * e["out_features"] for e in quantized) / weights
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if "bits/weight" in line and "LUT" in line.upper() or "NF4" in line]
    assert len(lines) >= 2, text
    for line in lines:
        value = float(line.split("bits/weight")[0].split()[-1])
        assert abs(value - expected) < 0.02, (line, expected)


def test_lut_graph_computes_the_dequantized_weight(tiny_models, tmp_path):
    """The quantized model = the float model holding each layer's dequantized codebook weight (onnxruntime)."""
    import shutil
    from graphq.artifacts.codebook import from_tensors
    from graphq.linear_layers import find_linear_layers
    from graphq.model_io import load_model, save_model
    from graphq.passes.weights import set_layer_weight
    from safetensors.numpy import load_file

    source = tiny_models["llama"]["onnx"]
    config = lut_config(save_format=["onnx", "safetensors"], scheme="w3a16", group_size=32)
    out = quantize(source, config, tmp_path / "q", progress=False).output_dir
    tensors = load_file(out / "quant_model_weight_w3a16.safetensors")
    reference = load_model(source)
    for layer in find_linear_layers(reference):
        if f"{layer.name}.weight_lut" in tensors:
            cw = from_tensors({s: tensors[f"{layer.name}.{s}"] for s in ("weight", "weight_lut", "weight_lut_scale")
                               if f"{layer.name}.{s}" in tensors}, layer.in_features, 3, 32)
            set_layer_weight(reference, layer, cw.dequantize())
    shutil.copytree(source, tmp_path / "ref")
    save_model(reference, tmp_path / "ref" / "model.onnx")
    np.testing.assert_allclose(logits(out, IDS), logits(tmp_path / "ref", IDS), rtol=0, atol=1e-4)


def test_verify_works_unchanged_on_lut_models(tiny_models, tiny_text, tmp_path):
    """verify finds every LUT layer's output (report.json's quantized_output) and gives a finite SQNR."""
    from graphq.evaluate import read_text, token_windows
    from graphq.tokenizer import load_tokenizer
    from graphq.verify import verify

    source = tiny_models["llama"]["onnx"]
    out = quantize(source, lut_config(weight_format="shared", group_size=32), tmp_path / "q", progress=False).output_dir
    windows = token_windows(load_tokenizer(source), read_text(tiny_text), 64, 128)
    result = verify(source, out, windows)
    assert len(result.layers) == 14
    assert all(np.isfinite(e.sqnr_db) and 0 < e.sqnr_db < 80 for e in result.layers)


# ------------------------------------------------------------------------- targets, refusals, report (issue 11)

LUT_FLAGS = ["--method", "lut", "--weight-format", "lut", "--group-size", "-1"]
TARGET_REFUSALS = {
    "compressed-tensors": (["--target", "compressed-tensors"], ["compressed-tensors", "codebook (LUT)"]),
    "gguf": (["--target", "gguf"], ["gguf", "codebook (LUT)"]),
    "vllm-ascend": (["--target", "vllm-ascend", "--dtype", "fp16"], ["vllm-ascend", "codebook (LUT)"]),
    "vllm-ascend-w3": (["--target", "vllm-ascend", "--dtype", "fp16", "--scheme", "w3a16"], ["vllm-ascend"]),
    "w8a8": (["--scheme", "w8a8"], ["cannot serve scheme w8a8"]),
    "w8a8-lut-rounding": (["--scheme", "w8a8", "--method", "rtn"], ["cannot serve scheme w8a8"]),
    "group-16": (["--group-size", "16"], ["too small for 16-entry tables"]),
    "pruning": (["--method", "magnitude+lut", "--sparsity", "0.5"], ["pruning"]),
    "target-bits": (["--target-bits", "5"], ["--target-bits", "uniform"]),
}


@pytest.mark.parametrize("case", list(TARGET_REFUSALS))
def test_lut_refusals_are_one_line_from_the_cli(capsys, tiny_models, tmp_path, case):
    """Targets that cannot hold codebook layers, schemes they cannot serve, tables larger than a group: one
    ``graphq: error:`` line, exit 2, nothing written."""
    from tests.test_cli import assert_one_error, run_cli

    flags, fragments = TARGET_REFUSALS[case]
    code, out, err = run_cli(capsys, "quantize", tiny_models["llama"]["onnx"], "-o", tmp_path / "q", *LUT_FLAGS, *flags)
    assert_one_error(code, out, err, *fragments)
    assert not (tmp_path / "q").exists()


def test_onnx_only_lut_needs_no_codebook_target(tiny_models, tmp_path):
    """--save-format onnx writes no artifacts, so a target without a codebook layout does not matter."""
    config = lut_config(target="gguf")
    result = quantize(tiny_models["llama"]["onnx"], config, tmp_path / "q", progress=False)
    assert result.report["artifacts"] == {} and result.report["codebook"]["layers"] == 14


def test_report_names_method_and_table_size(tiny_models, tiny_text, tmp_path, capsys):
    config = lut_config(method="awq+lut", calib=str(tiny_text), lut_table_dtype="int8")
    result = quantize(tiny_models["llama"]["onnx"], config, tmp_path / "q", progress=False)
    summary = result.report["codebook"]
    layers = [e for e in result.report["layers"] if "skipped" not in e]
    # per channel int8: one [N, 16] int8 table and an fp16 scale per output channel
    assert summary["table_bytes"] == sum(e["out_features"] * (16 + 2) for e in layers)
    assert summary["method"] == "awq+lut" and summary["weight_format"] == "lut" and summary["data_aware"]
    assert summary["table_entries"] == 16 and summary["tables"] == ["16-entry int8 table per output channel, "
                                                                    "float16 scale per table"]
    assert all(e["lut_table_bytes"] == e["out_features"] * 18 for e in layers)
    line = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("graphq: quantized"))
    assert "awq+lut (weighted by calibration)" in line and "KiB of tables" in line and "bits/weight" in line


def test_fp16_serving_artifacts_rebuild_bit_identical_with_biases(tiny_models, tmp_path, capsys):
    """mindie with --dtype fp16 on the Qwen2 model (q/k/v biases, tied embeddings): the biases are stored in fp16
    and typed FLOAT, the tables as they are; load-artifacts rebuilds every initializer exactly."""
    from graphq.cli import main
    from safetensors.numpy import load_file

    source = tiny_models["qwen2"]["onnx"]
    config = lut_config(save_format=["onnx", "safetensors"], dtype="fp16", weight_format="nf4", group_size=32)
    out = quantize(source, config, tmp_path / "q", progress=False).output_dir
    description = json.loads((out / "quant_model_description_w4a16.json").read_text())
    tensors = load_file(out / "quant_model_weight_w4a16.safetensors")
    bias = "model.layers.0.self_attn.q_proj.bias"
    assert description[bias] == "FLOAT" and tensors[bias].dtype == np.float16
    assert description["model.layers.0.self_attn.q_proj.weight_lut"] == "NF4"
    assert "version" not in description  # no uniform int4 is packed
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    assert main(["load-artifacts", str(out), "-o", str(tmp_path / "rebuilt")]) == 0
    (a, _), (b, _) = _initializers(out), _initializers(tmp_path / "rebuilt")
    assert set(a) == set(b) and all(np.array_equal(a[name], b[name]) and a[name].dtype == b[name].dtype for name in a)
    assert np.array_equal(logits(out, IDS), logits(tmp_path / "rebuilt", IDS))


def test_damaged_lut_metadata_is_refused_naming_the_layer(tiny_models, tmp_path):
    """A LUT layer lut_layers does not describe, or codes of the wrong width: one line naming the tensor."""
    from safetensors.numpy import load_file, save_file
    from graphq.artifacts.reader import open_artifacts

    out = quantize(tiny_models["llama"]["onnx"], lut_config(save_format=["onnx", "safetensors"]), tmp_path / "q",
                   progress=False).output_dir
    path = out / "quant_model_weight_w4a16.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    layers = json.loads(metadata["lut_layers"])
    name = sorted(layers)[0]
    damaged = dict(metadata, lut_layers=json.dumps({k: v for k, v in layers.items() if k != name}))
    save_file(tensors, path, metadata=damaged)
    with pytest.raises(GraphqError, match=f"{name} is a W4A16_LUT layer the metadata's lut_layers does not describe"):
        open_artifacts(out)
    tensors[f"{name}.weight"] = tensors[f"{name}.weight"][:, :-1].copy()
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(GraphqError, match=rf"{name}\.weight has dtype U8 shape"):
        open_artifacts(out)
