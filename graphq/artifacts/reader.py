"""Open an artifact folder (description + safetensors, or numpy when asked) and check it against the layout table.

Checks read headers only: every tensor the description names is stored and every stored tensor is described,
each quantized layer has its tensors with the table's dtypes and shapes, a sharded index points at files that
exist and hold what it says. Any failure is one GraphqError naming the tensor (or file).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from graphq.artifacts.description import (
    FLOAT,
    KV_CACHE_TYPE,
    description_name,
    find_descriptions,
    read_description,
    weight_stem,
)
import json

from graphq.artifacts.layout import (
    LUT_SUFFIXES,
    LUT_TYPES,
    PACKING,
    SCHEME_OF_TYPE,
    TYPES,
    bits_of,
    check_layer,
    suffixes_for,
)
from graphq.artifacts.numpy_io import NumpyStore
from graphq.artifacts.safetensors_io import SafetensorsStore
from graphq.errors import GraphqError

KV_SUFFIXES = ("kv_cache_scale", "kv_cache_offset")


@dataclass
class Artifacts:
    directory: Path
    description: Path
    scheme: str
    types: dict[str, str]
    kv_cache_type: str | None
    store: SafetensorsStore | NumpyStore
    layers: dict[str, tuple[int, int]] = field(default_factory=dict)  # HF module name -> (n, k)
    layer_schemes: dict[str, str] = field(default_factory=dict)  # HF module name -> graphq scheme
    float_names: list[str] = field(default_factory=list)
    kv_names: list[str] = field(default_factory=list)
    codebook: dict[str, dict] = field(default_factory=dict)  # LUT layers: type, in_features, bits, group_size

    @property
    def packed(self) -> bool:
        return self.store.metadata.get("weight_packing", "none") == PACKING

    @property
    def group_size(self) -> int:
        return int(self.store.metadata.get("group_size", "-1"))

    def bits(self, name: str) -> int:
        return bits_of(self.layer_schemes[name])

    def layer_tensors(self, name: str) -> dict[str, np.ndarray]:
        suffixes = [*(LUT_SUFFIXES if name in self.codebook else suffixes_for(self.layer_schemes[name])), "bias"]
        return {s: self.store.get(f"{name}.{s}") for s in suffixes if f"{name}.{s}" in self.store.specs}


def open_artifacts(directory: str | Path, scheme: str | None = None, numpy: bool = False) -> Artifacts:
    directory = Path(directory)
    if not directory.is_dir():
        raise GraphqError(f"{directory} is not a folder: pass the output folder of 'graphq quantize'")
    descriptions = find_descriptions(directory)
    if scheme is not None:
        descriptions = [d for d in descriptions if d.name == description_name(scheme)]
    if not descriptions:
        raise GraphqError(f"{directory} holds no quant_model_description_*.json: quantize with --save-format safetensors")
    if len(descriptions) > 1:
        raise GraphqError(f"{directory} holds {len(descriptions)} descriptions: pick one with --scheme")
    description = descriptions[0]
    found_scheme, types, kv_type = read_description(description)
    stem = weight_stem(description.name[len("quant_model_description_") : -len(".json")])
    store = NumpyStore(directory, stem) if numpy else SafetensorsStore(directory, stem)
    for name in types:
        if name not in store.specs:
            raise GraphqError(f"{description.name} names {name}, which the stored tensors do not hold")
    for name in store.specs:
        if name not in types:
            raise GraphqError(f"the stored tensors hold {name}, which {description.name} does not describe")
    artifacts = Artifacts(directory, description, found_scheme, types, kv_type, store)
    for name, tensor_type in types.items():
        if tensor_type == FLOAT:
            artifacts.float_names.append(name)
        elif tensor_type == KV_CACHE_TYPE:
            if not name.endswith(KV_SUFFIXES):
                raise GraphqError(f"{name} is typed {KV_CACHE_TYPE} but is not a kv_cache_scale/kv_cache_offset tensor")
            if kv_type != KV_CACHE_TYPE:
                raise GraphqError(f"{name} is a KV-cache tensor but {description.name} has no kv_cache_type")
            artifacts.kv_names.append(name)
        elif tensor_type in LUT_TYPES:
            prefix, _, suffix = name.rpartition(".")
            if suffix not in LUT_SUFFIXES + ("bias",):
                raise GraphqError(f"{name}: {tensor_type} layers have no '{suffix}' tensor "
                                  f"(expected {', '.join(LUT_SUFFIXES)}, bias)")
            artifacts.layer_schemes.setdefault(prefix, LUT_TYPES[tensor_type])
            artifacts.codebook.setdefault(prefix, {"type": tensor_type})
        elif tensor_type in SCHEME_OF_TYPE:
            layer_scheme = SCHEME_OF_TYPE[tensor_type]
            prefix, _, suffix = name.rpartition(".")
            allowed = suffixes_for(layer_scheme) + (() if layer_scheme == "w8a8" else ("bias",))
            if suffix not in allowed:
                raise GraphqError(f"{name}: {tensor_type} layers have no '{suffix}' tensor (expected {', '.join(allowed)})")
            other = artifacts.layer_schemes.setdefault(prefix, layer_scheme)
            if other != layer_scheme:
                raise GraphqError(f"{name} is typed {tensor_type} but other tensors of {prefix} are {TYPES[other]}")
        else:
            raise GraphqError(f"{name} has type {tensor_type!r}: expected one of {', '.join(SCHEME_OF_TYPE)}, {FLOAT}, {KV_CACHE_TYPE}")
    _read_codebook_layers(artifacts)
    for prefix, layer_scheme in artifacts.layer_schemes.items():
        if prefix not in artifacts.codebook:
            artifacts.layers[prefix] = check_layer(prefix, layer_scheme, store.specs, artifacts.packed)
    _check_group_counts(artifacts)
    return artifacts


def _check_group_counts(artifacts: Artifacts) -> None:
    """Each grouped layer's scales must have ceil(k / group_size) columns for the metadata's group_size.

    A disagreement rebuilds a MatMulNBits / DequantizeLinear whose block size does not fit its scales, which
    onnxruntime then refuses to load; per-channel scales (one column) decode the same under any group size."""
    raw = artifacts.store.metadata.get("group_size", "-1")
    try:
        group_size = int(raw)
    except ValueError:
        raise GraphqError(f"the artifacts' metadata has group_size {raw!r}, not an integer: write the artifacts again") from None
    for prefix, layer_scheme in artifacts.layer_schemes.items():
        if layer_scheme == "w8a8" or prefix in artifacts.codebook:
            continue
        n, k = artifacts.layers[prefix]
        groups = artifacts.store.specs[f"{prefix}.weight_scale"][1][1]
        if groups == 1:
            continue
        expected = -(-k // group_size) if group_size > 0 else 1
        if groups != expected:
            raise GraphqError(
                f"{prefix}.weight_scale has {groups} groups for {k} input channels, but the metadata's group_size "
                f"{group_size} gives {expected}: the artifact is inconsistent, write it again"
            )


def _read_codebook_layers(artifacts: Artifacts) -> None:
    """LUT layers: K, bits and group size from the metadata's lut_layers; the codes' and tables' shapes checked."""
    if not artifacts.codebook:
        return
    from graphq.passes.lut import packed_length

    try:
        recorded = json.loads(artifacts.store.metadata.get("lut_layers", ""))
    except ValueError:
        recorded = None
    if not isinstance(recorded, dict):
        raise GraphqError("the artifacts hold LUT layers but their metadata has no readable lut_layers: write them again")
    for prefix, info in artifacts.codebook.items():
        entry = recorded.get(prefix)
        if not isinstance(entry, dict) or entry.get("type") != info["type"] or not all(
            isinstance(entry.get(key), int) for key in ("in_features", "bits", "group_size")
        ):
            raise GraphqError(f"{prefix} is a {info['type']} layer the metadata's lut_layers does not describe")
        info.update(entry)
        for suffix in ("weight", "weight_lut"):
            if f"{prefix}.{suffix}" not in artifacts.store.specs:
                raise GraphqError(f"{prefix}.{suffix} is missing: a {info['type']} layer needs weight and weight_lut")
        dtype, shape = artifacts.store.specs[f"{prefix}.weight"]
        k, bits = entry["in_features"], entry["bits"]
        if bits not in (3, 4) or dtype != "U8" or len(shape) != 2 or shape[1] != packed_length(k, bits):
            raise GraphqError(f"{prefix}.weight has dtype {dtype} shape {list(shape)}, but a {k}-input {bits}-bit "
                              f"{info['type']} layer needs uint8 [n, {packed_length(k, bits) if bits in (3, 4) else '?'}]")
        dtype, table_shape = artifacts.store.specs[f"{prefix}.weight_lut"]
        if dtype not in ("F16", "I8", "F32") or table_shape[-1] != 1 << bits or len(table_shape) not in (2, 3):
            raise GraphqError(f"{prefix}.weight_lut has dtype {dtype} shape {list(table_shape)}: expected "
                              f"[n, {1 << bits}] or [n, groups, {1 << bits}]")
        artifacts.layers[prefix] = (shape[0], k)
