"""Collect each quantized layer's deployment tensors as quantize finishes it, then write the artifact files.

Memory: a layer's tensors are encoded at once into their stored integer form (int8 weights, 4-bit weights packed
two per byte unless --no-pack, float32 scales); no float copy is kept. With a ``spill_dir`` (quantize uses one in
its staging folder) they go straight to plain .npy files there (no pickle) and are read back memory-mapped while
writing, so memory holds at most one shard; without one they stay in memory until the end. Float tensors
(embeddings, norms, float linears) are read from the graph only while writing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import onnx_ir as ir

from graphq.algorithms.rtn import QuantizedWeight
from graphq.artifacts.description import FLOAT, KV_CACHE_TYPE, description_name, weight_stem, write_description
import json

from graphq.algorithms.codebook import CodebookWeight
from graphq.artifacts.codebook import to_tensors as codebook_tensors
from graphq.artifacts.layout import PACKING, TYPES, encode_w8a8, encode_weight_only, lut_type
from graphq.artifacts.naming import float_tensor_sources
from graphq.artifacts.numpy_io import write_numpy
from graphq.artifacts.safetensors_io import GB, write_safetensors
from graphq.errors import GraphqError
from graphq.linear_layers import LinearLayer

SAVE_FORMATS = ("onnx", "safetensors", "numpy")


def kv_cache_tensors(kv_cache: dict) -> dict[str, np.ndarray]:
    """report["kv_cache"] -> {model.layers.<i>.self_attn.{k,v}_proj.kv_cache_{scale,offset}: float32}."""
    tensors = {}
    for index, entry in sorted(kv_cache.get("layers", {}).items(), key=lambda item: int(item[0])):
        for kind, module in (("key", "k_proj"), ("value", "v_proj")):
            prefix = f"model.layers.{int(index)}.self_attn.{module}"
            tensors[f"{prefix}.kv_cache_scale"] = np.asarray(entry[f"{kind}_scale"], dtype=np.float32).reshape(-1)
            tensors[f"{prefix}.kv_cache_offset"] = np.asarray(entry[f"{kind}_offset"], dtype=np.float32).reshape(-1)
    return tensors


class ArtifactCollector:
    """Receives (layer, qw, details) from quantize's finish callback; writes the artifacts at the end.

    ``scheme`` is the model's (it names the files and model_quant_type); a layer may carry another scheme
    (scheme overrides), which its tensors' types in the description then say."""

    def __init__(self, scheme: str, group_size: int, symmetric: bool, pack: bool = True, spill_dir: Path | None = None):
        self.scheme = scheme
        self.group_size = group_size
        self.symmetric = symmetric
        self.pack = pack
        self.spill_dir = spill_dir
        self.layers: dict[str, dict[str, np.ndarray | Path]] = {}
        self.layer_schemes: dict[str, str] = {}
        self.codebook: dict[str, dict] = {}  # codebook (LUT) layers: type, in_features, bits, group_size

    def add(self, layer: LinearLayer, qw: QuantizedWeight, details: dict, scheme: str | None = None) -> None:
        scheme = scheme or self.scheme
        if scheme not in TYPES:
            raise GraphqError(f"{layer.name}: no artifact layout for scheme {scheme}")
        bias = None if layer.bias is None else layer.bias.const_value.numpy()
        float_dtype = np.dtype(layer.dtype.numpy())
        if isinstance(qw, CodebookWeight):
            tensors = codebook_tensors(qw)
            if bias is not None:
                tensors["bias"] = np.asarray(bias).astype(bias.dtype)
            group_size = -1 if qw.per_channel else qw.group_size
            self.codebook[layer.name] = {
                "type": lut_type(scheme, details.get("weight_format", "lut")),
                "in_features": layer.in_features, "bits": qw.bits, "group_size": group_size,
            }
        elif scheme == "w8a8":
            missing = [key for key in ("input_scale", "input_offset") if key not in details]
            if missing:
                raise GraphqError(f"{layer.name}: W8A8 artifacts need {' and '.join(missing)} from the quantizer")
            tensors = encode_w8a8(qw, bias, float(details["input_scale"]), int(details["input_offset"]), float_dtype)
        else:
            pack = self.pack and scheme == "w4a16"
            tensors = encode_weight_only(qw, bias, bias.dtype if bias is not None else float_dtype, pack)
        if self.spill_dir is not None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            spilled = {}
            for suffix, array in tensors.items():
                path = self.spill_dir / f"{len(self.layers):06d}.{suffix}.npy"
                np.save(path, array, allow_pickle=False)
                spilled[suffix] = path
            tensors = spilled
        self.layers[layer.name] = tensors
        self.layer_schemes[layer.name] = scheme

    def metadata(self, version: str) -> dict[str, str]:
        return {
            "graphq_version": version,
            "scheme": self.scheme,
            "group_size": str(self.group_size),
            "symmetric": str(self.symmetric).lower(),
            "weight_packing": PACKING if self.pack and "w4a16" in self.layer_schemes.values() else "none",
            **({"lut_mode": "true", "lut_layers": json.dumps(self.codebook, sort_keys=True)} if self.codebook else {}),
        }

    def write(
        self,
        model: ir.Model,
        layers: list[LinearLayer],
        out_dir: Path,
        formats: list[str],
        part_file_size_gb: float | None,
        version: str,
        kv_cache: dict | None = None,
    ) -> list[Path]:
        """Write the description and the safetensors (and numpy dicts when asked) into ``out_dir``."""
        floats = float_tensor_sources(model, layers, set(self.layers))
        kv = kv_cache_tensors(kv_cache) if kv_cache else {}
        types = {name: FLOAT for name in floats}
        for name, tensors in self.layers.items():
            kind = self.codebook[name]["type"] if name in self.codebook else TYPES[self.layer_schemes[name]]
            types.update({f"{name}.{suffix}": kind for suffix in tensors})
        types.update({name: KV_CACHE_TYPE for name in kv})
        clash = set(floats) & {f"{n}.{s}" for n, t in self.layers.items() for s in t}
        if clash:
            raise GraphqError(f"tensor name {sorted(clash)[0]} is both float and quantized: cannot write artifacts")

        def tensors() -> Iterator[tuple[str, np.ndarray]]:
            for name, source in floats.items():
                yield name, source.array()
            for name, layer_tensors in self.layers.items():
                for suffix, array in layer_tensors.items():
                    yield f"{name}.{suffix}", np.load(array, mmap_mode="r") if isinstance(array, Path) else array
            yield from kv.items()

        written = []
        metadata = self.metadata(version)
        stem = weight_stem(self.scheme)
        if "safetensors" in formats:
            part_bytes = None if part_file_size_gb is None else max(1, int(part_file_size_gb * GB))
            written += write_safetensors(tensors(), out_dir, stem, part_bytes, metadata)
        if "numpy" in formats:
            written += write_numpy(tensors(), types, out_dir, stem, metadata)
        if "safetensors" in formats or "numpy" in formats:
            path = out_dir / description_name(self.scheme)
            model_type = f"{TYPES[self.scheme].removesuffix('_LUT')}_LUT" if self.codebook else None
            write_description(path, self.scheme, types, bool(kv), version, model_type)
            written.append(path)
        return written
