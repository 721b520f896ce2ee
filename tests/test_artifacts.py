"""Deployment artifacts: every dtype and shape of the layout table, checked with safetensors' own reader against
weights quantized here independently; W8A8 on records built here; sharding and its index; numpy; the round trip
(load-artifacts gives the quantized ONNX's logits exactly); inspect; and each bad artifact refused by name."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from graphq.algorithms.rtn import quantize_rtn
from graphq.artifacts.layout import pack_int4, unpack_int4
from graphq.artifacts.records import ArtifactCollector
from graphq.artifacts.reader import open_artifacts
from graphq.config import QuantConfig
from graphq.errors import GraphqError
from graphq.linear_layers import find_linear_layers
from graphq.quantize import quantize
from graphq.runtimes.ort import OrtCausalLM
from tests.test_cli import assert_one_error, run_cli

IDS = np.random.default_rng(1).integers(3, 96, size=40)
# id -> (scheme, group_size, symmetric, pack)
CONFIGS = {
    "w4-g32-asym-packed": ("w4a16", 32, False, True),
    "w4-g32-sym-unpacked": ("w4a16", 32, True, False),
    "w8-perchannel-sym": ("w8a16", -1, True, True),
    "w8-g32-asym": ("w8a16", 32, False, True),
}


def to_fp16(src: Path, dst: Path) -> Path:
    """An fp16 copy of an export (weights, activations, KV cache and logits in float16)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.onnx*"))
    model = convert_float_to_float16(onnx.load(str(src / "model.onnx")), keep_io_types=False, disable_shape_infer=True)
    onnx.save(model, str(dst / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return dst


@pytest.fixture(scope="module")
def sources(tiny_models, tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("fp16")
    result = {}
    for kind in ("llama", "qwen2"):
        result[(kind, "fp32")] = tiny_models[kind]["onnx"]
        result[(kind, "fp16")] = to_fp16(tiny_models[kind]["onnx"], root / kind)
    return result


def read_all(folder: Path, stem: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor of an artifact with safetensors' own reader (single file or shards), and the metadata."""
    files = sorted(folder.glob(f"{stem}*.safetensors"))
    tensors, metadata = {}, {}
    for file in files:
        with safe_open(str(file), framework="numpy") as f:
            metadata = f.metadata()
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors, metadata


def float_arrays(model_dir: Path) -> tuple[dict, dict]:
    model = ir.load(model_dir / "model.onnx")
    layers = {layer.name: layer for layer in find_linear_layers(model)}
    inits = {name: v.const_value.numpy() for name, v in model.graph.initializers.items()}
    return layers, inits


def logits(model_dir: Path) -> np.ndarray:
    return OrtCausalLM(model_dir).logits(IDS)


def test_int4_packing_order():
    weight = np.array([[1, -2, 7, -8], [0, 3, -1, 5]], dtype=np.int8)
    packed = pack_int4(weight)
    # byte j: k=2j in the low nibble, k=2j+1 in the high nibble, two's complement nibbles
    assert packed.dtype == np.int8 and packed.shape == (2, 2)
    assert packed.view(np.uint8).tolist() == [[0xE1, 0x87], [0x30, 0x5F]]
    assert np.array_equal(unpack_int4(packed), weight)
    with pytest.raises(GraphqError, match="odd input size"):
        pack_int4(np.zeros((2, 3), dtype=np.int8))


@pytest.mark.parametrize("config_id", list(CONFIGS))
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_weight_only_layout_and_round_trip(sources, tmp_path, kind, dtype, config_id):
    scheme, group, symmetric, pack = CONFIGS[config_id]
    source = sources[(kind, dtype)]
    float_dtype = np.float16 if dtype == "fp16" else np.float32
    config = QuantConfig(scheme=scheme, group_size=group, symmetric=symmetric, pack=pack,
                         format="qdq" if "g32" in config_id else "matmulnbits")
    result = quantize(source, config, tmp_path / "q", progress=False)
    out = result.output_dir
    assert json.loads((out / "config.json").read_text())["quantize"] == scheme
    # the per-layer spill files live in the checkpoint, not beside the artifacts
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["stages"]
    description = json.loads((out / f"quant_model_description_{scheme}.json").read_text())
    tensors, metadata = read_all(out, f"quant_model_weight_{scheme}")
    assert list(description)[0] == "model_quant_type" and description.pop("model_quant_type") == scheme.upper()
    # "version" is msModelSlim's format version (1.0.0: int4 packed along n), never graphq's package version.
    assert description.pop("version", None) == ("1.0.0" if scheme == "w4a16" and pack else None)
    assert metadata["format"] == "pt" and metadata["graphq_version"]
    assert "kv_cache_type" not in description
    assert set(description) == set(tensors)
    bits = int(scheme[1])
    layers, inits = float_arrays(source)
    quantized = [e for e in result.report["layers"] if "skipped" not in e]
    assert len(quantized) == 14
    for entry in quantized:
        name, n, k = entry["name"], entry["out_features"], entry["in_features"]
        layer = layers[name]
        weight, scale, offset = (tensors[f"{name}.{s}"] for s in ("weight", "weight_scale", "weight_offset"))
        groups = 1 if group == -1 else -(-k // group)
        assert weight.dtype == np.int8
        assert weight.shape == ((n // 2, k) if bits == 4 and pack else (n, k))
        assert scale.dtype == np.float32 and scale.shape == (n, groups)
        assert offset.dtype == np.float32 and offset.shape == (n, groups)
        assert all(description[f"{name}.{s}"] == scheme.upper() for s in ("weight", "weight_scale", "weight_offset"))
        # Independent reference: the same RTN on the float weight, dequantized by the table's formula.
        ref = quantize_rtn(layer.weight_kn(), bits, config.group_size_for(k), symmetric).dequantize().T
        ints = weight
        if bits == 4 and pack:  # msModelSlim: byte (j, c) = rows 2j (low nibble) and 2j+1 (high nibble)
            u = weight.view(np.uint8)
            ints = np.stack([u & 15, u >> 4], axis=1).reshape(n, k).astype(np.int16)
            ints = np.where(ints >= 8, ints - 16, ints)
        assert ints.min() >= -(1 << (bits - 1)) and ints.max() < (1 << (bits - 1))
        expand = lambda a: np.repeat(a, k if group == -1 else group, axis=1)[:, :k]  # noqa: E731
        assert np.array_equal((ints - expand(offset)) * expand(scale), ref)
        if symmetric:
            assert not offset.any()
        if entry["has_bias"]:
            bias = tensors[f"{name}.bias"]
            assert bias.dtype == float_dtype and bias.shape == (n,)
            assert np.array_equal(bias, inits[layer.bias.name])
            assert description[f"{name}.bias"] == "FLOAT"  # msModelSlim types a linear's bias FLOAT
        else:
            assert f"{name}.bias" not in tensors
    floats = {name for name, t in description.items() if t == "FLOAT" and not name.endswith("proj.bias")}
    expected = {n for n in inits if n.startswith("model.") and ("norm" in n or "embed" in n)}
    if kind == "llama":
        expected.add("lm_head.weight")  # anonymous [64, 96] MatMul weight, stored [out, in]
        assert np.array_equal(tensors["lm_head.weight"], layers["lm_head"].weight_kn().T.astype(float_dtype))
    assert floats == expected
    for name in floats:
        assert tensors[name].dtype == float_dtype
        if name in inits:
            assert np.array_equal(tensors[name], inits[name])
    assert metadata["weight_packing"] == ("int4_pairs_along_n_low_nibble_first" if bits == 4 and pack else "none")
    # Round trip: the float export + these artifacts, through the same emitters, computes the same logits.
    code = run_cli_quiet(["load-artifacts", out, "-o", tmp_path / "rebuilt"])
    assert code == 0
    quant_logits, rebuilt_logits = logits(out), logits(tmp_path / "rebuilt")
    assert np.array_equal(quant_logits, rebuilt_logits)
    assert np.abs(quant_logits.astype(np.float32) - logits(source)).max() > 1e-3  # the float model differs


def run_cli_quiet(argv) -> int:
    from graphq.cli import main

    return main([str(a) for a in argv])


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_w8a8_records(sources, tmp_path, kind, dtype):
    """W8A8 from records built here: per-channel int8 weights and made-up activation parameters."""
    source = sources[(kind, dtype)]
    model = ir.load(source / "model.onnx")
    layers = [layer for layer in find_linear_layers(model) if layer.role != "lm_head"]
    rng = np.random.default_rng(0)
    collector = ArtifactCollector("w8a8", group_size=-1, symmetric=True)
    params = {}
    for layer in layers:
        qw = quantize_rtn(layer.weight_kn(), 8, -1, True)
        params[layer.name] = (qw, float(rng.uniform(0.01, 0.05)), int(rng.integers(-20, 20)))
        collector.add(layer, qw, {"input_scale": params[layer.name][1], "input_offset": params[layer.name][2]})
    kv = {"type": "int8", "layers": {str(i): {"key_scale": [0.1, 0.2], "key_offset": [0, 0],
                                               "value_scale": [0.3, 0.4], "value_offset": [0, 0]} for i in range(2)}}
    out = tmp_path / "w8a8"
    out.mkdir()
    collector.write(model, find_linear_layers(model), out, ["safetensors"], None, "test", kv_cache=kv)
    description = json.loads((out / "quant_model_description_w8a8.json").read_text())
    assert description["model_quant_type"] == "W8A8" and description["kv_cache_type"] == "C8"
    assert description["kv_quant_type"] == "C8" and "version" not in description
    tensors, _ = read_all(out, "quant_model_weight_w8a8")
    act_dtype = np.float16 if dtype == "fp16" else np.float32
    for layer in layers:
        qw, s_x, o_x = params[layer.name]
        name, n, k = layer.name, layer.out_features, layer.in_features
        t = {s: tensors[f"{name}.{s}"] for s in ("weight", "input_scale", "input_offset", "deq_scale", "quant_bias")}
        assert t["weight"].dtype == np.int8 and t["weight"].shape == (n, k)
        assert np.array_equal(t["weight"], qw.q.T)
        for s in ("input_scale", "input_offset"):
            assert t[s].dtype == act_dtype and t[s].shape == (1,)
        assert t["input_offset"][0] == o_x and t["input_scale"][0] == act_dtype(s_x)
        assert t["quant_bias"].dtype == np.int32 and t["quant_bias"].shape == (n,)
        assert t["deq_scale"].shape == (n,)
        s_x = float(act_dtype(s_x))  # deq_scale and the runtime use input_scale as stored
        deq = (s_x * qw.scales[0].astype(np.float64)).astype(np.float32)
        # msModelSlim: the float32's bits in an int64 for fp32 and fp16 serving (float32 only for bf16)
        assert t["deq_scale"].dtype == np.int64
        assert np.array_equal(t["deq_scale"].astype(np.uint32).view(np.float32), deq)
        # msModelSlim writes W8A8 layers' weight_scale / weight_offset too
        assert np.array_equal(tensors[f"{name}.weight_scale"], qw.scales.T) and not tensors[f"{name}.weight_offset"].any()
        # The integer pipeline with quant_bias reproduces the fake-quant float result (bias rounding <= deq/2).
        bias = layer.bias_array() if layer.bias is not None else np.zeros(n)
        x = rng.normal(size=(5, k))
        x_q = np.clip(np.round(x / s_x) + o_x, -128, 127)
        integer = deq.astype(np.float64) * (x_q @ t["weight"].T.astype(np.float64) + t["quant_bias"])
        fake = ((x_q - o_x) * s_x) @ (qw.q.astype(np.float64) * qw.scales[0]) + bias
        assert np.all(np.abs(integer - fake) <= 0.5 * np.abs(deq) * 1.001 + 1e-9 * np.abs(fake).max())
        assert description[f"{name}.quant_bias"] == "W8A8"
    # Per channel [kv_heads * head_dim] = [2 * 16], each head's scale over its channels, offsets 0 (symmetric)
    assert tensors["model.layers.1.self_attn.v_proj.kv_cache_scale"].tolist() == pytest.approx([0.3] * 16 + [0.4] * 16)
    assert not tensors["model.layers.1.self_attn.v_proj.kv_cache_offset"].any()
    assert description["model.layers.0.self_attn.k_proj.kv_cache_offset"] == "C8"
    artifacts = open_artifacts(out)
    assert len(artifacts.layers) == 14 and len(artifacts.kv_names) == 8
    if importlib.util.find_spec("graphq.passes.w8a8") is None:
        with pytest.raises(GraphqError, match="graphq.passes.w8a8"):
            from graphq.artifacts.rebuild import apply_artifacts

            apply_artifacts(ir.load(source / "model.onnx"), artifacts, "qdq")


@pytest.fixture(scope="module")
def w4_artifacts(tiny_models, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("w4art")
    config = QuantConfig(scheme="w4a16", group_size=32, save_format=["onnx", "safetensors", "numpy"])
    return quantize(tiny_models["qwen2"]["onnx"], config, root / "single", progress=False).output_dir


def test_sharding_and_index(tiny_models, w4_artifacts, tmp_path):
    config = QuantConfig(scheme="w4a16", group_size=32, part_file_size=0.00002)  # 20 kB shards
    out = quantize(tiny_models["qwen2"]["onnx"], config, tmp_path / "sharded", progress=False).output_dir
    shards = sorted(out.glob("quant_model_weight_w4a16-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (out / "quant_model_weight_w4a16.safetensors").exists()
    assert [s.name for s in shards] == [f"quant_model_weight_w4a16-{i:05d}-of-{len(shards):05d}.safetensors"
                                        for i in range(1, len(shards) + 1)]
    index = json.loads((out / "quant_model_weight_w4a16.safetensors.index.json").read_text())
    sharded, _ = read_all(out, "quant_model_weight_w4a16")
    single, _ = read_all(w4_artifacts, "quant_model_weight_w4a16")
    assert set(index["weight_map"]) == set(sharded) == set(single)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in single.values())
    for shard in shards:
        with safe_open(str(shard), framework="numpy") as f:
            names = list(f.keys())
            size = sum(f.get_tensor(n).nbytes for n in names)
        assert all(index["weight_map"][n] == shard.name for n in names)
        assert size <= 20_000 or len(names) == 1
    for name, array in single.items():
        assert np.array_equal(sharded[name], array)
    assert run_cli_quiet(["load-artifacts", out, "-o", tmp_path / "rebuilt"]) == 0
    assert np.array_equal(logits(out), logits(tmp_path / "rebuilt"))


def test_numpy_format_needs_asking_and_warns(tiny_models, w4_artifacts, tmp_path, monkeypatch):
    files = sorted(p.name for p in w4_artifacts.glob("*.npy"))
    assert "quant_model_weight_w4a16.weight.npy" in files and "quant_model_weight_w4a16.float.npy" in files
    weights = np.load(w4_artifacts / "quant_model_weight_w4a16.weight.npy", allow_pickle=True).item()
    assert type(weights["model.layers.0.self_attn.q_proj"]) is np.ndarray
    single, _ = read_all(w4_artifacts, "quant_model_weight_w4a16")
    assert np.array_equal(weights["model.layers.0.self_attn.q_proj"], single["model.layers.0.self_attn.q_proj.weight"])
    floats = np.load(w4_artifacts / "quant_model_weight_w4a16.float.npy", allow_pickle=True).item()
    assert np.array_equal(floats["model.norm.weight"], single["model.norm.weight"])
    default = quantize(tiny_models["llama"]["onnx"], QuantConfig(), tmp_path / "default", progress=False).output_dir
    assert not list(default.glob("*.npy")) and list(default.glob("*.safetensors"))
    with pytest.warns(UserWarning, match="pickle"):
        assert run_cli_quiet(["load-artifacts", w4_artifacts, "-o", tmp_path / "from_numpy", "--numpy"]) == 0
    assert np.array_equal(logits(w4_artifacts), logits(tmp_path / "from_numpy"))

    def no_pickle(*args, **kwargs):
        raise AssertionError("np.load was called without --numpy")

    monkeypatch.setattr(np, "load", no_pickle)
    assert run_cli_quiet(["load-artifacts", w4_artifacts, "-o", tmp_path / "from_safetensors"]) == 0
    assert run_cli_quiet(["inspect", w4_artifacts]) == 0


def test_save_format_without_onnx(tiny_models, tmp_path):
    config = QuantConfig(scheme="w8a16", save_format="safetensors")
    out = quantize(tiny_models["llama"]["onnx"], config, tmp_path / "st", progress=False).output_dir
    assert not (out / "model.onnx").exists() and (out / "quant_model_weight_w8a16.safetensors").is_file()
    with pytest.raises(GraphqError, match="save format"):
        QuantConfig(save_format="onnx,gguf").validate()


def test_inspect(capsys, tiny_models, w4_artifacts, tmp_path):
    code, out, _ = run_cli(capsys, "inspect", w4_artifacts)
    assert code == 0
    onnx_line = next(line for line in out.splitlines() if "W4A16" in line and "bits/weight" in line)
    # g32 asymmetric on K in {64, 96}: 4 bits + a float32 scale and a float32 offset per 32 weights = 6 bits.
    artifact_lines = [line for line in out.splitlines() if "W4A16" in line]
    assert "14 layers" in onnx_line and len(artifact_lines) == 2
    assert "6.000 bits/weight" in artifact_lines[1]
    assert "packed two per byte" in out
    # ONNX (MatMulNBits): 4 bits + float32 scale + 4-bit zero point per 32 weights, zero points padded to bytes.
    model = ir.load(w4_artifacts / "model.onnx")
    stored = sum(
        sum(v.const_value.nbytes for v in node.inputs[1:]) for node in model.graph if node.op_type == "MatMulNBits"
    )
    weights = sum(node.attributes["K"].as_int() * node.attributes["N"].as_int() for node in model.graph
                  if node.op_type == "MatMulNBits")
    assert f"{stored * 8 / weights:6.3f} bits/weight" in artifact_lines[0]
    qdq = quantize(tiny_models["llama"]["onnx"], QuantConfig(scheme="w8a16", group_size=-1, format="qdq"),
                   tmp_path / "qdq", progress=False).output_dir
    code, out, _ = run_cli(capsys, "inspect", qdq / "model.onnx")
    layers = [e for e in json.loads((qdq / "report.json").read_text())["layers"] if "skipped" not in e]
    expected = sum(e["in_features"] * e["out_features"] * 8 + e["out_features"] * 32 for e in layers)
    expected /= sum(e["in_features"] * e["out_features"] for e in layers)
    assert code == 0 and f"{expected:6.3f} bits/weight" in out and "W8A16" in out and "1 linear layers left float" in out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_description(folder: Path, edit) -> None:
    path = folder / "quant_model_description_w4a16.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _rewrite_safetensors(folder: Path, edit) -> None:
    path = folder / "quant_model_weight_w4a16.safetensors"
    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata()
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    edit(tensors)
    save_file(tensors, str(path), metadata=metadata)


Q = "model.layers.0.self_attn.q_proj"
BAD = {
    "described-not-stored": (lambda d: _edit_description(d, lambda x: x.update({f"{Q}.extra": "W4A16"})),
                             [f"{Q}.extra", "do not hold"]),
    "stored-not-described": (lambda d: _edit_description(d, lambda x: x.pop("model.norm.weight")),
                             ["model.norm.weight", "does not describe"]),
    "dtype-off-table": (lambda d: _rewrite_safetensors(d, lambda t: t.update({f"{Q}.weight_scale": t[f"{Q}.weight_scale"].astype(np.int32)})),
                        [f"{Q}.weight_scale", "I32"]),
    "shape-off-table": (lambda d: _rewrite_safetensors(d, lambda t: t.update({f"{Q}.weight_offset": t[f"{Q}.weight_offset"][:, :1].copy()})),
                        [f"{Q}.weight_offset", "shape"]),
    "weight-not-int8": (lambda d: _rewrite_safetensors(d, lambda t: t.update({f"{Q}.weight": t[f"{Q}.weight"].view(np.uint8)})),
                        [f"{Q}.weight", "int8"]),
    "layer-tensor-missing": (lambda d: (_rewrite_safetensors(d, lambda t: t.pop(f"{Q}.weight_offset")),
                                        _edit_description(d, lambda x: x.pop(f"{Q}.weight_offset"))),
                             [f"{Q}.weight_offset", "missing"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_artifacts_are_refused_by_name(capsys, w4_artifacts, tmp_path, case):
    damage, fragments = BAD[case]
    folder = _copy(w4_artifacts, tmp_path / "bad")
    for path in folder.glob("*.npy"):
        path.unlink()
    damage(folder)
    for argv in (["inspect", folder], ["load-artifacts", folder, "-o", tmp_path / "out"]):
        code, out, err = run_cli(capsys, *argv)
        assert_one_error(code, out, err, *fragments)
    assert not (tmp_path / "out").exists()


def test_index_pointing_at_a_missing_shard(capsys, tiny_models, tmp_path):
    config = QuantConfig(scheme="w4a16", group_size=32, part_file_size=0.00002)
    out = quantize(tiny_models["llama"]["onnx"], config, tmp_path / "sharded", progress=False).output_dir
    shard = sorted(out.glob("quant_model_weight_w4a16-*.safetensors"))[1]
    shard.unlink()
    for argv in (["inspect", out], ["load-artifacts", out, "-o", tmp_path / "rebuilt"]):
        code, stdout, err = run_cli(capsys, *argv)
        assert_one_error(code, stdout, err, shard.name, "does not exist")


def test_rebuild_onto_the_wrong_float_model(capsys, tiny_models, w4_artifacts, tmp_path):
    code, out, err = run_cli(capsys, "load-artifacts", w4_artifacts, "-o", tmp_path / "x", "--float", tiny_models["llama"]["onnx"])
    assert_one_error(code, out, err, "wrong --float model")


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_w8a8_quantize_round_trip(tiny_models, tmp_path, kind):
    """With the W8A8 passes (issue 3): quantize writes W8A8 + C8 artifacts and they rebuild to the same logits."""
    pytest.importorskip("graphq.passes.w8a8")
    config = QuantConfig(scheme="w8a8", kv_cache="int8", calib_texts=["the cat sat on the mat and ran far away home",
                                                                        "a quick brown fox jumps over the lazy dog"],
                         num_samples=2, seq_len=16)
    result = quantize(tiny_models[kind]["onnx"], config, tmp_path / "q", progress=False)
    out = result.output_dir
    description = json.loads((out / "quant_model_description_w8a8.json").read_text())
    assert description["model_quant_type"] == "W8A8" and description["kv_cache_type"] == "C8"
    tensors, _ = read_all(out, "quant_model_weight_w8a8")
    for entry in (e for e in result.report["layers"] if "skipped" not in e):
        name = entry["name"]
        assert tensors[f"{name}.input_scale"][0] == np.float32(entry["input_scale"])
        assert tensors[f"{name}.input_offset"][0] == entry["input_offset"]
    assert run_cli_quiet(["load-artifacts", out, "-o", tmp_path / "rebuilt"]) == 0
    quant_logits = logits(out)
    assert np.array_equal(quant_logits, logits(tmp_path / "rebuilt"))
    assert np.abs(quant_logits - logits(tiny_models[kind]["onnx"])).max() > 1e-3


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_awq_round_trip_carries_the_rewritten_norms(tiny_models, tmp_path, kind):
    """AWQ folds its scales into the norms (and v_proj/up_proj): those float tensors must come from the quantized
    graph, not the export, or the rebuilt model would differ."""
    texts = ["the cat sat on the mat and then it ran far away home " * 3, "a quick brown fox jumps over a lazy dog " * 3]
    config = QuantConfig(method="awq", group_size=32, calib_texts=texts, num_samples=4, seq_len=32, format="qdq")
    out = quantize(tiny_models[kind]["onnx"], config, tmp_path / "awq", progress=False).output_dir
    tensors, _ = read_all(out, "quant_model_weight_w4a16")
    _, inits = float_arrays(tiny_models[kind]["onnx"])
    norm = "model.layers.0.input_layernorm.weight"
    assert not np.allclose(tensors[norm], inits[norm])  # rewritten by AWQ
    assert run_cli_quiet(["load-artifacts", out, "-o", tmp_path / "rebuilt"]) == 0
    assert np.array_equal(logits(out), logits(tmp_path / "rebuilt"))


def test_w8a8_dynamic_quantize_round_trip_and_verify(tiny_models, tiny_text, tmp_path):
    """With issue 3's per-token W8A8: W8A8_DYNAMIC artifacts (int8 weights, per-channel scales, zero offsets)
    rebuild to the same logits, and verify and inspect find every layer of its MatMulInteger graph."""
    pytest.importorskip("graphq.passes.w8a8_dynamic")
    from graphq.artifacts.inspect import inspect_path
    from graphq.evaluate import read_text, token_windows
    from graphq.tokenizer import load_tokenizer
    from graphq.verify import verify

    source = tiny_models["qwen2"]["onnx"]
    out = quantize(source, QuantConfig(scheme="w8a8-dynamic"), tmp_path / "q", progress=False).output_dir
    description = json.loads((out / "quant_model_description_w8a8_dynamic.json").read_text())
    assert description["model_quant_type"] == "W8A8_DYNAMIC"
    tensors, _ = read_all(out, "quant_model_weight_w8a8_dynamic")
    name = "model.layers.0.mlp.down_proj"
    assert tensors[f"{name}.weight"].dtype == np.int8 and tensors[f"{name}.weight"].shape == (64, 96)
    assert tensors[f"{name}.weight_scale"].shape == (64, 1) and not tensors[f"{name}.weight_offset"].any()
    assert description[f"{name}.weight"] == "W8A8_DYNAMIC"
    assert run_cli_quiet(["load-artifacts", out, "-o", tmp_path / "rebuilt"]) == 0
    assert np.array_equal(logits(out), logits(tmp_path / "rebuilt"))
    assert [r.schemes["w8a8-dynamic"].layers for r in inspect_path(out)] == [14, 14]
    windows = token_windows(load_tokenizer(source), read_text(tiny_text), 64, 128)
    result = verify(source, out, windows)
    assert len(result.layers) == 14 and not result.unmatched
