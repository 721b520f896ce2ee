"""Artifact targets (issue 13): each layout checked against what its real consumer reads.

msModelSlim layouts (mindie = V0, vllm-ascend = ascendV1): the writer's details, the refusals, and the reader on
real msModelSlim output: its descriptions and tensor listings for SmolLM2 (shared/reference/msmodelslim), and
tiny folders written here the way its save code writes them (unpacked or n-packed int4, W8A8 with
weight_scale / weight_offset, duplicated smoothed norms, no graphq metadata), rebuilt to the quantized ONNX's
logits. Serving dtypes fp16 / bf16: stored dtypes, deq_scale's encoding, config.json, and the ONNX computing what
the artifacts hold.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file as reference_save_file

from graphq.artifacts.description import parse_description
from graphq.artifacts.reader import classify
from graphq.config import QuantConfig
from graphq.errors import GraphqError
from graphq.quantize import quantize
from graphq.runtimes.ort import OrtCausalLM
from tests.test_cli import assert_one_error, run_cli

REFERENCE = Path(__file__).resolve().parent.parent.parent / "shared" / "reference" / "msmodelslim"
IDS = np.random.default_rng(3).integers(3, 96, size=40)
CALIB = dict(calib_texts=["the cat sat on the mat and ran far away home", "a quick brown fox jumps over the lazy dog"],
             num_samples=2, seq_len=16)


def logits(model_dir: Path) -> np.ndarray:
    return OrtCausalLM(model_dir).logits(IDS)


def read_torch(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor with safetensors' own torch reader (the one transformers and vLLM use; it reads bfloat16)."""
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        for name in f.keys():
            tensors[name] = f.get_tensor(name)
    return tensors, metadata


def rebuild(capsys, folder: Path, float_dir: Path, out: Path) -> None:
    code, stdout, err = run_cli(capsys, "load-artifacts", folder, "-o", out, "--float", float_dir)
    assert code == 0, err


# ----------------------------------------------------------------------------------------------- mindie (V0)


def test_mindie_names_dtype_and_round_trip(capsys, tiny_models, tmp_path):
    """W8A8_DYNAMIC with --dtype fp16 on a float32 export: MindIE's names, fp16 config and float tensors, float32
    scales, the bias typed FLOAT, no graphq version as the format version, and the rebuild's logits."""
    source = tiny_models["qwen2"]["onnx"]
    out = quantize(source, QuantConfig(scheme="w8a8-dynamic", dtype="fp16"), tmp_path / "q", progress=False).output_dir
    config = json.loads((out / "config.json").read_text())
    assert config["quantize"] == "w8a8_dynamic" and config["torch_dtype"] == "float16"
    description = json.loads((out / "quant_model_description_w8a8_dynamic.json").read_text())
    assert list(description)[0] == "model_quant_type" and description["model_quant_type"] == "W8A8_DYNAMIC"
    assert "version" not in description
    tensors, metadata = read_torch(out / "quant_model_weight_w8a8_dynamic.safetensors")
    assert metadata["format"] == "pt" and metadata["serving_dtype"] == "fp16"
    q = "model.layers.0.self_attn.q_proj"
    assert description[f"{q}.bias"] == "FLOAT" and tensors[f"{q}.bias"].dtype == torch.float16
    assert tensors[f"{q}.weight"].dtype == torch.int8 and tensors[f"{q}.weight_scale"].dtype == torch.float32
    assert tensors["model.embed_tokens.weight"].dtype == torch.float16
    assert description["model.embed_tokens.weight"] == "FLOAT"
    # The ONNX computes with the fp16 values the artifacts hold (float32 compute): its embedding equals the stored one.
    import onnx_ir as ir

    graph = ir.load(out / "model.onnx").graph
    embedding = graph.initializers["model.embed_tokens.weight"].const_value.numpy()
    assert embedding.dtype == np.float32
    assert np.array_equal(embedding, tensors["model.embed_tokens.weight"].float().numpy())
    rebuild(capsys, out, source, tmp_path / "rebuilt")
    assert np.array_equal(logits(out), logits(tmp_path / "rebuilt"))


def test_mindie_refuses_float32_when_asked(capsys, tiny_models, tmp_path):
    code, out, err = run_cli(capsys, "quantize", tiny_models["llama"]["onnx"], "-o", tmp_path / "q", "--dtype", "fp32")
    assert_one_error(code, out, err, "mindie", "fp16 or bf16")
    assert not (tmp_path / "q").exists()


def test_mindie_unpacked_int4_is_msmodelslim_v0(tiny_models, tmp_path):
    """--no-pack: [n, k] int8 in [-8, 7] with no version key, exactly msModelSlim V0's W4A16 per group."""
    config = QuantConfig(scheme="w4a16", group_size=32, pack=False, dtype="bf16")
    out = quantize(tiny_models["llama"]["onnx"], config, tmp_path / "q", progress=False).output_dir
    description = json.loads((out / "quant_model_description_w4a16.json").read_text())
    assert "version" not in description
    tensors, _ = read_torch(out / "quant_model_weight_w4a16.safetensors")
    weight = tensors["model.layers.0.mlp.down_proj.weight"]
    assert weight.shape == (64, 96) and weight.min() >= -8 and weight.max() <= 7
    assert tensors["model.norm.weight"].dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


# ------------------------------------------------------------------------------------------ vllm-ascend (V1)


def test_vllm_ascend_layout(capsys, tiny_models, tmp_path):
    source = tiny_models["llama"]["onnx"]
    staged = tmp_path / "src"
    shutil.copytree(source, staged)
    config_file = staged / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "quantization_config": {"x": 1}}))
    config = QuantConfig(scheme="w8a8", target="vllm-ascend", dtype="bf16", kv_cache="int8", **CALIB)
    out = quantize(staged, config, tmp_path / "q", progress=False).output_dir
    description = json.loads((out / "quant_model_description.json").read_text())
    assert list(description)[:3] == ["version", "model_quant_type", "group_size"]
    assert description["version"] == "1.0.0" and description["group_size"] == 0
    assert description["kv_cache_type"] == description["kv_quant_type"] == "C8"
    config_out = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config_out and "quantize" not in config_out
    assert config_out["torch_dtype"] == "bfloat16"
    tensors, _ = read_torch(out / "quant_model_weight_w8a8.safetensors")
    q = "model.layers.0.self_attn.q_proj"
    assert tensors[f"{q}.deq_scale"].dtype == torch.float32  # bf16 serving: float32, not int64 bits
    deq = tensors[f"{q}.input_scale"].double() * tensors[f"{q}.weight_scale"].double().reshape(-1)
    assert torch.equal(tensors[f"{q}.deq_scale"], deq.float())
    kv = tensors["model.layers.0.self_attn.k_proj.kv_cache_scale"]
    assert kv.shape == (32,) and torch.equal(kv[:16], kv[:1].expand(16))  # per channel, head 0's scale repeated
    assert not tensors["model.layers.0.self_attn.k_proj.kv_cache_offset"].any()
    rebuild(capsys, out, source, tmp_path / "rebuilt")
    assert np.array_equal(logits(out), logits(tmp_path / "rebuilt"))


REFUSALS = {
    "w4a16-dense": (["--scheme", "w4a16"], ["W4A16 dense"]),
    "w8a16-groups": (["--scheme", "w8a16", "--group-size", "32"], ["per channel and symmetric", "group 32"]),
    "w8a16-asym": (["--scheme", "w8a16", "--group-size", "-1", "--asym"], ["per channel and symmetric", "asymmetric"]),
    "qkv-split": (["--scheme", "w8a8-dynamic", "--exclude", "*.k_proj"], ["fuses q/k/v", "k_proj float"]),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_vllm_ascend_refuses_what_it_cannot_serve(capsys, tiny_models, tmp_path, case):
    flags, fragments = REFUSALS[case]
    code, out, err = run_cli(capsys, "quantize", tiny_models["llama"]["onnx"], "-o", tmp_path / "q",
                             "--target", "vllm-ascend", "--dtype", "fp16", *flags)
    assert_one_error(code, out, err, *fragments)
    assert not (tmp_path / "q").exists()


def test_vllm_ascend_refuses_a_scheme_split_by_overrides(tiny_models, tmp_path):
    config = QuantConfig(scheme="w8a8-dynamic", target="vllm-ascend", dtype="fp16",
                         scheme_overrides={"*up_proj": "w8a16"}, group_size=-1)
    with pytest.raises(GraphqError, match="fuses gate/up"):
        quantize(tiny_models["llama"]["onnx"], config, tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists()


# ------------------------------------------------------------------------- real msModelSlim output (reader)


def listing_specs(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    specs = {}
    for line in path.read_text().splitlines():
        _, name, dtype, shape = line.split("\t")
        specs[name] = (dtype, tuple(json.loads(shape)))
    return specs


class ListingStore:
    """The header side of a store (names, dtypes, shapes), from msModelSlim's tensor listing: no tensor data."""

    def __init__(self, path: Path):
        self.specs = listing_specs(path)
        self.metadata: dict[str, str] = {}


VARIANTS = {  # variant -> (description file, scheme, producer, int4 packing, group size of q_proj)
    "w8a16": ("w8a16__quant_model_description_w8a16.json", "w8a16", "msModelSlim V0", None, 576),
    "w8a8": ("w8a8__quant_model_description_w8a8.json", "w8a8", "msModelSlim V0", None, 576),
    "w8a8-nosmooth": ("w8a8-nosmooth__quant_model_description_w8a8.json", "w8a8", "msModelSlim V0", None, 576),
    "w8a8-dynamic": ("w8a8-dynamic__quant_model_description_w8a8_dynamic.json", "w8a8-dynamic", "msModelSlim V0", None, 576),
    "w4a16-g64": ("w4a16-g64__quant_model_description_w4a16.json", "w4a16", "msModelSlim V0", "none", 64),
    "w4a16-g64-ascendV1": ("w4a16-g64-ascendV1__quant_model_description.json", "w4a16", "msModelSlim ascendV1", "n", 64),
    "w8a8-ascendV1": ("w8a8-ascendV1__quant_model_description.json", "w8a8", "msModelSlim ascendV1", None, 576),
    "v1cli-w8a16": ("v1cli-w8a16__quant_model_description.json", "w8a16", "msModelSlim ascendV1", None, 576),
    "v1cli-w8a16-fp16": ("v1cli-w8a16-fp16__quant_model_description.json", "w8a16", "msModelSlim ascendV1", None, 576),
    "v1cli-w8a8": ("v1cli-w8a8__quant_model_description.json", "w8a8-dynamic", "msModelSlim ascendV1", None, 576),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reader_accepts_real_msmodelslim_layouts(variant):
    if not REFERENCE.is_dir():
        pytest.skip(f"{REFERENCE} (real msModelSlim output) is not on this machine")
    file, scheme, producer, packing, group = VARIANTS[variant]
    description_file = REFERENCE / file
    name = "quant_model_description.json" if "ascendV1" in producer else file.split("__", 1)[1]
    description = parse_description(Path(name), json.loads(description_file.read_text()))
    artifacts = classify(REFERENCE, description, ListingStore(REFERENCE / f"{variant}__tensor_listing.txt"))
    assert artifacts.scheme == scheme and artifacts.producer == producer
    assert len(artifacts.layers) == 30 * 7  # every linear of SmolLM2's 30 decoder layers; lm_head stays FLOAT
    assert {"lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"} <= set(artifacts.float_names)
    assert artifacts.layers["model.layers.0.mlp.down_proj"] == (576, 1536)
    assert artifacts.layers["model.layers.0.self_attn.k_proj"] == (192, 576)
    q = "model.layers.0.self_attn.q_proj"
    assert artifacts.group_size_of(q) == group
    if packing is not None:
        assert set(artifacts.packing.values()) == {packing}
    if variant == "w8a8":  # SmoothQuant: the norms' X.module.* copies are recognised, not mistaken for layers
        assert len(artifacts.duplicates) == 2 * 61 and artifacts.notes
    fp16 = variant.endswith("fp16")
    assert artifacts.serving_dtype == ("fp16" if fp16 else "fp32")


def _msmodelslim_folder(graphq_out: Path, folder: Path, v1: bool, smoothed_norms: bool = False) -> Path:
    """graphq's artifacts re-saved the way msModelSlim's save code writes them, with safetensors' own writer and
    no graphq metadata: V0 unpacked int4 (graphq --no-pack is that), V1 int4 packed along n by the formula of
    its listings, V1 CLI file names and header (metadata / optional objects, group_size)."""
    folder.mkdir()
    description_file = next(graphq_out.glob("quant_model_description*.json"))
    description = json.loads(description_file.read_text())
    weights = next(p for p in graphq_out.glob("quant_model_weight_*.safetensors"))
    with safe_open(str(weights), framework="numpy") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    if smoothed_norms:  # V0 SmoothQuant: X.weight and a zero X.bias FLOAT, plus X.module.weight / .bias typed W8A8
        for name in [n for n in tensors if n.endswith("layernorm.weight")]:
            base = name[: -len(".weight")]
            tensors[f"{base}.bias"] = np.zeros_like(tensors[name])
            tensors[f"{base}.module.weight"] = tensors[name].copy()
            tensors[f"{base}.module.bias"] = np.zeros_like(tensors[name])
            description.update({f"{base}.bias": "FLOAT", f"{base}.module.weight": description["model_quant_type"],
                                f"{base}.module.bias": description["model_quant_type"]})
    if v1:
        for name in [n for n, t in description.items() if t == "W4A16" and n.endswith(".weight")]:
            w = tensors[name].astype(np.int16)
            tensors[name] = (((w[1::2] << 4) | (w[0::2] & 0xF)).astype(np.int16).astype(np.uint8)).view(np.int8)
        header = {"version": "1.0.0", "model_quant_type": description.pop("model_quant_type")}
        description = {**header, **description, "metadata": {}, "group_size": 32, "optional": {}}
        reference_save_file(tensors, str(folder / "quant_model_weights-00001-of-00001.safetensors"))
        index = {"metadata": {}, "weight_map": {n: "quant_model_weights-00001-of-00001.safetensors" for n in tensors}}
        (folder / "quant_model_weights.safetensors.index.json").write_text(json.dumps(index))
        (folder / "quant_model_description.json").write_text(json.dumps(description))
    else:
        reference_save_file(tensors, str(folder / weights.name))
        (folder / description_file.name).write_text(json.dumps(description))
    return folder


@pytest.mark.parametrize("layout", ["v0-w4a16", "v1-w4a16", "v0-w8a8-smoothed"])
def test_msmodelslim_folders_inspect_and_rebuild(capsys, tiny_models, tmp_path, layout):
    source = tiny_models["llama"]["onnx"]
    if "w8a8" in layout:
        config = QuantConfig(scheme="w8a8", dtype="fp16", **CALIB)
    else:
        config = QuantConfig(scheme="w4a16", group_size=32, pack=False, dtype="fp16", format="qdq")
    graphq_out = quantize(source, config, tmp_path / "graphq", progress=False).output_dir
    folder = _msmodelslim_folder(graphq_out, tmp_path / "msmodelslim", v1=layout.startswith("v1"),
                                 smoothed_norms="smoothed" in layout)
    code, out, err = run_cli(capsys, "inspect", folder)
    assert code == 0, err
    assert "msModelSlim " + ("ascendV1" if layout.startswith("v1") else "V0") in out
    assert ("packed two per byte along n" in out) == (layout == "v1-w4a16")
    rebuild(capsys, folder, source, tmp_path / "rebuilt")
    assert np.array_equal(logits(graphq_out), logits(tmp_path / "rebuilt"))


def test_rebuild_says_what_it_cannot_rebuild(capsys, tiny_models, tmp_path):
    """A non-zero anti-outlier bias on an RMSNorm has no place in the float model: one line saying so."""
    source = tiny_models["llama"]["onnx"]
    graphq_out = quantize(source, QuantConfig(scheme="w8a8", dtype="fp16", **CALIB), tmp_path / "graphq",
                          progress=False).output_dir
    folder = _msmodelslim_folder(graphq_out, tmp_path / "msmodelslim", v1=False, smoothed_norms=True)
    weights = folder / "quant_model_weight_w8a8.safetensors"
    with safe_open(str(weights), framework="numpy") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    tensors["model.layers.0.input_layernorm.bias"] = np.full_like(tensors["model.layers.0.input_layernorm.bias"], 0.5)
    reference_save_file(tensors, str(weights))
    code, out, err = run_cli(capsys, "load-artifacts", folder, "-o", tmp_path / "rebuilt", "--float", source)
    assert_one_error(code, out, err, "model.layers.0.input_layernorm.bias", "cannot rebuild", "non-zero")
    assert not (tmp_path / "rebuilt").exists()


# --------------------------------------------------------------------------------------------- dtype (export)


def test_export_dtype_rounds_weights_and_quantize_follows(tiny_models, tmp_path):
    from graphq.export import export
    import onnx_ir as ir

    out = tmp_path / "fp16"
    export(tiny_models["llama"]["hf"], out, dtype="fp16")
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "float16"
    graph = ir.load(out / "model.onnx").graph
    weights = [v.const_value.numpy() for v in graph.initializers.values()
               if v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT and v.const_value.size > 1]
    assert weights and all(np.array_equal(w, w.astype(np.float16).astype(np.float32)) for w in weights)
    assert not np.array_equal(logits(out), logits(tiny_models["llama"]["onnx"]))  # the rounding is real
    result = quantize(out, QuantConfig(scheme="w8a16"), tmp_path / "q", progress=False)
    assert result.report["serving_dtype"] == "fp16" and "dtype_warning" not in result.report


# ---------------------------------------------------------------------------------------- compressed-tensors


@pytest.mark.parametrize("kind,scheme", [("qwen2", "w4a16"), ("llama", "w8a8")])
def test_compressed_tensors_loads_in_transformers(tiny_models, tiny_text, tmp_path, kind, scheme):
    """The real consumer: transformers + compressed-tensors load the folder on CPU, and its torch perplexity (and
    logits) equal graphq's ONNX ones of the same model."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.linear.compressed_linear import CompressedLinear

    from graphq.evaluate import perplexity, read_text, token_windows
    from graphq.runtimes.torch_lm import TorchCausalLM
    from graphq.tokenizer import load_tokenizer

    source = tiny_models[kind]["onnx"]
    if scheme == "w4a16":
        config = QuantConfig(scheme="w4a16", group_size=32, symmetric=True, format="qdq", target="compressed-tensors",
                             dtype="fp16")
    else:
        config = QuantConfig(scheme="w8a8", target="compressed-tensors", **CALIB)
    out = quantize(source, config, tmp_path / "q", progress=False).output_dir
    quantization = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quantization["quant_method"] == "compressed-tensors"
    assert quantization["format"] == ("pack-quantized" if scheme == "w4a16" else "int-quantized")
    assert quantization["ignore"] == ["lm_head"]  # left float (tied to the embedding in qwen2)
    torch_model = TorchCausalLM(out)
    assert isinstance(torch_model.model.model.layers[0].mlp.down_proj, CompressedLinear)
    windows = token_windows(load_tokenizer(source), read_text(tiny_text), 64, 256)
    onnx_ppl = perplexity(OrtCausalLM(out), windows).ppl
    torch_ppl = perplexity(torch_model, windows).ppl
    assert abs(torch_ppl / onnx_ppl - 1) < 0.005
    onnx_logits, torch_logits = logits(out), torch_model.logits(IDS)
    assert np.abs(onnx_logits - torch_logits).max() < 1e-4
    assert np.abs(onnx_logits - logits(source)).max() > 1e-3  # and it is not the float model


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("axis", [0, 1])
def test_int32_packing_matches_compressed_tensors(bits, axis):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.quantized_compressors.pack_quantized import pack_to_int32 as reference

    from graphq.artifacts.targets.compressed_tensors import pack_to_int32, unpack_from_int32

    half = 1 << (bits - 1)
    values = np.random.default_rng(bits).integers(-half, half, size=(13, 21)).astype(np.int8)
    packed = pack_to_int32(values, bits, axis=axis)
    expected = reference(torch.from_numpy(values), bits, packed_dim=axis).numpy()
    assert packed.dtype == np.int32 and np.array_equal(packed, expected)
    assert np.array_equal(unpack_from_int32(packed, bits, values.shape, axis=axis), values)


CT_REFUSALS = {
    "asymmetric": (["--scheme", "w4a16", "--group-size", "32", "--asym"], ["asymmetric", "--sym"]),
    "partial-group": (["--scheme", "w4a16", "--group-size", "64", "--sym"], ["divisible", "96"]),
    "kv-cache": (["--scheme", "w8a8", "--kv-cache", "int8"], ["kv cache"]),
}


@pytest.mark.parametrize("case", list(CT_REFUSALS))
def test_compressed_tensors_refusals(capsys, tiny_models, tmp_path, case):
    flags, fragments = CT_REFUSALS[case]
    code, out, err = run_cli(capsys, "quantize", tiny_models["llama"]["onnx"], "-o", tmp_path / "q",
                             "--target", "compressed-tensors", *flags)
    assert_one_error(code, out, err, *fragments)
    assert not (tmp_path / "q").exists()


# ---------------------------------------------------------------------------------------------------- gguf


def _hf_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of LLaMA q/k rows (written out independently of graphq's)."""
    n = weights.shape[0]
    return weights.reshape(heads, 2, n // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


GGUF_CASES = {  # id -> (kind, scheme, symmetric, dtype, expected ggml type)
    "llama-q4_1": ("llama", "w4a16", False, "fp16", "Q4_1"),
    "qwen2-q4_0-bf16": ("qwen2", "w4a16", True, "bf16", "Q4_0"),
    "llama-q8_0": ("llama", "w8a16", True, "fp32", "Q8_0"),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_gguf_reads_back_to_graphqs_weights(tiny_models, tmp_path, case):
    """The gguf package reads the file back; its dequantized blocks are graphq's weights (same integers, fp16 scales)."""
    import gguf
    import onnx_ir as ir

    from graphq.algorithms.rtn import quantize_rtn
    from graphq.artifacts.dtypes import numpy_dtype
    from graphq.linear_layers import find_linear_layers

    kind, scheme, symmetric, dtype, ggml_type = GGUF_CASES[case]
    source = tiny_models[kind]["onnx"]
    config = QuantConfig(scheme=scheme, group_size=32, symmetric=symmetric, dtype=dtype, target="gguf", format="qdq")
    result = quantize(source, config, tmp_path / "q", progress=False)
    reader = gguf.GGUFReader(str(result.output_dir / "model.gguf"))
    fields = {name: field.contents() for name, field in reader.fields.items() if name.startswith(("general.", kind))}
    assert fields["general.architecture"] == kind and fields[f"{kind}.block_count"] == 2
    assert fields[f"{kind}.attention.head_count"] == 4 and fields[f"{kind}.attention.head_count_kv"] == 2
    tensors = {t.name: t for t in reader.tensors}
    model = ir.load(source / "model.onnx")
    layers = {layer.name: layer for layer in find_linear_layers(model)}
    assert all(entry["codes"] == "graphq" for entry in result.report["gguf"]["layers"].values())
    bits = 4 if scheme == "w4a16" else 8
    for index in range(2):
        for hf, ggml in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                         ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                         ("mlp.down_proj", "ffn_down")):
            layer = layers[f"model.layers.{index}.{hf}"]
            tensor = tensors[f"blk.{index}.{ggml}.weight"]
            assert tensor.tensor_type.name == ggml_type
            stored = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            # quantize started from the served (dtype-rounded) weights; so does the reference
            served = layer.weight_kn().astype(numpy_dtype(dtype)).astype(np.float32)
            qw = quantize_rtn(served, bits, 32, symmetric)
            scales = qw.scales.astype(np.float16).astype(np.float32)
            zero = np.repeat(qw.zero_points.astype(np.float32), 32, axis=0) if qw.zero_points is not None else 0.0
            expected = ((qw.q.astype(np.float32) - zero) * np.repeat(scales, 32, axis=0)).T  # [n, k]
            m = (zero * np.repeat(scales, 32, axis=0)).T * np.ones_like(expected)
            if kind == "llama" and hf in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = 4 if hf == "self_attn.q_proj" else 2
                expected, m = _hf_permute(expected, heads), _hf_permute(m, heads)
            if ggml_type == "Q4_1":  # m = -z d is rounded to fp16 once per block: the one re-rounded value
                assert np.all(np.abs(stored - expected) <= np.abs(m) * 2.0**-11 + 1e-9)
            else:
                assert np.array_equal(stored, expected)
    embedding = gguf.quants.dequantize(tensors["token_embd.weight"].data, tensors["token_embd.weight"].tensor_type)
    float_embedding = model.graph.initializers["model.embed_tokens.weight"].const_value.numpy()
    assert np.array_equal(embedding, float_embedding.astype(numpy_dtype(dtype)).astype(np.float32))
    assert ("output.weight" in tensors) == (kind == "llama")  # qwen2 ties lm_head to the embedding


def test_gguf_says_what_it_re_rounds_and_refuses_w8a8(capsys, tiny_models, tmp_path):
    import gguf

    out = quantize(tiny_models["qwen2"]["onnx"], QuantConfig(scheme="w4a16", group_size=-1, target="gguf", format="qdq"),
                   tmp_path / "pc", progress=False)
    entries = out.report["gguf"]["layers"].values()
    assert entries and all(entry["codes"] == "re-rounded by gguf" and entry["type"] == "Q4_1" for entry in entries)
    assert gguf.GGUFReader(str(out.output_dir / "model.gguf")).tensors
    code, stdout, err = run_cli(capsys, "quantize", tiny_models["llama"]["onnx"], "-o", tmp_path / "q", "--target", "gguf",
                                "--scheme", "w8a8-dynamic")
    assert_one_error(code, stdout, err, "gguf", "w8a8-dynamic")


def test_verify_reports_the_serving_dtype_path(tiny_models, tiny_text, tmp_path):
    """verify FP32 QUANT on an fp16-serving output: the perplexity of the fp16 path against fp32, and it says so."""
    from graphq.evaluate import read_text, token_windows
    from graphq.tokenizer import load_tokenizer
    from graphq.verify import format_table, verify

    source = tiny_models["llama"]["onnx"]
    windows = token_windows(load_tokenizer(source), read_text(tiny_text), 64, 128)
    fp16 = quantize(source, QuantConfig(scheme="w8a16", dtype="fp16"), tmp_path / "fp16", progress=False).output_dir
    fp32 = quantize(source, QuantConfig(scheme="w8a16", dtype="fp32", target="compressed-tensors"), tmp_path / "fp32",
                    progress=False).output_dir
    result16, result32 = verify(source, fp16, windows), verify(source, fp32, windows)
    assert result16.serving_dtype == "fp16" and "serving dtype fp16" in format_table(result16, 3)
    assert result32.serving_dtype == "fp32" and "serving dtype" not in format_table(result32, 3)
    assert result16.float_ppl == result32.float_ppl and result16.quant_ppl != result32.quant_ppl


# ---------------------------------------------------------------------------------------- quantized embeddings


@pytest.mark.parametrize("format", ["matmulnbits", "qdq"])
@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_quantized_embeddings(capsys, tiny_models, tmp_path, kind, format):
    """int4 embeddings: GatherBlockQuantized or DequantizeLinear + Gather in the ONNX, computing what the float model
    computes with the RTN-dequantized table (a tied lm_head too); stored once in the artifacts; rebuilt exactly."""
    import onnx_ir as ir

    from graphq.algorithms.rtn import quantize_rtn

    source = tiny_models[kind]["onnx"]
    common = dict(scheme="w8a16", group_size=-1, format=format)
    out = quantize(source, QuantConfig(quantize_embeddings="int4", **common), tmp_path / "q", progress=False)
    graph = ir.load(out.output_dir / "model.onnx").graph
    ops = {node.op_type for node in graph}
    assert ("GatherBlockQuantized" in ops) == (format == "matmulnbits")
    assert "model.embed_tokens.weight" not in graph.initializers  # no float table left
    # Reference: the float export with its table replaced by the dequantized RTN table, quantized the same way.
    reference_dir = tmp_path / "reference"
    shutil.copytree(source, reference_dir, ignore=shutil.ignore_patterns("model.onnx*"))
    model = ir.load(source / "model.onnx")
    table = model.graph.initializers["model.embed_tokens.weight"]
    dequantized = quantize_rtn(table.const_value.numpy().T.copy(), 4, 32, False).dequantize().T
    table.const_value = ir.Tensor(np.ascontiguousarray(dequantized), name=table.name)
    ir.save(model, reference_dir / "model.onnx", external_data="model.onnx.data")
    reference = quantize(reference_dir, QuantConfig(**common), tmp_path / "rq", progress=False).output_dir
    quant_logits = logits(out.output_dir)
    assert np.abs(quant_logits - logits(reference)).max() < 1e-4
    assert np.abs(quant_logits - logits(source)).max() > 1e-3
    entry = out.report["embedding"]
    assert entry["bits"] == 4 and entry["tied_lm_head"] == (kind == "qwen2")
    tensors, _ = read_torch(out.output_dir / "quant_model_weight_w8a16.safetensors")
    description = json.loads((out.output_dir / "quant_model_description_w8a16.json").read_text())
    assert tensors["model.embed_tokens.weight"].shape == (48, 64)  # int4 packed along n: [vocab / 2, hidden]
    assert description["model.embed_tokens.weight"] == "W4A16"
    assert "lm_head.weight" in tensors if kind == "llama" else not any(n.startswith("lm_head") for n in tensors)
    rebuild(capsys, out.output_dir, source, tmp_path / "rebuilt")
    assert np.array_equal(quant_logits, logits(tmp_path / "rebuilt"))


def test_quantized_embeddings_in_gguf_and_refusals(capsys, tiny_models, tmp_path):
    import gguf

    from graphq.algorithms.rtn import quantize_rtn

    source = tiny_models["qwen2"]["onnx"]
    config = QuantConfig(scheme="w4a16", group_size=32, symmetric=True, target="gguf", quantize_embeddings="int4",
                         embedding_symmetric=True)
    out = quantize(source, config, tmp_path / "g", progress=False).output_dir
    tensor = next(t for t in gguf.GGUFReader(str(out / "model.gguf")).tensors if t.name == "token_embd.weight")
    assert tensor.tensor_type.name == "Q4_0"
    import onnx_ir as ir

    table = ir.load(source / "model.onnx").graph.initializers["model.embed_tokens.weight"].const_value.numpy()
    qw = quantize_rtn(table.T.copy(), 4, 32, True)
    expected = (qw.q.astype(np.float32) * np.repeat(qw.scales.astype(np.float16).astype(np.float32), 32, axis=0)).T
    assert np.array_equal(gguf.quants.dequantize(tensor.data, tensor.tensor_type), expected)
    for target in ("compressed-tensors", "vllm-ascend"):
        code, stdout, err = run_cli(capsys, "quantize", source, "-o", tmp_path / "x", "--target", target,
                                    "--scheme", "w8a8-dynamic", "--quantize-embeddings", "int8", "--dtype", "fp16")
        assert_one_error(code, stdout, err, target, "quantized embeddings")


def test_gptq_embedding_preserves_the_tied_lm_head_better(tiny_models, tiny_text, tmp_path):
    """--embedding-method gptq: the shared int4 table is fitted to the lm_head's inputs, so the logits move less
    from the float model's than with RTN (on text like the calibration's); an untied lm_head is refused."""
    from graphq.evaluate import read_text, token_windows
    from graphq.tokenizer import load_tokenizer

    source = tiny_models["qwen2"]["onnx"]
    common = dict(scheme="w8a16", group_size=-1, quantize_embeddings="int4", calib=str(tiny_text), num_samples=8,
                  seq_len=64)
    rtn = quantize(source, QuantConfig(**common), tmp_path / "rtn", progress=False).output_dir
    gptq = quantize(source, QuantConfig(embedding_method="gptq", **common), tmp_path / "gptq", progress=False)
    assert gptq.report["embedding"]["method"] == "gptq (lm_head inputs)"
    windows = token_windows(load_tokenizer(source), read_text(tiny_text), 64, 512)
    float_model, rtn_model, gptq_model = (OrtCausalLM(d) for d in (source, rtn, gptq.output_dir))
    errors = {"rtn": 0.0, "gptq": 0.0}
    for window in windows:
        reference = float_model.logits(window)
        errors["rtn"] += float(np.mean((rtn_model.logits(window) - reference) ** 2))
        errors["gptq"] += float(np.mean((gptq_model.logits(window) - reference) ** 2))
    assert errors["gptq"] < 0.9 * errors["rtn"]
    with pytest.raises(GraphqError, match="not tied"):
        quantize(tiny_models["llama"]["onnx"], QuantConfig(embedding_method="gptq", **common), tmp_path / "x",
                 progress=False)


GGUF_CONSUMER = {  # id -> (kind, QuantConfig overrides, logits tolerance)
    "llama-q4_0": ("llama", dict(symmetric=True), 1e-4),
    "qwen2-q4_1-int4-embedding": ("qwen2", dict(symmetric=False, quantize_embeddings="int4"), 2e-3),
}


@pytest.mark.parametrize("case", list(GGUF_CONSUMER))
def test_gguf_loads_in_transformers(tiny_models, tiny_text, tmp_path, case):
    """A real GGUF consumer on this machine: transformers' GGUF loader (llama.cpp's names, its un-permutation of
    LLaMA's q/k rows, the gguf package's dequantization) computes the ONNX's logits and perplexity (Q4_1's m is
    the one value rounded again, hence the looser tolerance)."""
    from graphq.evaluate import perplexity, read_text, token_windows
    from graphq.runtimes.torch_lm import TorchCausalLM
    from graphq.tokenizer import load_tokenizer

    kind, overrides, tolerance = GGUF_CONSUMER[case]
    source = tiny_models[kind]["onnx"]
    config = QuantConfig(scheme="w4a16", group_size=32, target="gguf", format="qdq", dtype="fp16", **overrides)
    out = quantize(source, config, tmp_path / "q", progress=False).output_dir
    torch_model = TorchCausalLM(out, gguf_file="model.gguf")
    onnx_logits = logits(out)
    assert np.abs(torch_model.logits(IDS) - onnx_logits).max() < tolerance
    assert np.abs(onnx_logits - logits(source)).max() > 1e-2
    windows = token_windows(load_tokenizer(source), read_text(tiny_text), 64, 256)
    assert abs(perplexity(torch_model, windows).ppl / perplexity(OrtCausalLM(out), windows).ppl - 1) < 0.01
