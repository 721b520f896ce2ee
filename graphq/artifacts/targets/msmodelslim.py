"""The msModelSlim layouts MindIE (V0) and vllm-ascend (ascendV1) load: shared encoding and writing.

Ground truth: real msModelSlim 26.1.0 output for SmolLM2 (tensor listings and descriptions, see the README's
"Deployment artifacts"). Both layouts store weights [n, k] int8 under Hugging Face names with float32
weight_scale / weight_offset; W8A8 layers also carry weight_scale / weight_offset, float32 input_scale /
input_offset (float16 for fp16 ONNX models), int32 quant_bias and deq_scale as the float32's bits in an int64
(float32 for bf16 serving). A linear's ``.bias`` is typed FLOAT. Per-group int4 is packed along n
(``(w[2j+1] << 4) | (w[2j] & 0xF)`` pairs adjacent output rows, [n/2, k]), the only packing msModelSlim writes.
KV-cache int8 (C8): ``<k|v>_proj.kv_cache_scale`` / ``kv_cache_offset`` per channel [kv_heads * head_dim],
symmetric (offsets 0), and ``kv_cache_type`` / ``kv_quant_type`` "C8" in the description. The two differ in the
description (file name, header keys, format version) and config.json; the subclasses in mindie.py and
vllm_ascend.py say how.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from graphq.artifacts.description import FLOAT, KV_CACHE_TYPE, file_tag
from graphq.artifacts.dtypes import TORCH_NAMES, cast, numpy_dtype
from graphq.algorithms.codebook import CodebookWeight
from graphq.artifacts.codebook import to_tensors as codebook_tensors
from graphq.artifacts.layout import (
    INT4_SCHEMES,
    PACKING_ALONG_N,
    ROW_PARALLEL,
    TYPES,
    W4A8_LAYOUT_SCHEMES,
    W8A8_LAYOUT_SCHEMES,
    encode_w4a8,
    encode_w8a8,
    encode_weight_only,
    model_quant_type,
)
from graphq.artifacts.numpy_io import write_numpy
from graphq.artifacts.safetensors_io import GB, write_safetensors
from graphq.artifacts.targets import ArtifactTarget, WriteJob
from graphq.errors import GraphqError

#: msModelSlim's format version: written by its ascendV1 saver, whose int4 weights are packed along n.
FORMAT_VERSION = "1.0.0"
_KV_LAYER = re.compile(r"model\.layers\.(\d+)\.self_attn\.([kv])_proj")


def kv_cache_tensors(kv_cache: dict, channels: dict[str, int]) -> dict[str, np.ndarray]:
    """report["kv_cache"] -> {model.layers.<i>.self_attn.{k,v}_proj.kv_cache_{scale,offset}: float32 [channels]}.

    graphq's KV QDQ is per head and symmetric; each head's scale is repeated over its head_dim channels (the
    channels of k_proj / v_proj's output), the per-channel form MindIE and vllm-ascend read."""
    tensors = {}
    for index, entry in sorted(kv_cache.get("layers", {}).items(), key=lambda item: int(item[0])):
        for kind, module in (("key", "k_proj"), ("value", "v_proj")):
            prefix = f"model.layers.{int(index)}.self_attn.{module}"
            scales = np.asarray(entry[f"{kind}_scale"], dtype=np.float32).reshape(-1)
            offsets = np.asarray(entry[f"{kind}_offset"], dtype=np.float32).reshape(-1)
            if offsets.any():
                raise GraphqError(f"{prefix}: the KV cache has non-zero offsets, but C8 artifacts are symmetric")
            width = channels.get(prefix)
            if width is None or width % len(scales):
                raise GraphqError(f"{prefix}: cannot spread {len(scales)} KV head scales over its output channels")
            repeat = width // len(scales)
            tensors[f"{prefix}.kv_cache_scale"] = np.repeat(scales, repeat)
            tensors[f"{prefix}.kv_cache_offset"] = np.zeros(width, dtype=np.float32)
    return tensors


class MsModelSlimTarget(ArtifactTarget):
    schemes = ("w4a16", "w8a16", "w8a8", "w8a8-dynamic", "w8a8s", "w4a8", "w4a8-dynamic")
    #: MindIE and vllm-ascend take float16 or bfloat16 only (config.json torch_dtype).
    dtypes = ("fp16", "bf16")
    save_formats = ("onnx", "safetensors", "numpy")
    kv_cache = True

    # --- what the subclasses set ---
    def description_name(self, scheme: str) -> str:
        raise NotImplementedError

    def description_header(self, job: WriteJob, packed: bool, kv: bool) -> dict:
        raise NotImplementedError

    def weight_stem(self, scheme: str) -> str:
        return f"quant_model_weight_{file_tag(scheme)}"

    # --- shared ---
    def packs_int4(self, collector) -> bool:
        return collector.pack and any(s in INT4_SCHEMES and n not in collector.codebook
                                      for n, s in collector.layer_schemes.items())

    def model_quant_type(self, collector) -> str:
        """The description's model_quant_type: W4A16_LUT / W3A16_LUT when the quantized layers are codebooks."""
        return model_quant_type(collector.scheme, bool(collector.codebook))

    def encode_layer(self, collector, layer, qw, details, scheme) -> dict[str, np.ndarray]:
        model_dtype = np.dtype(layer.dtype.numpy())
        serving = collector.serving_dtype(model_dtype)
        bias = None if layer.bias is None else layer.bias.const_value.numpy()
        if isinstance(qw, CodebookWeight):  # lut_mode: packed codes, weight_lut (+ weight_lut_scale), the float bias
            tensors = codebook_tensors(qw)
            if bias is not None:
                tensors["bias"] = cast(bias, serving)
            return tensors
        if scheme in W8A8_LAYOUT_SCHEMES:  # W8A8S is W8A8's tensors with the pruned zeros in the weight
            return encode_w8a8(qw, bias, float(details["input_scale"]), int(details["input_offset"]), model_dtype,
                               serving_dtype=serving, weight_params=True)
        if scheme in W4A8_LAYOUT_SCHEMES:
            static = scheme == "w4a8"
            act_dtype = np.float16 if model_dtype == np.float16 else np.float32
            return encode_w4a8(qw, None if bias is None else cast(bias, serving), numpy_dtype(serving), collector.pack,
                               layer.name.rsplit(".", 1)[-1] in ROW_PARALLEL,
                               float(details["input_scale"]) if static else None,
                               int(details["input_offset"]) if static else None, act_dtype)
        pack = collector.pack and scheme == "w4a16"
        return encode_weight_only(qw, None if bias is None else cast(bias, serving), numpy_dtype(serving), pack,
                                  pack_along="n")

    def metadata(self, job: WriteJob) -> dict[str, str]:
        collector = job.collector
        return {
            "graphq_version": job.version,
            "scheme": collector.scheme,
            "group_size": str(collector.group_size),
            "symmetric": str(collector.symmetric).lower(),
            "weight_packing": PACKING_ALONG_N if self.packs_int4(collector) else "none",
            "serving_dtype": collector.serving_dtype(),
            "target": self.name,
            # codebook layers: K, bits and group size per layer (the packed codes' padding hides them)
            **({"lut_mode": "true", "lut_layers": json.dumps(collector.codebook, sort_keys=True)}
               if collector.codebook else {}),
        }

    def write(self, job: WriteJob) -> list[Path]:
        collector = job.collector
        floats = job.float_sources()
        channels = {layer.name: layer.out_features for layer in job.layers}
        kv = kv_cache_tensors(job.kv_cache, channels) if job.kv_cache else {}
        types = {name: FLOAT for name in floats}
        for name, tensors in collector.layers.items():
            for suffix in tensors:
                # msModelSlim types a quantized linear's bias FLOAT: it is the float bias, not a quantized tensor.
                codebook = collector.codebook.get(name)
                kind = codebook["type"] if codebook else TYPES[collector.layer_schemes[name]]
                types[f"{name}.{suffix}"] = FLOAT if suffix == "bias" else kind
        types.update({name: KV_CACHE_TYPE for name in kv})

        def tensors() -> Iterator[tuple[str, np.ndarray]]:
            yield from job.stored_tensors(floats)
            yield from kv.items()

        written = []
        metadata = self.metadata(job)
        stem = self.weight_stem(collector.scheme)
        if "safetensors" in job.formats:
            part_bytes = None if job.part_file_size_gb is None else max(1, int(job.part_file_size_gb * GB))
            written += write_safetensors(tensors(), job.out_dir, stem, part_bytes, metadata)
        if "numpy" in job.formats:
            written += write_numpy(tensors(), types, job.out_dir, stem, metadata)
        path = job.out_dir / self.description_name(collector.scheme)
        data = self.description_header(job, self.packs_int4(collector), bool(kv))
        if kv:
            data["kv_cache_type"] = KV_CACHE_TYPE
            data["kv_quant_type"] = KV_CACHE_TYPE
        data.update(types)
        path.write_text(json.dumps(data, indent=2) + "\n")
        written.append(path)
        return written

    def set_dtype(self, config: dict, collector) -> dict:
        name = TORCH_NAMES[collector.serving_dtype()]
        config["torch_dtype"] = name
        if "dtype" in config:  # transformers >= 4.56 writes "dtype"; keep both in step
            config["dtype"] = name
        return config
