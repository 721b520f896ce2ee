"""--target compressed-tensors: the format vLLM, transformers and llm-compressor read (``quant_method:
compressed-tensors`` in config.json), so the output folder loads with ``AutoModelForCausalLM.from_pretrained``
(with the ``compressed-tensors`` package) and serves in vLLM.

Files: ``model.safetensors`` (or Hugging Face's ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``)
beside model.onnx, and ``quantization_config`` in config.json. Per layer (Hugging Face names):

- W4A16 / W8A16, format ``pack-quantized``: ``weight_packed`` int32 [n, ceil(k / (32 / bits))] (values + 2^(b-1),
  little end first: value i of a word at bits 4i.. for int4), ``weight_scale`` [n, groups] in the serving dtype,
  ``weight_zero_point`` int32 packed the same way along n, [ceil(n / (32 / bits)), groups] (asymmetric only,
  signed: z - 2^(b-1)), ``weight_shape`` int32 [2] = [n, k].
- W8A8 (static) and W8A8_DYNAMIC, format ``int-quantized``: ``weight`` int8 [n, k], ``weight_scale`` [n, 1];
  static: ``input_scale`` [1] and ``input_zero_point`` int8 [1] (graphq's signed offset; asymmetric per tensor);
  dynamic: per-token symmetric activations (the runtime computes max|x| / 127.5 where graphq's graph uses / 127:
  the one value this target re-rounds).
- ``bias``, norms, embeddings and float linears (``ignore``) in the serving dtype.

Weight-only layers are symmetric: compressed-tensors 0.12 (what transformers 4.57 loads with) cannot decompress
packed zero points, so asymmetric weights are refused. Scales (and W8A8 input scales) are rounded to the serving dtype before the layer is emitted, so the ONNX computes
what transformers loads. Refused: group sizes that do not divide a layer's in_features (compressed-tensors cannot
dequantize a partial group), weight-only and activation schemes in one model, and --kv-cache int8 (the format's
KV-cache scheme is per tensor, graphq's per head).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from graphq.algorithms.rtn import QuantizedWeight
from graphq.artifacts.dtypes import TORCH_NAMES, cast, numpy_dtype
from graphq.artifacts.safetensors_io import GB, write_safetensors
from graphq.artifacts.targets import ArtifactTarget, WriteJob, register_target
from graphq.errors import GraphqError

WEIGHT_ONLY = ("w4a16", "w8a16")
ACTIVATION = ("w8a8", "w8a8-dynamic")
STEM = "model"  # Hugging Face's model.safetensors / model-0000i-of-0000n.safetensors


def pack_to_int32(values: np.ndarray, bits: int, axis: int = 1) -> np.ndarray:
    """Signed integers [rows, cols] -> int32 words along ``axis`` as compressed-tensors' pack_to_int32 packs them:
    each value + 2^(b-1), 32/b values per word, the first at the lowest bits, the last word zero-padded."""
    values = np.asarray(values)
    if axis == 0:
        return pack_to_int32(values.T, bits, 1).T.copy()
    per_word = 32 // bits
    unsigned = (values.astype(np.int64) + (1 << (bits - 1))).astype(np.uint32)
    rows, cols = unsigned.shape
    padded = np.zeros((rows, -(-cols // per_word) * per_word), dtype=np.uint32)
    padded[:, :cols] = unsigned
    words = padded.reshape(rows, -1, per_word)
    packed = np.zeros(words.shape[:2], dtype=np.uint32)
    for i in range(per_word):
        packed |= words[:, :, i] << np.uint32(bits * i)
    return packed.view(np.int32)


def unpack_from_int32(packed: np.ndarray, bits: int, shape: tuple[int, int], axis: int = 1) -> np.ndarray:
    """Inverse of pack_to_int32: int32 words -> signed integers of ``shape``."""
    if axis == 0:
        return unpack_from_int32(packed.T, bits, (shape[1], shape[0]), 1).T.copy()
    per_word = 32 // bits
    words = packed.view(np.uint32)
    mask = np.uint32((1 << bits) - 1)
    values = np.stack([(words >> np.uint32(bits * i)) & mask for i in range(per_word)], axis=-1)
    values = values.reshape(words.shape[0], -1)[: shape[0], : shape[1]]
    return (values.astype(np.int64) - (1 << (bits - 1))).astype(np.int8)


def _signed(qw: QuantizedWeight) -> tuple[np.ndarray, np.ndarray | None]:
    """graphq's integers [K, N] -> signed [n, k] and signed zero points [n, groups] (None when symmetric)."""
    half = 1 << (qw.bits - 1)
    if qw.symmetric:
        return np.ascontiguousarray(qw.q.astype(np.int8).T), None
    signed = (qw.q.astype(np.int16) - half).astype(np.int8).T
    return np.ascontiguousarray(signed), np.ascontiguousarray((qw.zero_points.astype(np.int16) - half).astype(np.int8).T)


class CompressedTensorsTarget(ArtifactTarget):
    name = "compressed-tensors"
    loaded_by = "vLLM, transformers (compressed-tensors), llm-compressor"
    schemes = WEIGHT_ONLY + ACTIVATION

    def check(self, layer_schemes, group_sizes, symmetric, shapes=None) -> None:
        super().check(layer_schemes, group_sizes, symmetric, shapes)
        used = {s for s in layer_schemes.values() if s != "float"}
        if used & set(WEIGHT_ONLY) and used & set(ACTIVATION):
            raise GraphqError("--target compressed-tensors writes one format per model (pack-quantized or "
                              "int-quantized): do not mix weight-only and W8A8 schemes")
        for name, group in group_sizes.items():
            if shapes and name in shapes:
                self.check_layer_shape(name, shapes[name][1], group)
            if layer_schemes.get(name) in WEIGHT_ONLY and not symmetric.get(name, True):
                # compressed-tensors 0.12's pack-quantized decompression raises on packed zero points, so
                # transformers cannot load asymmetric int4/int8 weights from this format.
                raise GraphqError(f"--target compressed-tensors cannot hold asymmetric weights ({name}): its loader "
                                  "does not decompress packed zero points; pass --sym")

    def check_layer_shape(self, name: str, in_features: int, group: int) -> None:
        if group != -1 and in_features % group:
            raise GraphqError(f"--target compressed-tensors needs in_features divisible by the group size: {name} has "
                              f"{in_features} inputs and group {group}; use a group size dividing it (or -1)")

    def scale_dtype(self, serving_dtype: str) -> np.dtype:
        return numpy_dtype(serving_dtype)

    def prepare(self, qw, details, serving_dtype):
        if serving_dtype == "fp32":
            return qw, details
        scales = qw.scales.astype(numpy_dtype(serving_dtype)).astype(np.float32)
        qw = QuantizedWeight(q=qw.q, scales=scales, zero_points=qw.zero_points, bits=qw.bits, group_size=qw.group_size)
        if "input_scale" in details:
            details = {**details, "input_scale": float(np.float32(details["input_scale"]).astype(numpy_dtype(serving_dtype)))}
        return qw, details

    def encode_layer(self, collector, layer, qw, details, scheme) -> dict[str, np.ndarray]:
        group = qw.group_size if qw.group_size < layer.in_features else -1
        self.check_layer_shape(layer.name, layer.in_features, group)
        serving = collector.serving_dtype(np.dtype(layer.dtype.numpy()))
        signed, zero_points = _signed(qw)
        tensors: dict[str, np.ndarray] = {"weight_scale": cast(qw.scales.T, serving)}
        if scheme in WEIGHT_ONLY:
            tensors["weight_packed"] = pack_to_int32(signed, qw.bits)
            tensors["weight_shape"] = np.array(signed.shape, dtype=np.int32)
            if zero_points is not None:
                tensors["weight_zero_point"] = pack_to_int32(zero_points, qw.bits, axis=0)
        else:
            tensors["weight"] = signed
            if scheme == "w8a8":
                tensors["input_scale"] = cast(np.array([details["input_scale"]], dtype=np.float32), serving)
                tensors["input_zero_point"] = np.array([int(details["input_offset"])], dtype=np.int8)
        if layer.bias is not None:
            tensors["bias"] = cast(layer.bias.const_value.numpy(), serving)
        return tensors

    def quantization_config(self, collector, float_linears: list[str]) -> dict:
        groups: dict[str, dict] = {}
        members: dict[str, list[str]] = {}
        for name, scheme in collector.layer_schemes.items():
            bits = 4 if scheme == "w4a16" else 8
            group = collector.layer_group_sizes[name]
            symmetric = "weight_zero_point" not in collector.layers[name]
            weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "dynamic": False, "actorder": None,
                       "strategy": "group" if group != -1 else "channel", "group_size": group if group != -1 else None,
                       "block_structure": None, "observer": "minmax", "observer_kwargs": {}}
            inputs = None
            if scheme == "w8a8":
                inputs = {"num_bits": 8, "type": "int", "symmetric": False, "dynamic": False, "strategy": "tensor",
                          "group_size": None, "actorder": None, "block_structure": None, "observer": "minmax",
                          "observer_kwargs": {}}
            elif scheme == "w8a8-dynamic":
                inputs = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True, "strategy": "token",
                          "group_size": None, "actorder": None, "block_structure": None, "observer": None,
                          "observer_kwargs": {}}
            key = json.dumps([weights, inputs], sort_keys=True)
            groups.setdefault(key, {"weights": weights, "input_activations": inputs, "output_activations": None})
            members.setdefault(key, []).append(name)
        config_groups = {}
        for index, (key, scheme) in enumerate(groups.items()):
            # One group for the whole model: the class name; several: the exact module names.
            targets = ["Linear"] if len(groups) == 1 else [f"re:^{re.escape(n)}$" for n in members[key]]
            config_groups[f"group_{index}"] = {**scheme, "targets": targets}
        weight_only = set(collector.layer_schemes.values()) <= set(WEIGHT_ONLY)
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized" if weight_only else "int-quantized",
            "quantization_status": "compressed",
            "config_groups": config_groups,
            "ignore": sorted(float_linears),
            "kv_cache_scheme": None,
            "global_compression_ratio": None,
            "sparsity_config": {},
            "transform_config": {},
            "version": "0.12.2",
        }

    def write(self, job: WriteJob) -> list[Path]:
        collector = job.collector
        floats = job.float_sources()
        part_bytes = None if job.part_file_size_gb is None else max(1, int(job.part_file_size_gb * GB))
        metadata = {"graphq_version": job.version, "target": self.name, "serving_dtype": collector.serving_dtype()}
        return write_safetensors(job.stored_tensors(floats), job.out_dir, STEM, part_bytes, metadata)

    def edit_config(self, config: dict, collector) -> dict:
        config["quantization_config"] = self.quantization_config(collector, collector.float_linears)
        config.pop("quantize", None)
        config["torch_dtype"] = TORCH_NAMES[collector.serving_dtype()]
        if "dtype" in config:
            config["dtype"] = config["torch_dtype"]
        return config


register_target(CompressedTensorsTarget())
