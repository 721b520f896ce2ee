"""Artifact targets: which runtime's layout the deployment files follow (``--target``).

A target is one module here that builds an ``ArtifactTarget`` and calls ``register_target``; ``quantize`` asks it
to refuse what its runtime cannot serve (``check``, before any work), to encode each layer as it is finished
(``encode_layer``: the stored integer form, spilled to disk by the collector), to write the files (``write``) and
to edit config.json (``edit_config``). Readers: the msModelSlim targets share ``graphq.artifacts.reader`` (inspect,
load-artifacts); compressed-tensors and gguf files are read by their consumers (the tests load them with
transformers and the gguf package).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from graphq.errors import GraphqError

if TYPE_CHECKING:  # imported for annotations only: records imports this module
    import onnx_ir as ir

    from graphq.algorithms.rtn import QuantizedWeight
    from graphq.artifacts.records import ArtifactCollector
    from graphq.linear_layers import LinearLayer


@dataclass
class WriteJob:
    """Everything a target's ``write`` needs: the finished graph, its linears, the collected layers, where to write."""

    model: "ir.Model"
    layers: "list[LinearLayer]"
    out_dir: Path
    formats: list[str]
    part_file_size_gb: float | None
    version: str
    kv_cache: dict | None
    collector: "ArtifactCollector"

    def float_sources(self) -> dict:
        """The float tensors to store beside the quantized layers (HF name -> source); refuses a name both are."""
        from graphq.artifacts.naming import float_tensor_sources

        floats = float_tensor_sources(self.model, self.layers, self.collector.quantized_names())
        clash = set(floats) & {f"{n}.{s}" for n, t in self.collector.layers.items() for s in t}
        if clash:
            raise GraphqError(f"tensor name {sorted(clash)[0]} is both float and quantized: cannot write artifacts")
        return floats

    def stored_tensors(self, floats: dict):
        """(name, array) of every float tensor in the serving dtype, then every collected layer tensor."""
        from graphq.artifacts.dtypes import cast

        for name, source in floats.items():
            yield name, cast(source.array(), self.collector.serving_dtype(source.dtype))
        for name, suffix, array in self.collector.layer_items():
            yield f"{name}.{suffix}", array


class ArtifactTarget:
    """Base class: override what the layout needs. ``loaded_by`` and ``schemes`` feed the README table and errors."""

    name: str = ""
    loaded_by: str = ""
    schemes: tuple[str, ...] = ()
    #: serving dtypes the runtime accepts (config.json torch_dtype); the first is the default for fp32 models.
    dtypes: tuple[str, ...] = ("fp32", "fp16", "bf16")
    save_formats: tuple[str, ...] = ("onnx", "safetensors")
    #: whether the layout has a place for graphq's int8 KV cache (--kv-cache int8)
    kv_cache: bool = False
    #: whether the layout can hold a quantized token embedding (--quantize-embeddings)
    embeddings: bool = False
    #: whether the layout can hold codebook (LUT) layers (--weight-format lut, shared, nf4, iq4nl)
    codebook: bool = False

    def default_dtype(self, model_dtype: str) -> str:
        return model_dtype if model_dtype in self.dtypes else self.dtypes[0]

    def check_dtype(self, dtype: str) -> None:
        if dtype not in self.dtypes:
            raise GraphqError(f"--target {self.name}: {self.loaded_by} serves {' or '.join(self.dtypes)}, not {dtype}")

    def check(self, layer_schemes: dict[str, str], group_sizes: dict[str, int], symmetric: dict[str, bool],
              shapes: dict[str, tuple[int, int]] | None = None) -> None:
        """Refuse (one GraphqError saying why) a plan the runtime cannot serve. ``layer_schemes`` maps every linear
        to its scheme ("float" when left float); group sizes are -1 per channel; shapes are (out, in)."""
        unknown = sorted({s for s in layer_schemes.values() if s != "float" and s not in self.schemes})
        if unknown:
            raise GraphqError(f"--target {self.name} has no layout for {unknown[0]}: it writes {', '.join(self.schemes)}")

    def scale_dtype(self, serving_dtype: str) -> np.dtype:
        """The stored type of weight scales; quantize rounds scales to it so the ONNX computes what is stored."""
        return np.dtype(np.float32)

    def prepare(self, qw: "QuantizedWeight", details: dict, serving_dtype: str) -> tuple["QuantizedWeight", dict]:
        """Adjust a finished layer before it is emitted and collected (e.g. round scales to the stored type), so
        the ONNX computes exactly what the artifacts store. Default: unchanged."""
        return qw, details

    def encode_layer(self, collector: "ArtifactCollector", layer: "LinearLayer", qw: "QuantizedWeight", details: dict,
                     scheme: str) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def write(self, job: WriteJob) -> list[Path]:
        raise NotImplementedError

    def edit_config(self, config: dict, collector: "ArtifactCollector") -> dict:
        return config


TARGETS: dict[str, ArtifactTarget] = {}
DEFAULT_TARGET = "mindie"  # the seeds' deployment runtime (msModelSlim V0 layout)


def register_target(target: ArtifactTarget) -> ArtifactTarget:
    if target.name in TARGETS:
        raise ValueError(f"artifact target {target.name} is registered twice")
    TARGETS[target.name] = target
    return target


def target_for(name: str) -> ArtifactTarget:
    target = TARGETS.get(name)
    if target is None:
        raise GraphqError(f"unknown --target '{name}': choose one of {', '.join(TARGETS)}")
    return target


# Registration, in the order --help and errors list them (mindie, the default, first).
from graphq.artifacts.targets import mindie, vllm_ascend, compressed_tensors, gguf  # noqa: E402,F401,I001
