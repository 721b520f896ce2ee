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
import onnx
import onnx_ir as ir
import onnxruntime as ort
from tqdm import tqdm

from graphq.algorithms.activation_ranges import ActivationStats
from graphq.linear_layers import LinearLayer
from graphq.runtimes.layerwise import graph_input_feeds
from graphq.runtimes.ort import session_options
from graphq.runtimes.submodel import slice_closure, slice_model_proto


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


def _owned(tensor):
    """An ``ir.Tensor`` over the tensor's array, for tensors parsed from the model file (else the tensor itself)."""
    if isinstance(tensor, (ir.Tensor, ir.ExternalTensor)):
        return tensor
    array = tensor.numpy()  # a copy for protobuf-backed tensors (np.ascontiguousarray would make 0-d arrays 1-d)
    return ir.Tensor(array if array.flags.c_contiguous else array.copy(), name=tensor.name)


def detach_from_file_proto(model: ir.Model) -> None:
    """Give every tensor parsed from the model file its own numpy array, once.

    Such tensors live inside the loaded protobuf and every ``numpy()`` call copies them. Once none refers to the
    protobuf any more it is freed, and the IR model and onnxruntime share one copy of the weights (memory-mapped
    external data is used in place). Values are unchanged."""
    for value in model.graph.initializers.values():
        owned = _owned(value.const_value)
        if owned is not value.const_value:
            value.const_value = owned
    for node in model.graph.all_nodes():
        for name, attr in list(node.attributes.items()):
            if attr.type == ir.AttributeType.TENSOR:
                owned = _owned(attr.value)
                if owned is not attr.value:
                    node.attributes[name] = ir.AttrTensor(name, owned)


class ActivationCapture:
    """One onnxruntime session over ``model`` whose outputs are the chosen values; reused for both passes.

    The session is built without a copy of the weights: initializers become graph inputs fed, on every run, with
    arrays the IR model holds (onnxruntime wraps numpy inputs without copying), so calibration memory is the model
    once plus one sample's activations and the fixed-size statistics. Only the nodes the chosen values need run
    (lm_head and anything after the last captured value are cut).
    """

    def __init__(self, model: ir.Model, layers: list[LinearLayer], kv_outputs: list[str] | None = None,
                 threads: int | None = None):
        self.model = model
        self.inputs = {layer.input.name: layer.in_features for layer in layers}
        self.kv_outputs = list(kv_outputs or [])
        outputs = list(self.inputs) + [name for name in self.kv_outputs if name not in self.inputs]
        detach_from_file_proto(model)
        nodes, initializers, graph_inputs = slice_closure(model.graph, outputs, set())
        self.weights = {value.name: value.const_value.numpy() for value in initializers}
        inputs = [ir.serde.serialize_value(value) for value in graph_inputs]
        inputs += [
            onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(array.dtype), array.shape)
            for name, array in self.weights.items()
        ]
        proto = slice_model_proto(model, nodes, inputs, outputs, [], "graphq_capture")
        self.session = ort.InferenceSession(proto.SerializeToString(), session_options(threads),
                                            providers=["CPUExecutionProvider"])
        self.graph_input_names = [value.name for value in graph_inputs]
        self.weight_values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in self.weights.items()}
        self.output_names = outputs

    def run(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """The captured values of one sample. OrtValues in and out: onnxruntime neither copies the weights in nor
        the (large) captured activations out; the arrays returned are views of its output buffers."""
        feeds = graph_input_feeds(self.model.graph, ids)
        values = {name: ort.OrtValue.ortvalue_from_numpy(feeds[name]) for name in self.graph_input_names}
        results = self.session.run_with_ort_values(self.output_names, {**values, **self.weight_values})
        return {name: value.numpy() for name, value in zip(self.output_names, results)}

    def calibrate(
        self,
        samples: list[np.ndarray],
        histograms: bool,
        reservoir_rows: int = 0,
        seed: int = 0,
        progress: bool = False,
        known: dict[str, ActivationStats] | None = None,
    ) -> CalibrationResult:
        """Pass 1 (ranges, reservoir, KV cache) for the inputs not in ``known``, then pass 2 (histograms) if asked.

        ``known`` holds pass-1 statistics already available for some inputs (derived after smoothing); when every
        input is known and there is no KV cache to measure, pass 1 is skipped."""
        started = time.perf_counter()
        known = known or {}
        stats = {
            name: known.get(name) or ActivationStats(channels, reservoir_rows=reservoir_rows, seed=seed + i)
            for i, (name, channels) in enumerate(self.inputs.items())
        }
        kv = {name: KVStats() for name in self.kv_outputs}
        result = CalibrationResult(stats=stats, kv=kv, samples=len(samples))
        passes = []
        if kv or any(name not in known for name in stats):
            passes.append("ranges")
        if histograms:
            passes.append("histograms")
        for number, kind in enumerate(passes):
            if kind == "histograms":
                for entry in stats.values():
                    entry.start_histogram()
            bar = tqdm(samples, desc=f"activation calibration pass {number + 1}/{len(passes)} ({kind})", unit="sample",
                       disable=not progress, file=sys.stderr)
            for ids in bar:
                captured = self.run(ids)
                result.peak_sample_bytes = max(result.peak_sample_bytes, sum(a.nbytes for a in captured.values()))
                for name, array in captured.items():
                    if name in stats:
                        if kind == "histograms":
                            stats[name].add_histogram(array)
                        elif name not in known:
                            stats[name].add_ranges(array)
                    if number == 0 and name in kv:
                        kv[name].add(array)
                del captured  # one sample's activations at a time
        result.passes = len(passes)
        result.seconds = time.perf_counter() - started
        return result
