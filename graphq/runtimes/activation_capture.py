"""Activation calibration in onnxruntime: the whole model, one sample at a time, with chosen values as outputs.

The inputs of the chosen linear layers (deduplicated: q/k/v read one value) and, for the KV cache, the
``present.*`` outputs are fetched per sample, folded into streaming accumulators (``ActivationStats``) and
dropped, so memory holds one sample's activations plus fixed-size statistics whatever the number of samples.
Pass 1 collects ranges, per-channel ranges and a token reservoir; pass 2 (only when a method needs it) fills
histograms over the ranges pass 1 found.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from graphq.algorithms.activation_ranges import ActivationStats
from graphq.linear_layers import LinearLayer
from graphq.runtimes.layerwise import graph_input_feeds
from graphq.runtimes.submodel import SubmodelSession


def kv_cache_outputs(model: ir.Model) -> list[str]:
    """The ``present.<i>.key|value`` graph outputs, in graph order."""
    return [v.name for v in model.graph.outputs if v.name.startswith("present.")]


@dataclass
class KVStats:
    """Per-head min/max of one ``present.*`` tensor [batch, heads, seq, head_dim]."""

    head_min: np.ndarray | None = None
    head_max: np.ndarray | None = None

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 4 or x.size == 0:
            return
        heads = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
        hmin, hmax = heads.min(axis=1), heads.max(axis=1)
        self.head_min = hmin if self.head_min is None else np.minimum(self.head_min, hmin)
        self.head_max = hmax if self.head_max is None else np.maximum(self.head_max, hmax)


@dataclass
class CalibrationResult:
    stats: dict[str, ActivationStats]  # by input value name
    kv: dict[str, KVStats] = field(default_factory=dict)  # by present.* output name
    seconds: float = 0.0
    passes: int = 0
    samples: int = 0
    peak_sample_bytes: int = 0  # largest set of captured arrays of one sample


class ActivationCapture:
    """One onnxruntime session over ``model`` whose outputs are the chosen values; reused for both passes."""

    def __init__(self, model: ir.Model, layers: list[LinearLayer], kv_outputs: list[str] | None = None,
                 threads: int | None = None):
        self.model = model
        self.inputs = {layer.input.name: layer.in_features for layer in layers}
        self.kv_outputs = list(kv_outputs or [])
        outputs = list(self.inputs) + [name for name in self.kv_outputs if name not in self.inputs]
        self.session = SubmodelSession(model, {}, outputs, threads=threads)

    def run(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        return self.session.run(graph_input_feeds(self.model.graph, ids))

    def calibrate(
        self,
        samples: list[np.ndarray],
        histograms: bool,
        reservoir_rows: int = 0,
        seed: int = 0,
        progress: bool = False,
    ) -> CalibrationResult:
        started = time.perf_counter()
        stats = {
            name: ActivationStats(channels, reservoir_rows=reservoir_rows, seed=seed + i)
            for i, (name, channels) in enumerate(self.inputs.items())
        }
        kv = {name: KVStats() for name in self.kv_outputs}
        result = CalibrationResult(stats=stats, kv=kv, samples=len(samples))
        passes = 2 if histograms else 1
        for p in range(passes):
            if p == 1:
                for entry in stats.values():
                    entry.start_histogram()
            bar = tqdm(samples, desc=f"activation calibration pass {p + 1}/{passes}", unit="sample",
                       disable=not progress, file=sys.stderr)
            for ids in bar:
                captured = self.run(ids)
                result.peak_sample_bytes = max(result.peak_sample_bytes, sum(a.nbytes for a in captured.values()))
                for name, array in captured.items():
                    if name in stats:
                        if p == 0:
                            stats[name].add_ranges(array)
                        else:
                            stats[name].add_histogram(array)
                    if p == 0 and name in kv:
                        kv[name].add(array)
                del captured  # one sample's activations at a time
        result.passes = passes
        result.seconds = time.perf_counter() - started
        return result
