"""Layer-sequential calibration in onnxruntime: run the model one decoder layer at a time over the samples.

For layer i, the inputs of its linear layers are captured by running layer i on the hidden states that the
already-quantized layers < i produced (errors of earlier layers are seen and compensated). Statistics are
streamed into accumulators; only the hidden states entering the current layer are kept for all samples.

The samples of each step run through ``pool`` (graphq.runtimes.workers.WorkerPool: this process, or Ray workers):
per sample and linear input, each accumulator's ``partial`` term (or the rows, for one without it) and the token
sample rows (indices drawn here, in sample order) come back and are merged in sample order, so the statistics are
the same bit for bit wherever the samples ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterator

import numpy as np
import onnx_ir as ir

from graphq.config import ENGINE_PROPAGATIONS
from graphq.errors import GraphqError

from graphq.decoder_layers import Region, decoder_regions, prefix_values
from graphq.linear_layers import LinearLayer
from graphq.runtimes.submodel import SubmodelSession, slice_spec
from graphq.threads import blas_threads


@dataclass
class InputStatistics:
    """Streaming statistics of one linear input (shared by the linears reading it): the accumulators the weight
    methods asked for, by name (``stats.hessian``, ``stats.magnitude``), and a bounded sample of token rows."""

    accumulators: dict[str, Any] = field(default_factory=dict)
    sample_rows: list[np.ndarray] = field(default_factory=list)

    def __getattr__(self, name: str) -> Any:
        accumulators = self.__dict__.get("accumulators", {})
        if name in accumulators:
            return accumulators[name]
        raise AttributeError(f"no '{name}' statistic was collected for this input (a weight method must declare it)")

    def token_sample(self) -> np.ndarray:
        return np.concatenate(self.sample_rows, axis=0)


def graph_input_feeds(graph: ir.Graph, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds for every graph input of a causal LM export for one sequence, with an empty KV cache."""
    ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
    length = ids.shape[1]
    feeds = {}
    for value in graph.inputs:
        name = value.name
        if name == "input_ids":
            feeds[name] = ids
        elif name == "attention_mask":
            feeds[name] = np.ones((1, length), dtype=np.int64)
        elif name == "position_ids":
            feeds[name] = np.arange(length, dtype=np.int64).reshape(1, -1)
        elif name.startswith("past_key_values"):
            dims = [d if isinstance(d, int) else 0 for d in value.shape]
            dims[0] = 1
            dims[2] = 0
            feeds[name] = np.zeros(dims, dtype=value.dtype.numpy())
        else:
            raise ValueError(f"don't know how to feed graph input {name}")
    return feeds


class LayerwiseCalibration:
    """Iterate over decoder layers; each step yields the captured statistics of that layer's linear inputs.

    After each yield the caller edits the layer's weights in ``model``. ``propagate="quantized"``: the next step runs
    the edited layer to produce the hidden states for the following one, so later layers calibrate on its errors
    (a second onnxruntime run of each layer); ``"float"``: they come from the capture run, before the edit (AutoAWQ's
    and NNCF's way, one run a layer).
    """

    def __init__(
        self,
        model: ir.Model,
        layers: list[LinearLayer],
        samples: list[np.ndarray],
        statistics: dict[str, Callable[[], Any]],
        tokens_per_input: int = 2048,
        seed: int = 0,
        threads: int | None = None,
        all_layers: list[LinearLayer] | None = None,
        pool=None,
        propagate: str = "quantized",
    ):
        from graphq.runtimes.workers import local_pool

        if propagate not in ENGINE_PROPAGATIONS:
            raise ValueError(f"propagate must be one of {ENGINE_PROPAGATIONS}, not {propagate!r}")
        self.propagate = propagate
        self.pool = pool or local_pool()  # graphq.runtimes.workers.WorkerPool: where the samples run
        self.model = model
        self.layers = layers
        self.samples = samples
        self.statistics = dict(statistics)  # name -> factory of an accumulator with add(rows [T, K])
        self.tokens_per_sample = max(1, -(-tokens_per_input // len(samples)))
        self.rng = np.random.default_rng(seed)
        self.threads = threads
        # The region boundaries come from every linear of the model (a run may quantize one linear of a layer); the
        # tail (final norm, lm_head) only when a linear there is calibrated: its static inputs (a tied lm_head's
        # transposed embedding) would otherwise be computed and held per sample for nothing.
        self.regions = decoder_regions(model, all_layers or layers)
        if not any(layer.layer_index is None for layer in layers):
            self.regions = [region for region in self.regions if region.index is not None]
        # Only regions holding layers to quantize are calibrated; the walk stops after the last of them.
        self.active_regions = [r for r in self.regions if any(l.layer_index == r.index for l in layers)]
        self.peak_stream_bytes = 0

    def _specs(self, names: list[str], arrays: dict[str, np.ndarray]) -> dict[str, tuple[np.dtype, int]]:
        return {name: (arrays[name].dtype, arrays[name].ndim) for name in names}

    def __iter__(self) -> Iterator[tuple[Region, list[LinearLayer], dict[str, InputStatistics]]]:
        graph = self.model.graph
        feeds = [graph_input_feeds(graph, ids) for ids in self.samples]
        prefix_names = prefix_values(self.regions)
        prefix = SubmodelSession(self.model, {}, prefix_names, threads=self.threads)
        # Per sample: the static values and the current stream values, by name.
        values = [prefix.run(feed) for feed in feeds]
        del prefix  # it holds the embedding table, which no later step needs
        later_needs = self._remaining_needs()
        if not self.active_regions:
            return
        # Regions between the active ones (every linear excluded) still run, to carry the hidden states forward.
        regions = self.regions[: self.regions.index(self.active_regions[-1]) + 1]
        for position, region in enumerate(regions):
            region_layers = [l for l in self.layers if l.layer_index == region.index]
            input_names = list(dict.fromkeys(l.input.name for l in region_layers))
            cut = region.stream_inputs + region.static_inputs
            if not region_layers:
                if not region.stream_outputs:
                    break
                self._forward(region, cut, feeds, values, later_needs)
                continue
            stats = {
                name: InputStatistics({key: factory() for key, factory in self.statistics.items()})
                for name in input_names
            }
            # The token sample rows are drawn here, in the order one loop over the samples would draw them, and
            # each sample's statistics come back as terms merged in sample order: the same statistics bit for bit
            # whether the samples ran here or on workers.
            draws, before = [], 0
            for feed in feeds:
                rows = int(np.prod(feed["input_ids"].shape))
                take = min(self.tokens_per_sample, rows)
                picks = {name: np.sort(self.rng.choice(rows, take, replace=False)) for name in input_names}
                draws.append((picks, rows, before))
                before += rows
            last = position == len(regions) - 1 or not region.stream_outputs
            # Float propagation: the capture run also yields what later regions read, before the weights change.
            carried = later_needs[region.index] & set(region.stream_outputs) if self.propagate == "float" and not last \
                else set()
            outputs = list(dict.fromkeys(input_names + [n for n in region.stream_outputs if n in carried]))
            setup = partial(_CaptureState, slice_spec(self.model, self._specs(cut, values[0]), outputs),
                            self.statistics, self.threads, carried)
            # Items read lazily: with float propagation sample i's old values go as soon as its new ones are in.
            items = ((feed, values[i], *draws[i]) for i, feed in enumerate(feeds))
            for i, (captured, stream) in enumerate(self.pool.map(setup, _capture_sample, items)):
                for name, (terms, rows, sample) in captured.items():
                    entry = stats[name]
                    for key, accumulator in entry.accumulators.items():
                        _merge(accumulator, terms[key], rows)
                    entry.sample_rows.append(sample)
                if carried:
                    self._replace(values, i, stream, later_needs[region.index])
            if carried:
                self._note_stream_bytes(values)
            yield region, region_layers, stats
            if last:
                break
            if not carried:
                self._forward(region, cut, feeds, values, later_needs)

    def _forward(self, region: Region, cut: list[str], feeds: list, values: list[dict], later_needs: dict) -> None:
        """Run the region (as the graph now has it) on every sample, replacing ``values`` by what later regions read."""
        keep = later_needs[region.index]
        setup = partial(_ForwardState, slice_spec(self.model, self._specs(cut, values[0]), region.stream_outputs),
                        keep, self.threads)
        # Items read lazily: sample i's old values are dropped as soon as its new ones are in.
        items = ((feed, values[i]) for i, feed in enumerate(feeds))
        for i, outputs in enumerate(self.pool.map(setup, _forward_sample, items)):
            self._replace(values, i, outputs, keep)
        self._note_stream_bytes(values)

    @staticmethod
    def _replace(values: list[dict], i: int, outputs: dict, keep: set[str]) -> None:
        """Sample i's values become what later regions read (``keep``), its region's ``outputs`` replacing the old."""
        merged = {**values[i], **outputs}
        values[i] = {name: merged[name] for name in merged if name in keep}

    def _note_stream_bytes(self, values: list[dict]) -> None:
        self.peak_stream_bytes = max(self.peak_stream_bytes, sum(a.nbytes for v in values for a in v.values()))

    def _remaining_needs(self) -> dict[int | None, set[str]]:
        """For each region, the values any later region still reads."""
        needs: dict[int | None, set[str]] = {}
        later: set[str] = set()
        for region in reversed(self.regions):
            needs[region.index] = set(later)
            later |= set(region.stream_inputs) | set(region.static_inputs)
        return needs


def _term(accumulator: Any, rows: np.ndarray, tokens_before: int) -> tuple[str, Any]:
    """A sample's contribution to an accumulator: its ``partial`` where it has one, else the rows themselves."""
    partial_of = getattr(accumulator, "partial", None)
    return ("partial", partial_of(rows, tokens_before)) if partial_of is not None else ("rows", rows)


def _merge(accumulator: Any, term: tuple[str, Any], rows: int) -> None:
    kind, value = term
    if kind == "rows":
        accumulator.add(value)
    elif value is not None:
        accumulator.merge(value, rows)


class _CaptureState:
    """A worker's (or this process's) capture session for one region, and accumulators to compute terms with."""

    def __init__(self, spec, statistics: dict[str, Callable[[], Any]], threads: int | None,
                 carried: set[str] = frozenset()):
        self.session = SubmodelSession.open(spec, threads=threads)
        self.accumulators = {key: factory() for key, factory in statistics.items()}  # never added to: partial only
        self.carried = carried  # stream outputs to hand back (float propagation)


def _capture_sample(state: _CaptureState, item) -> tuple[dict[str, tuple[dict, int, np.ndarray]], dict]:
    """One sample through the region: per linear input, each statistic's term, the row count and the sampled rows;
    and the region's stream outputs named in ``state.carried``."""
    feed, sample_values, picks, expected_rows, tokens_before = item
    captured = state.session.run({**feed, **sample_values})
    stream = {name: captured[name] for name in state.carried}
    result = {}
    # OpenBLAS's float32 products (the Gram and Hessian terms) round differently with another thread count: one
    # thread, here and on every worker, keeps the statistics the same bits wherever the sample ran.
    with blas_threads(1):
        for name in picks:
            rows = captured[name].reshape(-1, captured[name].shape[-1]).astype(np.float32)
            if len(rows) != expected_rows:
                raise GraphqError(f"linear input {name} has {len(rows)} rows for a sample of {expected_rows} tokens: "
                                  "layer-wise calibration expects one row per token")
            terms = {key: _term(accumulator, rows, tokens_before) for key, accumulator in state.accumulators.items()}
            result[name] = (terms, len(rows), rows[picks[name]])
    return result, stream


class _ForwardState:
    def __init__(self, spec, keep: set[str], threads: int | None):
        self.session = SubmodelSession.open(spec, threads=threads)
        self.keep = keep


def _forward_sample(state: _ForwardState, item) -> dict[str, np.ndarray]:
    """One sample through the region as the graph now has it: the outputs later regions read."""
    feed, sample_values = item
    produced = state.session.run({**feed, **sample_values})
    return {name: array for name, array in produced.items() if name in state.keep}
