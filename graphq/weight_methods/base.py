"""What a weight method is: an object that rewrites float weights and/or rounds them, per decoder layer.

A method string such as ``awq+gptq`` is a sequence of registered methods: each one's ``transform`` runs in order
(AWQ scales and folds), then the last method that ``rounds`` turns every linear into its quantized weight (GPTQ
here; AWQ alone rounds with its clip search; ``rtn`` rounds to nearest). The layer-wise engine collects the union
of the statistics the sequence declares, so a new method is one module plus ``register_weight_method``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np
import onnx_ir as ir

from graphq.algorithms.awq import scale_diagonal_blocks
from graphq.algorithms.rtn import QuantizedWeight
from graphq.linear_layers import LinearLayer


@dataclass
class LayerResult:
    """One linear's quantized weight and its report fields (errors, method notes, warnings)."""

    weight: QuantizedWeight
    entry: dict[str, Any] = field(default_factory=dict)
    clip: Any = None  # the searched clip ranges (AWQ's ClipRanges), for methods that continue from them (kd)

    @property
    def warnings(self) -> list[str]:
        return list(self.entry.get("warnings", []))


@dataclass
class RegionWork:
    """One decoder layer's linears under one weight config, with what the methods share while they run.

    ``groups``: the linears being quantized, by the input they read. ``samples``: each input's token sample as
    captured (before any fold). ``input_scale``: the per-channel factor folded into each input so far (the
    linears now read x / s). ``notes``: per-layer report fields; ``rescaled``: linears anywhere in the model
    whose output channels a fold rescaled on purpose (``graphq verify`` compares them up to that factor).
    ``keep_masks``: what a pruning method kept of each linear (its float weight already holds the zeros); every
    rounder's result is put back on the exact-zero code there, so rounding never revives a pruned weight;
    ``dense_weights`` keeps the weight just before pruning (GPTQ after Wanda compensates the pruning error from it).
    """

    model: ir.Model
    layers: list[LinearLayer]
    stats: dict[str, Any]
    config: Any  # QuantConfig
    known_layers: list[LinearLayer]
    groups: dict[str, list[LinearLayer]] = field(default_factory=dict)
    samples: dict[str, np.ndarray] = field(default_factory=dict)
    input_scale: dict[str, np.ndarray] = field(default_factory=dict)
    notes: dict[str, dict] = field(default_factory=dict)
    rescaled: dict[str, str] = field(default_factory=dict)
    keep_masks: dict[str, np.ndarray] = field(default_factory=dict)  # pruned linears: bool [K, N], True = kept
    dense_weights: dict[str, np.ndarray] = field(default_factory=dict)  # pruned linears: the weight before pruning

    def __post_init__(self) -> None:
        for layer in self.layers:
            self.groups.setdefault(layer.input.name, []).append(layer)
            self.notes.setdefault(layer.name, {})
        self.samples = {name: entry.token_sample() for name, entry in self.stats.items()}
        self.input_scale = {name: np.ones(sample.shape[1], dtype=np.float32) for name, sample in self.samples.items()}

    def current_input(self, input_name: str) -> np.ndarray:
        """The token sample as the linears read it now (after the folds so far)."""
        return self.samples[input_name] / self.input_scale[input_name]

    def original_gram(self, input_name: str) -> np.ndarray | None:
        """X^T X / tokens of the input over every calibration token as captured (before any fold), where a method
        collected it (AWQ's ``InputGram``, for inputs narrow enough); else None."""
        gram = self.stats[input_name].accumulators.get("gram")
        return None if gram is None else gram.gram()

    def original_gram_blocks(self, input_name: str, group_size: int) -> np.ndarray | None:
        """The diagonal blocks, one per weight group, of ``original_gram`` (``InputGram.diagonal_blocks``: also kept
        for inputs too wide for the whole Gram), or None."""
        gram = self.stats[input_name].accumulators.get("gram")
        if gram is None:
            return None
        return gram.diagonal_blocks(group_size, len(self.input_scale[input_name]))

    def current_gram_blocks(self, input_name: str, group_size: int) -> np.ndarray | None:
        """``original_gram_blocks`` of the input as the linears read it now, x / s."""
        blocks = self.original_gram_blocks(input_name, group_size)
        return None if blocks is None else scale_diagonal_blocks(blocks, self.input_scale[input_name])

    def current_gram(self, input_name: str) -> np.ndarray | None:
        """``original_gram`` of the input as the linears read it now, x / s."""
        gram = self.original_gram(input_name)
        if gram is None:
            return None
        scale = self.input_scale[input_name]
        return gram / np.outer(scale, scale)


class WeightMethod:
    """Base of the registered weight methods; subclasses set ``name`` and override what they do.

    ``statistics``: name -> factory of a streaming accumulator (``add(rows)``) the layer-wise engine keeps per
    linear input, next to the token sample every method gets. ``calibrated``: whether it needs data at all.
    """

    name: ClassVar[str]
    statistics: ClassVar[dict[str, Callable[[], Any]]] = {}
    calibrated: ClassVar[bool] = True
    rounds: ClassVar[bool] = False
    prunes: ClassVar[bool] = False  # zeroes weights (needs --sparsity or --sparsity-pattern)
    # Trains the whole model after the methods before it in the sequence (kd); quantize hands it the layers.
    trains: ClassVar[bool] = False
    # Calibrates as well on the float model's hidden states as on the quantized layers' (--propagate auto then
    # carries float ones, one onnxruntime run a layer): AWQ's searches. Methods that compensate errors (GPTQ) or
    # must see the earlier layers' pruning (the pruners) want the quantized ones.
    float_inputs_suffice: ClassVar[bool] = False

    def check_sequence(self, names: list[str]) -> None:
        """Refuse (GraphqError) a method string this method cannot be part of, e.g. ``gptq+kd``."""
    #: data-free by itself (calibrated = False) but calibrated when data is given (lut: weighted k-means)
    uses_data: ClassVar[bool] = False

    def transform(self, work: RegionWork) -> None:
        """Rewrite the float weights of the region (and fold what that needs); the float function must not change."""

    def round_group(self, work: RegionWork, input_name: str, group: list[LinearLayer]) -> dict[str, LayerResult]:
        """Quantized weights of the linears reading one input, from their current float weights."""
        raise NotImplementedError(f"{self.name} does not round weights")

    def prune_float(self, work: RegionWork) -> None:
        """Pruning methods: zero (and for SparseGPT update) the float weights of the region in the graph, recording
        ``work.keep_masks``; used where the weights are rounded later by another pipeline (the W8A8 schemes, prune)."""
        raise NotImplementedError(f"{self.name} does not prune")

    def prune_data_free(self, layer: LinearLayer, weight: np.ndarray, config: Any) -> np.ndarray | None:
        """Data-free pruning (magnitude): the keep mask of one linear, or None for methods that do not prune so."""
        return None

    def train(self, job: Any) -> None:
        """Methods with ``trains``: quantize ``job.layers`` (a ``graphq.kd.engine.TrainingJob``) and finish each."""
        raise NotImplementedError(f"{self.name} does not train")

    def round_data_free(self, layer: LinearLayer, weight: np.ndarray, config: Any) -> LayerResult:
        """Quantized weight of one linear without calibration data (only for methods with calibrated=False)."""
        raise NotImplementedError(f"{self.name} needs calibration data")
