"""The numpy artifact format: one pickled dict per parameter kind (written only when asked, read with a warning).

``quant_model_weight_<scheme>.<kind>.npy`` holds {layer name: array} for a layer tensor kind (weight, weight_scale,
weight_offset, bias, input_scale, input_offset, deq_scale, quant_bias), ``.float.npy`` {tensor name: array} for the
float tensors, ``.kv_cache.npy`` the KV-cache scales and ``.meta.npy`` the metadata (group size, packing). Load with ``np.load(path, allow_pickle=True).item()``:
pickle can run code, so read only files you trust; graphq never reads them unless asked (load-artifacts --numpy).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np

from graphq.artifacts.safetensors_io import DTYPE_NAMES
from graphq.errors import GraphqError

LAYER_KINDS = ("weight", "weight_scale", "weight_offset", "bias", "input_scale", "input_offset", "deq_scale", "quant_bias")


def kind_of(name: str, kinds: dict[str, str]) -> tuple[str, str]:
    """Tensor name -> (file kind, key in that file's dict)."""
    if kinds.get(name) == "FLOAT":
        return "float", name
    if kinds.get(name) == "C8":
        return "kv_cache", name
    module, suffix = name.rsplit(".", 1)
    return suffix, module


def write_numpy(
    tensors: Iterable[tuple[str, np.ndarray]], types: dict[str, str], out_dir: Path, stem: str, metadata: dict[str, str]
) -> list[Path]:
    groups: dict[str, dict] = {"meta": dict(metadata)}
    for name, array in tensors:
        kind, key = kind_of(name, types)
        groups.setdefault(kind, {})[key] = np.array(array)  # a plain array, not a memory map, goes into the pickle
    paths = []
    for kind, data in groups.items():
        path = out_dir / f"{stem}.{kind}.npy"
        np.save(path, np.array(data, dtype=object), allow_pickle=True)
        paths.append(path)
    return paths


class NumpyStore:
    """The numpy artifact read back, with the same interface as SafetensorsStore (specs, get)."""

    def __init__(self, directory: Path, stem: str):
        files = sorted(directory.glob(f"{stem}.*.npy"))
        if not files:
            raise GraphqError(f"{directory} has no {stem}.*.npy files: quantize with --save-format ...,numpy")
        message = f"reading {len(files)} numpy artifact file(s) with pickle (allow_pickle=True): only load files you trust"
        warnings.warn(message, stacklevel=2)
        print(f"graphq: warning: {message}", file=sys.stderr)
        self.arrays: dict[str, np.ndarray] = {}
        self.metadata: dict[str, str] = {}
        for path in files:
            kind = path.name[len(stem) + 1 : -len(".npy")]
            try:
                data = np.load(path, allow_pickle=True).item()
                if not isinstance(data, dict):
                    raise ValueError(f"it holds a {type(data).__name__}, not a dict of arrays")
            except Exception as exc:  # truncated or foreign files fail in numpy or in pickle, with many types
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise GraphqError(f"{path.name} is not a readable numpy artifact ({first_line}): write the artifacts again") from exc
            if kind == "meta":
                self.metadata = {str(k): str(v) for k, v in data.items()}
                continue
            for key, array in data.items():
                self.arrays[key if kind in ("float", "kv_cache") else f"{key}.{kind}"] = np.asarray(array)
        self.specs = {name: (DTYPE_NAMES.get(a.dtype, str(a.dtype)), tuple(a.shape)) for name, a in self.arrays.items()}
        self.files = files

    def nbytes(self, name: str) -> int:
        return int(self.arrays[name].nbytes)

    def get(self, name: str) -> np.ndarray:
        return self.arrays[name]
