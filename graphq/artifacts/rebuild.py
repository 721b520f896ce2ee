"""load-artifacts: rebuild a fake-quant ONNX model from the float export plus the safetensors + description.

The artifacts' integers and parameters are turned back into the QuantizedWeight objects quantize produced and fed
to the same emitters (MatMulNBits, DequantizeLinear, W8A8 QDQ), and the float tensors (norms possibly rewritten by
AWQ, embeddings, float linears) replace the export's; so the rebuilt model computes what the quantized ONNX computes,
and equal logits show that the two artifacts say the same thing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphq.artifacts.codebook import from_tensors as codebook_from_tensors
from graphq.artifacts.layout import W4A8_LAYOUT_SCHEMES, W8A8_LAYOUT_SCHEMES, decode_w4a8, decode_w8a8, decode_weight_only
from graphq.artifacts.layout import TYPES
from graphq.artifacts.naming import float_tensor_sources
from graphq.artifacts.reader import Artifacts, open_artifacts
from graphq.errors import GraphqError
from graphq.linear_layers import find_linear_layers
from graphq.model_io import (
    MODEL_FILENAME,
    atomic_output_dir,
    copy_side_files,
    load_model,
    read_model_config,
    read_report,
    resolve_model_file,
    save_model,
)
from graphq.passes.emitters import emitter_for, formats_of
from graphq.passes.finish import finish_graph
from graphq.passes.weights import set_layer_bias

_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _source_model_of(directory: Path) -> Path:
    source = read_report(directory).get("source_model")
    if isinstance(source, str) and Path(source).is_file():
        return Path(source)
    raise GraphqError(f"cannot tell which float export {directory} came from: pass it with --float")


def _quantize_option(directory: Path, name: str, default):
    """An option of the quantize run that wrote ``directory`` (its report.json), or ``default``."""
    config = read_report(directory).get("config")
    return config.get(name, default) if isinstance(config, dict) else default


def load_artifacts(
    artifact_dir: str | Path,
    output_dir: str | Path,
    float_model: str | Path | None = None,
    format: str | None = None,
    numpy: bool = False,
    scheme: str | None = None,
    overwrite: bool = False,
    fuse: bool | None = None,
) -> Path:
    """Write ``output_dir/model.onnx``: the float export with the artifacts' quantized layers and float tensors.

    ``format``, ``fuse`` (attention into GroupQueryAttention) and MatMulNBits' accuracy level follow the quantize run
    that wrote the artifacts."""
    artifact_dir = Path(artifact_dir)
    from graphq.artifacts.w8a8sc import is_compressed, open_compressed

    if is_compressed(artifact_dir):  # W8A8SC: decompressed and merged over the ranks, then rebuilt as W8A8S
        artifacts = open_compressed(artifact_dir)
    else:
        artifacts = open_artifacts(artifact_dir, scheme=scheme, numpy=numpy)
    model_file = resolve_model_file(float_model) if float_model is not None else _source_model_of(artifact_dir)
    format = format or _quantize_option(artifact_dir, "format", "qdq")
    fuse = _quantize_option(artifact_dir, "fuse_attention", False) if fuse is None else fuse
    choices = [f for f in formats_of("w4a16") if f != "lut"]  # codebook layers always rebuild as lut
    if format not in choices:
        raise GraphqError(f"unknown format '{format}': choose {' or '.join(choices)}")
    read_model_config(model_file.parent)  # its config.json is copied and marked at the end: refuse a damaged one now
    with atomic_output_dir(output_dir, overwrite=overwrite, inputs=[model_file.parent, artifact_dir]) as staging:
        model = load_model(model_file)
        apply_artifacts(model, artifacts, format)
        level = _quantize_option(artifact_dir, "accuracy_level", 0) if format == "matmulnbits" else 0
        finish_graph(model, read_model_config(model_file.parent) if fuse else {}, level, fuse)
        save_model(model, staging / MODEL_FILENAME)
        copy_side_files(model_file.parent, staging)
        config_file = staging / "config.json"
        if config_file.is_file():
            data = json.loads(config_file.read_text())
            data["quantize"] = artifacts.scheme
            config_file.write_text(json.dumps(data, indent=2) + "\n")
    print(
        f"graphq: rebuilt {len(artifacts.layers)} quantized layers ({artifacts.scheme}, {format}) from {artifact_dir} "
        f"onto {model_file}; wrote {output_dir}",
        file=sys.stderr,
    )
    return Path(output_dir) / MODEL_FILENAME


def apply_artifacts(model, artifacts: Artifacts, format: str) -> None:
    """Rewrite a float model in place from checked artifacts (shapes are checked against the model here)."""
    layers = find_linear_layers(model)
    by_name = {layer.name: layer for layer in layers}
    if layers and artifacts.serving_dtype != "fp32" and layers[0].dtype == ir.DataType.FLOAT:
        # quantize rounded the float32 graph to the serving dtype before quantizing; so does the rebuild, so that
        # tensors the artifacts do not hold (rotary tables, constants) match too.
        from graphq.passes.serving_dtype import round_initializers

        round_initializers(model, artifacts.serving_dtype)
    from graphq.passes.embedding import emit_embedding, find_embedding, tied_lm_head

    embedding = find_embedding(model)
    quantized_embedding = embedding is not None and embedding.name in artifacts.layers
    tied = tied_lm_head(layers, embedding) if quantized_embedding else None
    missing = next((name for name in artifacts.layers if name not in by_name
                    and not (quantized_embedding and name == embedding.name)), None)
    if missing is not None:
        raise GraphqError(f"the artifacts quantize {missing}, which the float model has no linear layer for: wrong --float model?")
    sources = float_tensor_sources(model, layers, set(artifacts.layers))
    float_names = []
    for name in artifacts.float_names:
        source = sources.get(name)
        if source is None:
            if name.endswith(".bias") and not np.any(artifacts.store.get(name)):
                # msModelSlim's anti-outlier pass gives norms an all-zero bias the float model lacks: nothing lost.
                continue
            if name.endswith(".bias"):
                raise GraphqError(f"cannot rebuild {name}: the artifacts give it a non-zero bias (msModelSlim's "
                                  "anti-outlier shift) but the float model's module has none")
            raise GraphqError(f"the artifacts hold float tensor {name}, which the float model does not have: wrong --float model?")
        dtype, shape = artifacts.store.specs[name]
        # The serving dtype may differ from the ONNX's (fp16 artifacts of an fp32-computing export): any float fits.
        if tuple(shape) != tuple(source.shape) or dtype not in _FLOAT_DTYPES:
            raise GraphqError(
                f"{name} is {dtype} {list(shape)} in the artifacts but {source.dtype} {list(source.shape)} in the float model"
            )
        float_names.append(name)
    unsaved = next((name for name in sources if name not in artifacts.types), None)
    if unsaved is not None:
        raise GraphqError(f"the float model has {unsaved}, which the artifacts do not hold: wrong --float model?")
    for name in float_names:
        array = np.asarray(artifacts.store.get(name))
        check_finite(name, array)
        sources[name].store(model, array.astype(sources[name].dtype))
    # Activation schemes have one form (QDQ); weight-only layers take the requested format.
    emitters = {scheme: emitter_for(scheme, format if format in formats_of(scheme) else "qdq")
                for name, scheme in artifacts.layer_schemes.items() if name not in artifacts.codebook}
    for name, (n, k) in artifacts.layers.items():
        if quantized_embedding and name == embedding.name:
            # The quantized token embedding (and a tied lm_head with the same integers), as quantize emitted them.
            if (n, k) != (embedding.out_features, embedding.in_features):
                raise GraphqError(f"{name}.weight is [{n}, {k}] but the float model's embedding is "
                                  f"[{embedding.out_features}, {embedding.in_features}]: wrong --float model?")
            packing = artifacts.packing.get(name, "none")
            qw = decode_weight_only(artifacts.layer_tensors(name), artifacts.bits(name), k, artifacts.group_size_of(name),
                                    packing != "none", pack_along="n" if packing == "n" else "k")
            emit_embedding(model, embedding, qw, format)
            if tied is not None:
                emitter_for(artifacts.layer_schemes[name], format if format in formats_of(artifacts.layer_schemes[name])
                            else "qdq").emit(model, tied, qw, {})
            continue
        layer = by_name[name]
        scheme = artifacts.layer_schemes[name]
        emitter = emitters.get(scheme)  # codebook layers: the lut emitter, below
        if (n, k) != (layer.out_features, layer.in_features):
            raise GraphqError(
                f"{name}.weight is for a [{n}, {k}] layer but the float model's {name} is "
                f"[{layer.out_features}, {layer.in_features}]: wrong --float model?"
            )
        tensors = artifacts.layer_tensors(name)
        for suffix, array in tensors.items():
            if suffix not in ("weight", "quant_bias"):  # integers are finite; deq_scale may hold float32 bits
                check_finite(f"{name}.{suffix}", array.astype(np.uint32).view(np.float32) if suffix == "deq_scale" and array.dtype == np.int64 else array)
        if scheme in W8A8_LAYOUT_SCHEMES:
            qw, input_scale, input_offset, bias = decode_w8a8(tensors)
            _check_w8a8_bias(name, layer, bias, tensors)
            emitter.emit(model, layer, qw, {"input_scale": input_scale, "input_offset": input_offset})
            continue
        if (layer.bias is None) != ("bias" not in tensors):
            raise GraphqError(f"{name}: the float model's layer {'has' if layer.bias is not None else 'has no'} bias "
                              f"but the artifacts {'do not hold' if 'bias' not in tensors else 'hold'} {name}.bias")
        if "bias" in tensors:
            set_layer_bias(model, layer, np.asarray(tensors["bias"]).astype(layer.bias.const_value.dtype.numpy()))
        if name in artifacts.codebook:  # codebook layers always rebuild through the lut emitter
            info = artifacts.codebook[name]
            cw = codebook_from_tensors(tensors, k, info["bits"], info["group_size"])
            emitter_for(scheme, "lut").emit(model, layer, cw, {})
            continue
        bits = artifacts.bits(name)
        packing = artifacts.packing.get(name, "none")
        weight = tensors["weight"]
        if bits == 4 and packing == "none" and (weight.min() < -8 or weight.max() > 7):
            raise GraphqError(f"{name}.weight holds values outside the int4 range [-8, 7]: not {TYPES[scheme]} data")
        if scheme in W4A8_LAYOUT_SCHEMES:
            qw = decode_w4a8(tensors, k, artifacts.group_size_of(name), packing != "none")
            details = {}
            if scheme == "w4a8":
                details = {"input_scale": float(tensors["input_scale"][0]),
                           "input_offset": int(round(float(tensors["input_offset"][0])))}
            emitter.emit(model, layer, qw, details)
            continue
        qw = decode_weight_only(tensors, bits, k, artifacts.group_size_of(name), packing != "none",
                                pack_along="n" if packing == "n" else "k")
        emitter.emit(model, layer, qw, {})
    if artifacts.kv_names:
        apply_kv_cache(model, artifacts)


def apply_kv_cache(model, artifacts: Artifacts) -> None:
    """Per-head QDQ on every present.<i>.key|value from the kv_cache_scale / kv_cache_offset tensors."""
    try:
        from graphq.passes.kv_cache import emit_kv_qdq
    except ImportError as exc:
        raise GraphqError("rebuilding an int8 KV cache needs graphq.passes.kv_cache, which this graphq build lacks") from exc
    outputs = {value.name for value in model.graph.outputs}
    for name in artifacts.kv_names:
        if not name.endswith(".kv_cache_scale"):
            continue
        prefix = name[: -len(".kv_cache_scale")]  # model.layers.<i>.self_attn.k_proj
        index = prefix.split(".")[2]
        output = f"present.{index}.{'key' if prefix.endswith('k_proj') else 'value'}"
        if output not in outputs:
            raise GraphqError(f"{name} is for {output}, which the float model does not output")
        check_finite(name, np.asarray(artifacts.store.get(name)))
        check_finite(f"{prefix}.kv_cache_offset", np.asarray(artifacts.store.get(f"{prefix}.kv_cache_offset")))
        scales = np.asarray(artifacts.store.get(name)).astype(np.float32).reshape(-1)
        offsets = np.asarray(artifacts.store.get(f"{prefix}.kv_cache_offset")).astype(np.float32).round().reshape(-1)
        value = next(v for v in model.graph.outputs if v.name == output)
        heads = value.shape[1] if value.shape is not None and len(value.shape) == 4 else None
        if isinstance(heads, int) and len(scales) != heads:
            # Per channel [heads * head_dim] (msModelSlim's C8): graphq's KV QDQ is per head, so each head's
            # channels must share one scale.
            if len(scales) % heads:
                raise GraphqError(f"{name} has {len(scales)} values, which is neither per head nor per channel for {heads} heads")
            per_head, per_head_offsets = scales.reshape(heads, -1), offsets.reshape(heads, -1)
            if np.any(per_head != per_head[:, :1]) or np.any(per_head_offsets != per_head_offsets[:, :1]):
                raise GraphqError(f"cannot rebuild {name}: its per-channel scales differ within a head, and graphq's "
                                  "int8 KV cache is per head")
            scales, offsets = per_head[:, 0].copy(), per_head_offsets[:, 0].copy()
        emit_kv_qdq(model, output, scales, offsets.astype(np.int64))


def check_finite(name: str, array: np.ndarray) -> None:
    """A NaN or infinite scale, offset or float tensor rebuilds a model whose every logit is NaN: refuse it here."""
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise GraphqError(f"{name} holds {bad} NaN or infinite value(s): the artifact is damaged, write it again")


def _check_w8a8_bias(name, layer, bias: np.ndarray, tensors: dict) -> None:
    """quant_bias must fold the float model's bias (within half a deq_scale step): else the artifact is inconsistent."""
    float_bias = layer.bias_array() if layer.bias is not None else np.zeros_like(bias)
    deq = tensors["deq_scale"]
    deq = deq.astype(np.uint32).view(np.float32) if deq.dtype == np.int64 else deq
    if np.any(np.abs(bias - float_bias) > 0.5 * np.abs(deq) * (1 + 1e-3) + 1e-6 * np.abs(float_bias)):
        raise GraphqError(f"{name}.quant_bias does not match the float model's bias: wrong --float model or input_offset")
