"""Collect each quantized layer's deployment tensors as quantize finishes it; the target writes the files at the end.

Memory: a layer's tensors are encoded at once into the target's stored form (int8 weights, 4-bit weights packed
unless --no-pack, scales); no float copy is kept. With a ``spill_dir`` (quantize uses one in its staging folder)
they go straight to plain .npy files there (no pickle) and are read back memory-mapped while writing, so memory
holds at most one shard; without one they stay in memory until the end. Float tensors (embeddings, norms, float
linears) are read from the graph only while writing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import onnx_ir as ir

from graphq.algorithms.codebook import CodebookWeight
from graphq.algorithms.rtn import QuantizedWeight
from graphq.artifacts.dtypes import dtype_of_numpy
from graphq.artifacts.layout import TYPES, W8A8_LAYOUT_SCHEMES, lut_type
from graphq.artifacts.targets import DEFAULT_TARGET, ArtifactTarget, WriteJob, target_for
from graphq.errors import GraphqError
from graphq.linear_layers import LinearLayer
from graphq.stages import relative_to_any


class ArtifactCollector:
    """Receives (layer, qw, details) from quantize's finish callback; the target writes the artifacts at the end.

    ``scheme`` is the model's (it names the files and model_quant_type); a layer may carry another scheme
    (scheme overrides), which its tensors' types in the description then say. ``dtype`` is the serving dtype
    (fp32/fp16/bf16; None: each layer's ONNX float type)."""

    def __init__(self, scheme: str, group_size: int, symmetric: bool, pack: bool = True, spill_dir: Path | None = None,
                 target: str | ArtifactTarget = DEFAULT_TARGET, dtype: str | None = None):
        self.scheme = scheme
        self.group_size = group_size
        self.symmetric = symmetric
        self.pack = pack
        self.spill_dir = spill_dir
        self.target = target if isinstance(target, ArtifactTarget) else target_for(target)
        self.dtype = dtype
        self.layers: dict[str, dict[str, np.ndarray | Path]] = {}
        self.layer_schemes: dict[str, str] = {}
        self.layer_group_sizes: dict[str, int] = {}  # -1 per channel
        self.layer_shapes: dict[str, tuple[int, int]] = {}  # (n, k) = (out, in)
        # codebook (LUT) layers: description type (W4A16_LUT / W3A16_LUT / NF4), in_features, bits, group_size (-1
        # per channel): what graphq.artifacts.codebook.from_tensors needs beside the tensors
        self.codebook: dict[str, dict] = {}
        self.float_linears: list[str] = []  # linears left float, known once write() sees the graph's layers
        self.tied: set[str] = set()  # quantized linears stored through another tensor (a tied lm_head)
        self.target_report: dict | None = None  # what the target wants in report.json (e.g. gguf's re-rounded layers)

    def serving_dtype(self, model_dtype: np.dtype | None = None) -> str:
        if self.dtype is not None:
            return self.dtype
        return dtype_of_numpy(model_dtype) if model_dtype is not None else "fp32"

    def add(self, layer: LinearLayer, qw: QuantizedWeight, details: dict, scheme: str | None = None) -> None:
        scheme = scheme or self.scheme
        codebook = isinstance(qw, CodebookWeight)
        if scheme not in TYPES and not codebook:
            raise GraphqError(f"{layer.name}: no artifact layout for scheme {scheme}")
        if scheme in W8A8_LAYOUT_SCHEMES or scheme == "w4a8":
            missing = [key for key in ("input_scale", "input_offset") if key not in details]
            if missing:
                raise GraphqError(f"{layer.name}: {TYPES[scheme]} artifacts need {' and '.join(missing)} from the quantizer")
        tensors = self.target.encode_layer(self, layer, qw, details, scheme)
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
        self.layer_group_sizes[layer.name] = qw.group_size if qw.group_size < layer.in_features else -1
        self.layer_shapes[layer.name] = (layer.out_features, layer.in_features)
        if codebook:
            self.codebook[layer.name] = {
                "type": lut_type(qw.bits, details.get("weight_format", "lut")),
                "in_features": layer.in_features, "bits": qw.bits,
                "group_size": -1 if qw.per_channel else qw.group_size,
            }

    def state(self, roots: tuple[Path, ...]) -> dict:
        """The collector as JSON for a stage checkpoint, its spilled files named relative to whichever of ``roots`` holds them."""
        if any(not isinstance(path, Path) for tensors in self.layers.values() for path in tensors.values()):
            raise ValueError("only a collector that spills its tensors can be checkpointed")
        return {
            "scheme": self.scheme, "group_size": self.group_size, "symmetric": self.symmetric, "pack": self.pack,
            "target": self.target.name, "dtype": self.dtype,
            "layers": {name: {suffix: relative_to_any(path, roots) for suffix, path in tensors.items()}
                       for name, tensors in self.layers.items()},
            "layer_schemes": self.layer_schemes, "layer_group_sizes": self.layer_group_sizes,
            "layer_shapes": {name: list(shape) for name, shape in self.layer_shapes.items()},
            "codebook": self.codebook, "tied": sorted(self.tied),
        }

    @classmethod
    def from_state(cls, data: dict, root: Path, spill_dir: Path) -> "ArtifactCollector":
        """The collector a checkpoint recorded (its files under ``root``); new layers spill into ``spill_dir``."""
        collector = cls(data["scheme"], data["group_size"], data["symmetric"], data["pack"], spill_dir,
                        target=data["target"], dtype=data["dtype"])
        collector.layers = {name: {suffix: root / path for suffix, path in tensors.items()}
                            for name, tensors in data["layers"].items()}
        collector.layer_schemes = dict(data["layer_schemes"])
        collector.layer_group_sizes = dict(data["layer_group_sizes"])
        collector.layer_shapes = {name: tuple(shape) for name, shape in data["layer_shapes"].items()}
        collector.codebook = dict(data["codebook"])
        collector.tied = set(data["tied"])
        return collector

    def quantized_names(self) -> set[str]:
        """Modules whose graph tensors are quantized: collected layers and those tied to one."""
        return set(self.layers) | self.tied

    def layer_tensors(self, name: str) -> dict[str, np.ndarray]:
        """One collected layer's tensors, spilled ones memory-mapped."""
        return {suffix: np.load(array, mmap_mode="r") if isinstance(array, Path) else array
                for suffix, array in self.layers[name].items()}

    def layer_items(self) -> Iterator[tuple[str, str, np.ndarray]]:
        """(layer name, suffix, array) for every collected tensor, spilled ones memory-mapped."""
        for name, layer_tensors in self.layers.items():
            for suffix, array in layer_tensors.items():
                yield name, suffix, np.load(array, mmap_mode="r") if isinstance(array, Path) else array

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
        """Write the target's files into ``out_dir``; returns the files written."""
        self.float_linears = [layer.name for layer in layers if layer.name not in self.quantized_names()]
        if not set(formats) & {"safetensors", "numpy"}:
            return []
        return self.target.write(WriteJob(model, layers, out_dir, formats, part_file_size_gb, version, kv_cache, self))
