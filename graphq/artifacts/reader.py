"""Open an artifact folder (description + safetensors, or numpy when asked) and check it against the layout table.

Reads graphq's folders and real msModelSlim ones: V0 (MindIE: ``quant_model_description_<t>.json``, unpacked int4,
W8A8 layers with weight_scale / weight_offset, smoothed norms duplicated as ``<norm>.module.weight``) and ascendV1
(vllm-ascend: ``quant_model_description.json`` with non-string ``group_size`` / ``metadata`` / ``optional``, int4
packed along n, any weight file name). Checks read headers only: every tensor the description names is stored and
every stored tensor is described, each quantized layer has its tensors with the table's dtypes and shapes, a
sharded index points at files that exist and hold what it says. Any failure is one GraphqError naming the tensor
(or file). What is read but cannot be rebuilt into graphq's ONNX is listed in ``notes``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from graphq.artifacts.description import (
    FLOAT,
    KV_CACHE_TYPE,
    V1_DESCRIPTION,
    Description,
    description_name,
    find_descriptions,
    load_description,
    weight_stem,
)
from graphq.artifacts.layout import (
    LUT_SUFFIXES,
    LUT_TYPES,
    PACKING,
    PACKING_ALONG_N,
    INT4_SCHEMES,
    SCHEME_OF_TYPE,
    TYPES,
    W4A8_LAYOUT_SCHEMES,
    W8A8_LAYOUT_SCHEMES,
    bits_of,
    check_layer,
    optional_suffixes,
    packing_of,
    suffixes_for,
)
from graphq.artifacts.numpy_io import NumpyStore
from graphq.artifacts.safetensors_io import SafetensorsStore
from graphq.errors import GraphqError

KV_SUFFIXES = ("kv_cache_scale", "kv_cache_offset")
#: msModelSlim V0 keeps a smoothed norm's parameters twice: ``X.weight`` (FLOAT) and ``X.module.weight``.
_NORM_COPY = re.compile(r"(.+)\.module\.(weight|bias)")
_SHARD = re.compile(r"(.+)-\d{5}-of-\d{5}\.safetensors")


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
    packing: dict[str, str] = field(default_factory=dict)  # int4 layer -> "none" | "k" | "n"
    duplicates: list[str] = field(default_factory=list)  # msModelSlim's <norm>.module.* copies, not rebuilt
    header: dict = field(default_factory=dict)
    producer: str = "graphq"  # or "msModelSlim V0" / "msModelSlim ascendV1"
    notes: list[str] = field(default_factory=list)
    codebook: dict[str, dict] = field(default_factory=dict)  # LUT layers: type, in_features, bits, group_size

    @property
    def packed(self) -> bool:
        return any(p != "none" for p in self.packing.values())

    @property
    def group_size(self) -> int:
        if "group_size" in self.store.metadata:
            return int(self.store.metadata["group_size"])
        value = self.header.get("group_size")
        return value if isinstance(value, int) and value > 0 else -1

    def group_size_of(self, name: str) -> int:
        """The layer's group size: graphq's metadata or the V1 header, else read from the scales' shape (V0)."""
        n, k = self.layers[name]
        groups = self.groups_of(name)
        if groups == 1:
            return k
        declared = self.group_size
        if declared > 0 and math.ceil(k / declared) == groups:
            return declared
        size = 1 << max(0, math.ceil(math.log2(k / groups)))  # the power of two giving that many groups
        if math.ceil(k / size) != groups:
            raise GraphqError(f"{name}.weight_scale has {groups} groups, which no group size gives for k = {k}")
        return size

    def groups_of(self, name: str) -> int:
        """Scale columns: W4A8's weight_scale_second (its weight_scale is the per-channel first level), else
        weight_scale's."""
        for suffix in ("weight_scale_second", "weight_scale"):
            if f"{name}.{suffix}" in self.store.specs:
                return self.store.specs[f"{name}.{suffix}"][1][1]
        return 1

    @property
    def serving_dtype(self) -> str:
        """graphq's metadata, else the dtype of the float tensors (msModelSlim writes them in the model's)."""
        from graphq.artifacts.dtypes import dtype_of_numpy
        from graphq.artifacts.safetensors_io import NUMPY_OF_NAME

        if "serving_dtype" in self.store.metadata:
            return self.store.metadata["serving_dtype"]
        for name in self.float_names:
            dtype = self.store.specs[name][0]
            if dtype in ("F16", "BF16", "F32"):
                return dtype_of_numpy(NUMPY_OF_NAME[dtype])
        return "fp32"

    def bits(self, name: str) -> int:
        if name in self.codebook:  # 3- or 4-bit codes, as lut_layers records
            return self.codebook[name]["bits"]
        return bits_of(self.layer_schemes[name])

    def layer_tensors(self, name: str) -> dict[str, np.ndarray]:
        if name in self.codebook:
            suffixes = [*LUT_SUFFIXES, "bias"]
        else:
            scheme = self.layer_schemes[name]
            suffixes = [*suffixes_for(scheme), *optional_suffixes(scheme)]
        return {s: self.store.get(f"{name}.{s}") for s in dict.fromkeys(suffixes) if f"{name}.{s}" in self.store.specs}


def _find_v1_stem(directory: Path) -> str:
    """ascendV1 folders name their weights freely (quant_model_weight_<t>, quant_model_weights-0000i-of-0000n)."""
    stems = {p.name[: -len(".safetensors.index.json")] for p in directory.glob("*.safetensors.index.json")}
    if not stems:
        for path in directory.glob("*.safetensors"):
            match = _SHARD.fullmatch(path.name)
            stems.add(match.group(1) if match else path.name[: -len(".safetensors")])
    if len(stems) != 1:
        raise GraphqError(f"{directory} holds {'no' if not stems else len(stems)} safetensors weight sets beside "
                          f"{V1_DESCRIPTION}: keep exactly one")
    return stems.pop()


def _declared_packing(metadata: dict[str, str]) -> bool | str:
    packing = metadata.get("weight_packing")
    if packing == PACKING:
        return "k"
    if packing == PACKING_ALONG_N:
        return "n"
    if packing == "none":
        return "none"
    return "auto"  # no graphq metadata: msModelSlim's own files, read the shapes


def open_artifacts(directory: str | Path, scheme: str | None = None, numpy: bool = False) -> Artifacts:
    directory = Path(directory)
    if not directory.is_dir():
        raise GraphqError(f"{directory} is not a folder: pass the output folder of 'graphq quantize'")
    descriptions = find_descriptions(directory)
    if scheme is not None:
        descriptions = [d for d in descriptions if d.name == description_name(scheme)
                        or (d.name == V1_DESCRIPTION and load_description(d).scheme == scheme)]
    if not descriptions:
        raise GraphqError(f"{directory} holds no quant_model_description*.json: quantize with --save-format safetensors")
    if len(descriptions) > 1:
        raise GraphqError(f"{directory} holds {len(descriptions)} descriptions: pick one with --scheme")
    description = load_description(descriptions[0])
    if description.path.name == V1_DESCRIPTION:
        stem = _find_v1_stem(directory)
    else:
        stem = weight_stem(description.path.name[len("quant_model_description_") : -len(".json")])
    store = NumpyStore(directory, stem) if numpy else SafetensorsStore(directory, stem)
    return classify(directory, description, store)


def classify(directory: Path, description: Description, store) -> Artifacts:
    """Sort the described tensors into quantized layers, float tensors and KV-cache tensors, and check each layer.

    ``store`` needs ``specs`` (name -> (dtype, shape)) and ``metadata``; no tensor data is read."""
    types = description.types
    name = description.path.name
    for tensor in types:
        if tensor not in store.specs:
            raise GraphqError(f"{name} names {tensor}, which the stored tensors do not hold")
    for tensor in store.specs:
        if tensor not in types:
            raise GraphqError(f"the stored tensors hold {tensor}, which {name} does not describe")
    graphq_made = "graphq_version" in store.metadata
    producer = "graphq" if graphq_made else ("msModelSlim ascendV1" if description.is_v1 else "msModelSlim V0")
    artifacts = Artifacts(directory, description.path, description.scheme, types, description.kv_cache_type, store,
                          header=description.header, producer=producer)
    float_candidates: list[str] = []
    for tensor, tensor_type in types.items():
        if tensor_type == FLOAT:
            float_candidates.append(tensor)
        elif tensor_type == KV_CACHE_TYPE:
            if not tensor.endswith(KV_SUFFIXES):
                raise GraphqError(f"{tensor} is typed {KV_CACHE_TYPE} but is not a kv_cache_scale/kv_cache_offset tensor")
            if artifacts.kv_cache_type != KV_CACHE_TYPE:
                raise GraphqError(f"{tensor} is a KV-cache tensor but {name} has no kv_cache_type")
            artifacts.kv_names.append(tensor)
        elif tensor_type in LUT_TYPES:
            prefix, _, suffix = tensor.rpartition(".")
            if suffix not in LUT_SUFFIXES + ("bias",):
                raise GraphqError(f"{tensor}: {tensor_type} layers have no '{suffix}' tensor "
                                  f"(expected {', '.join(LUT_SUFFIXES)})")
            other = artifacts.layer_schemes.setdefault(prefix, LUT_TYPES[tensor_type])
            if artifacts.codebook.setdefault(prefix, {"type": tensor_type})["type"] != tensor_type \
                    or other != LUT_TYPES[tensor_type]:
                raise GraphqError(f"{tensor} is typed {tensor_type} but other tensors of {prefix} are not")
        elif tensor_type in SCHEME_OF_TYPE:
            layer_scheme = SCHEME_OF_TYPE[tensor_type]
            copy = _NORM_COPY.fullmatch(tensor)
            if copy and f"{copy.group(1)}.{copy.group(2)}" in types:
                artifacts.duplicates.append(tensor)
                continue
            prefix, _, suffix = tensor.rpartition(".")
            allowed = suffixes_for(layer_scheme) + optional_suffixes(layer_scheme)
            if suffix not in allowed:
                raise GraphqError(f"{tensor}: {tensor_type} layers have no '{suffix}' tensor (expected {', '.join(allowed)})")
            other = artifacts.layer_schemes.setdefault(prefix, layer_scheme)
            if other != layer_scheme or prefix in artifacts.codebook:
                raise GraphqError(f"{tensor} is typed {tensor_type} but other tensors of {prefix} are {TYPES[other]}")
        else:
            raise GraphqError(f"{tensor} has type {tensor_type!r}: expected one of "
                              f"{', '.join([*SCHEME_OF_TYPE, *LUT_TYPES])}, {FLOAT}, {KV_CACHE_TYPE}")
    for tensor in float_candidates:
        prefix, _, suffix = tensor.rpartition(".")
        if suffix == "bias" and prefix in artifacts.layer_schemes:
            continue  # a quantized linear's float bias (msModelSlim types it FLOAT): part of the layer
        artifacts.float_names.append(tensor)
    _read_codebook_layers(artifacts)
    declared = _declared_packing(store.metadata)
    for prefix, layer_scheme in artifacts.layer_schemes.items():
        if prefix in artifacts.codebook:
            continue  # checked by _read_codebook_layers
        artifacts.layers[prefix] = check_layer(prefix, layer_scheme, store.specs, declared)
        if layer_scheme in INT4_SCHEMES:
            artifacts.packing[prefix] = packing_of(prefix, layer_scheme, store.specs, declared)
    _check_group_counts(artifacts)
    if artifacts.duplicates:
        artifacts.notes.append(f"{len(artifacts.duplicates)} msModelSlim <norm>.module.* copies of smoothed norms "
                               "are read but not rebuilt (the FLOAT <norm>.weight / .bias are)")
    return artifacts


def _check_group_counts(artifacts: Artifacts) -> None:
    """Each grouped layer's scales must have ceil(k / group_size) columns for the metadata's group_size.

    A disagreement rebuilds a MatMulNBits / DequantizeLinear whose block size does not fit its scales, which
    onnxruntime then refuses to load; per-channel scales (one column) decode the same under any group size."""
    if "group_size" not in artifacts.store.metadata:
        return  # msModelSlim's own folders: the group size is read from the scales' shape (group_size_of)
    raw = artifacts.store.metadata["group_size"]
    try:
        group_size = int(raw)
    except ValueError:
        raise GraphqError(f"the artifacts' metadata has group_size {raw!r}, not an integer: write the artifacts again") from None
    for prefix, layer_scheme in artifacts.layer_schemes.items():
        if prefix in artifacts.codebook:
            continue  # codebook layers record their group size in lut_layers
        if layer_scheme in W8A8_LAYOUT_SCHEMES or "embed" in prefix.rsplit(".", 1)[-1]:
            continue  # a quantized embedding has its own group size (--embedding-group-size), read from its scales
        n, k = artifacts.layers[prefix]
        groups = artifacts.groups_of(prefix)
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
    specs = artifacts.store.specs
    for prefix, info in artifacts.codebook.items():
        entry = recorded.get(prefix)
        if not isinstance(entry, dict) or entry.get("type") != info["type"] or not all(
            isinstance(entry.get(key), int) and not isinstance(entry.get(key), bool)
            for key in ("in_features", "bits", "group_size")
        ):
            raise GraphqError(f"{prefix} is a {info['type']} layer the metadata's lut_layers does not describe")
        info.update(entry)
        for suffix in ("weight", "weight_lut"):
            if f"{prefix}.{suffix}" not in specs:
                raise GraphqError(f"{prefix}.{suffix} is missing: a {info['type']} layer needs weight and weight_lut")
        dtype, shape = specs[f"{prefix}.weight"]
        k, bits = entry["in_features"], entry["bits"]
        row_bytes = packed_length(k, bits) if bits in (3, 4) and k > 0 else None
        if row_bytes is None or dtype != "U8" or len(shape) != 2 or shape[1] != row_bytes:
            raise GraphqError(f"{prefix}.weight has dtype {dtype} shape {list(shape)}, but a {k}-input {bits}-bit "
                              f"{info['type']} layer needs uint8 [n, {row_bytes or '?'}]")
        dtype, table_shape = specs[f"{prefix}.weight_lut"]
        if dtype not in ("F16", "I8", "F32") or len(table_shape) not in (2, 3) or table_shape[-1] != 1 << bits:
            raise GraphqError(f"{prefix}.weight_lut has dtype {dtype} shape {list(table_shape)}: expected "
                              f"[n, {1 << bits}] or [n, groups, {1 << bits}]")
        artifacts.layers[prefix] = (shape[0], k)
