"""Parameter extraction (``--save-format params``): every quantized linear's quantization parameters, and its
fake-quant float weight, for users who re-export with their own toolchain (dopt's stage 3).

Files, beside report.json:
- ``quant_params.json``: per linear (Hugging Face name): scheme, bits, group size, symmetric, method, the tensor
  names below, and for static activations the input scale / offset (signed int8 convention) as numbers;
- ``quant_params.safetensors``: ``<name>.weight_scale`` / ``<name>.weight_offset`` [groups, out] (offset absent when
  symmetric), ``<name>.weight_clip_min`` / ``<name>.weight_clip_max`` [groups, out] (the range the grid covers:
  what the clip, searched by AWQ or learned by kd, left), ``<name>.input_scale`` / ``<name>.input_offset``;
- ``fake_quant_weights.safetensors``: ``<name>.weight`` [out, in] float32, exactly what the integers dequantize to.

Arrays are spilled to plain .npy files (no pickle) as layers finish and streamed into the safetensors at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from graphq.algorithms.grid import integer_range
from graphq.algorithms.rtn import QuantizedWeight
from graphq.linear_layers import LinearLayer
from graphq.stages import relative_to_any

PARAMS_JSON = "quant_params.json"
PARAMS_FILE = "quant_params.safetensors"
FAKE_QUANT_FILE = "fake_quant_weights.safetensors"


def grid_range(qw: QuantizedWeight) -> tuple[np.ndarray, np.ndarray]:
    """Per group and output channel, the lowest and highest value the grid represents."""
    qmin, qmax = integer_range(qw.bits, qw.symmetric)
    zero = 0.0 if qw.zero_points is None else qw.zero_points.astype(np.float32)
    ends = ((qmin - zero) * qw.scales, (qmax - zero) * qw.scales)
    return np.minimum(*ends).astype(np.float32), np.maximum(*ends).astype(np.float32)


class ParamsRecorder:
    """Receives each finished linear (from quantize's finish) and writes the three files at the end."""

    def __init__(self, spill_dir: Path):
        self.spill_dir = spill_dir
        self.entries: dict[str, dict] = {}
        self.params: list[tuple[str, Path]] = []
        self.weights: list[tuple[str, Path]] = []

    def _spill(self, name: str, array: np.ndarray, into: list) -> str:
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = self.spill_dir / f"{len(self.params) + len(self.weights):06d}.npy"
        np.save(path, np.ascontiguousarray(array), allow_pickle=False)
        into.append((name, path))
        return name

    def add(self, layer: LinearLayer, qw, details: dict, scheme: str, method: str) -> None:
        entry = {"scheme": scheme, "method": method, "in_features": layer.in_features,
                 "out_features": layer.out_features}
        if isinstance(qw, QuantizedWeight):
            low, high = grid_range(qw)
            entry.update(bits=qw.bits, group_size=qw.group_size if qw.group_size < layer.in_features else -1,
                         symmetric=qw.symmetric, tensors=[
                             self._spill(f"{layer.name}.weight_scale", qw.scales.astype(np.float32), self.params),
                             *([self._spill(f"{layer.name}.weight_offset", qw.zero_points.astype(np.int32), self.params)]
                               if qw.zero_points is not None else []),
                             self._spill(f"{layer.name}.weight_clip_min", low, self.params),
                             self._spill(f"{layer.name}.weight_clip_max", high, self.params)])
        else:  # codebook weights: the table is the parameter
            entry.update(bits=qw.bits, codebook=True, tensors=[])
        for key in ("input_scale", "input_offset"):
            if key in details:
                value = np.asarray(details[key])
                entry[key] = value.tolist() if value.size > 1 else value.item()
                entry["tensors"].append(self._spill(f"{layer.name}.{key}",
                                                    value.astype(np.float32 if key == "input_scale" else np.int32),
                                                    self.params))
        self._spill(f"{layer.name}.weight", qw.dequantize().T, self.weights)
        self.entries[layer.name] = entry

    def state(self, roots: tuple[Path, ...]) -> dict:
        """The recorder as JSON for a stage checkpoint, its spilled files named relative to whichever of ``roots`` holds them."""
        return {"entries": self.entries,
                "params": [[name, relative_to_any(path, roots)] for name, path in self.params],
                "weights": [[name, relative_to_any(path, roots)] for name, path in self.weights]}

    @classmethod
    def from_state(cls, data: dict, root: Path, spill_dir: Path) -> "ParamsRecorder":
        recorder = cls(spill_dir)
        recorder.entries = dict(data["entries"])
        recorder.params = [(name, root / path) for name, path in data["params"]]
        recorder.weights = [(name, root / path) for name, path in data["weights"]]
        return recorder

    def write(self, out_dir: Path, version: str) -> list[Path]:
        from graphq.artifacts.safetensors_io import save_file

        metadata = {"format": "pt", "graphq_version": version}
        written = []
        for filename, items in ((PARAMS_FILE, self.params), (FAKE_QUANT_FILE, self.weights)):
            save_file({name: np.load(path, mmap_mode="r") for name, path in items}, str(out_dir / filename), metadata)
            written.append(out_dir / filename)
        (out_dir / PARAMS_JSON).write_text(json.dumps({"graphq_version": version, "layers": self.entries}, indent=2) + "\n")
        return [out_dir / PARAMS_JSON, *written]
