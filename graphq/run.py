"""One quantize run's state between its stages (``Run``), and how each linear is finished: report entry,
artifact records, emitted node. A stage checkpoint (graphq.stages) holds a Run; the next stage restores it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx_ir as ir

from graphq.activation_quantize import ActivationPrep
from graphq.algorithms.codebook import CodebookWeight
from graphq.algorithms.rtn import QuantizedWeight
from graphq.algorithms.sparsity import zero_fraction
from graphq.artifacts.params import ParamsRecorder
from graphq.artifacts.records import ArtifactCollector
from graphq.artifacts.targets import ArtifactTarget, target_for
from graphq.calibration_data import load_calibration_samples
from graphq.config import W4A8_SCHEMES, QuantConfig
from graphq.errors import GraphqError
from graphq.layer_plan import LayerSetting
from graphq.linear_layers import LinearLayer
from graphq.model_io import load_model
from graphq.passes.emitters import emitter_for
from graphq.stages import (ARTIFACT_SPILL, PARAMS_SPILL, STAGE_FIELDS, STAGES_DIR, bind_layers, checkpoint_model_file,
                           decode_stats, decode_weights, describe_layer, encode_stats, encode_weights, read_state,
                           read_tensors, stage_dir, write_checkpoint)
from graphq.version import __version__


def quantized_weight_bytes(qw: QuantizedWeight) -> int:
    """Storage of the integer weight plus its scales (float32) and zero points (bits each)."""
    if isinstance(qw, CodebookWeight):  # codes at their bits, tables and scales at their dtype
        return int(np.ceil(qw.storage_bytes()))
    k, n = qw.shape
    bits = k * n * qw.bits + qw.scales.size * 32
    if qw.zero_points is not None:
        bits += qw.zero_points.size * qw.bits
    return bits // 8


# Called once per layer as soon as its quantized weight is final: records it and rewrites the graph.
FinishLayer = Callable[[LinearLayer, QuantizedWeight, dict], None]


def config_for_layer(config: QuantConfig, scheme: str, setting: LayerSetting | None) -> QuantConfig:
    """The config one linear is quantized under: its scheme's, with the plan's grid and method where it names one
    (a sensitivity plan may have moved the layer to another scheme since)."""
    sub = config.for_scheme(scheme)
    if setting is None or setting.scheme != scheme:
        return sub
    return dataclasses.replace(sub, group_size=setting.group_size, symmetric=setting.symmetric, method=setting.method)


@dataclass
class Run:
    """One quantize run between its stages: the graph, its linears, and what the report and the artifacts need.

    A stage checkpoint holds it (graphq.stages, ``state``); the next stage, in this process or a later one,
    continues from it (``Run.restore``)."""

    model: ir.Model
    layers: list[LinearLayer]  # every linear of the float graph, as found before anything changed
    model_file: Path
    config: QuantConfig  # with the plan applied
    user_config: dict  # the options as given: the next stage compares its own with them
    settings: dict[str, LayerSetting]
    layer_reports: list[dict]
    schemes: dict[str, str]  # the scheme each quantized linear was planned with
    target: ArtifactTarget
    serving_dtype: str
    dtype_warning: str | None
    collector: ArtifactCollector
    params: ParamsRecorder | None
    rescaled: dict[str, str] = field(default_factory=dict)  # linear -> why a fold rescaled its outputs (verify)
    embedding_report: dict | None = None
    embedding_name: str | None = None
    plan_report: dict = field(default_factory=dict)
    prep: ActivationPrep = field(default_factory=ActivationPrep)
    activation_report: dict = field(default_factory=dict)
    all_zero: list[str] = field(default_factory=list)
    calibration_samples: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    samples: list[np.ndarray] | None = None  # not checkpointed: the config reproduces them

    @property
    def entries(self) -> dict[str, dict]:
        """The report entries of the linears being quantized (the same dicts as in layer_reports)."""
        return {entry["name"]: entry for entry in self.layer_reports if "skipped" not in entry}

    def layer_configs(self) -> dict[str, QuantConfig]:
        return {name: config_for_layer(self.config, scheme, self.settings.get(name)) for name, scheme in self.schemes.items()}

    def layers_of(self, schemes: tuple[str, ...] | list[str]) -> list[LinearLayer]:
        """The quantized linears of these schemes, scheme by scheme, each in graph order."""
        return [layer for scheme in schemes for layer in self.layers if self.schemes.get(layer.name) == scheme]

    def load_samples(self) -> list[np.ndarray]:
        if self.samples is None:
            self.samples = load_calibration_samples(self.model_file, self.config)
        return self.samples

    def use_spill_dir(self, directory: Path) -> None:
        """Layers finished from now on spill their artifact tensors into this stage's checkpoint."""
        self.collector.spill_dir = directory / ARTIFACT_SPILL
        if self.params is not None:
            self.params.spill_dir = directory / PARAMS_SPILL

    def finish_function(self) -> FinishLayer:
        """The per-linear finish: record the report entry and the artifacts, emit the quantized node."""
        entries, layer_configs, config = self.entries, self.layer_configs(), self.config
        target, serving_dtype, model = self.target, self.serving_dtype, self.model
        prunes = config.prunes

        def finish(layer: LinearLayer, qw: QuantizedWeight, details: dict) -> None:
            qw, details = target.prepare(qw, details, serving_dtype)
            scheme = entries[layer.name]["scheme"]
            layer_config = layer_configs[layer.name]
            codebook = isinstance(qw, CodebookWeight)
            entries[layer.name].update(
                bits=layer_config.bits,
                group_size=qw.group_size if qw.group_size < layer.in_features else -1,
                symmetric=None if codebook else qw.symmetric,
                format="lut" if codebook else layer_config.format,
                method=layer_config.method,
                weight_bytes_before=int(layer.in_features * layer.out_features * layer.dtype.itemsize),
                weight_bytes_after=quantized_weight_bytes(qw),
                **details,
            )
            if prunes:  # measured on the emitted integers, not the requested fraction
                entries[layer.name]["sparsity"] = zero_fraction(qw)
                if entries[layer.name]["sparsity"] == 1.0:
                    self.all_zero.append(layer.name)
            output_format = "lut" if codebook else layer_config.format
            if "activation_fallback" in details:
                # The quantized weight stays, the activations stay float: W8A16 (W4A16 for W4A8 layers), QDQ.
                scheme, output_format = ("w4a16" if scheme in W4A8_SCHEMES else "w8a16"), "qdq"
                entries[layer.name]["scheme"] = scheme
            if set(config.save_format) & {"safetensors", "numpy"}:
                self.collector.add(layer, qw, details, scheme=scheme)
            if self.params is not None:
                self.params.add(layer, qw, details, scheme, layer_config.method)
            entries[layer.name]["quantized_output"] = emitter_for(scheme, output_format).emit(model, layer, qw, details)

        return finish

    def state(self, roots: tuple[Path, ...]) -> tuple[dict, dict[str, np.ndarray]]:
        """The run as a checkpoint's JSON and arrays; spilled files named relative to whichever of ``roots`` (the
        published stages folder, the staging one) holds them."""
        tensors: dict[str, np.ndarray] = {}
        data = {
            "graphq_version": __version__,
            "source_model": str(self.model_file.resolve()),
            "user_config": self.user_config,
            "config": dataclasses.asdict(self.config),
            "settings": {name: dataclasses.asdict(setting) for name, setting in self.settings.items()},
            "layers": [describe_layer(layer) for layer in self.layers],
            "layer_reports": self.layer_reports,
            "schemes": self.schemes,
            "target": self.target.name,
            "serving_dtype": self.serving_dtype,
            "dtype_warning": self.dtype_warning,
            "collector": self.collector.state(roots),
            "params": self.params.state(roots) if self.params is not None else None,
            "rescaled": self.rescaled,
            "embedding_report": self.embedding_report,
            "embedding_name": self.embedding_name,
            "plan_report": self.plan_report,
            "prep": {"smoothing": self.prep.smoothing, "calibration": self.prep.calibration,
                     "known": encode_stats(self.prep.known, tensors), "rounded": encode_weights(self.prep.rounded, tensors)},
            "activation_report": self.activation_report,
            "all_zero": self.all_zero,
            "calibration_samples": self.calibration_samples,
            "seconds": self.seconds,
        }
        return data, tensors

    @classmethod
    def restore(cls, data: dict, tensors: dict[str, np.ndarray], root: Path, model: ir.Model,
                layers: list[LinearLayer] | None = None, samples: list[np.ndarray] | None = None) -> "Run":
        """The run a checkpoint holds (its spilled files under ``root``), on ``model``: the checkpoint's graph
        reloaded (its linears bound by name), or the graph still in memory with its ``layers``."""
        prep = data["prep"]
        return cls(
            model=model,
            layers=layers if layers is not None else bind_layers(model, data["layers"]),
            model_file=Path(data["source_model"]),
            config=QuantConfig(**data["config"]),
            user_config=data["user_config"],
            settings={name: LayerSetting(**setting) for name, setting in data["settings"].items()},
            layer_reports=data["layer_reports"],
            schemes=data["schemes"],
            target=target_for(data["target"]),
            serving_dtype=data["serving_dtype"],
            dtype_warning=data["dtype_warning"],
            collector=ArtifactCollector.from_state(data["collector"], root, None),
            params=ParamsRecorder.from_state(data["params"], root, root) if data["params"] is not None else None,
            rescaled=data["rescaled"],
            embedding_report=data["embedding_report"],
            embedding_name=data["embedding_name"],
            plan_report=data["plan_report"],
            prep=ActivationPrep(smoothing=prep["smoothing"], calibration=prep["calibration"],
                                known=decode_stats(prep["known"], tensors),
                                rounded=decode_weights(prep["rounded"], tensors)),
            activation_report=data["activation_report"],
            all_zero=data["all_zero"],
            calibration_samples=data["calibration_samples"],
            seconds=data["seconds"],
            samples=samples,
        )

    def with_stage_options(self, config: QuantConfig, stage: str) -> None:
        """Take this run's own options for ``stage`` (e.g. other activation ranges) from ``config``."""
        changes = {name: getattr(config, name) for name in STAGE_FIELDS[stage]}
        if changes:
            self.config = dataclasses.replace(self.config, **changes).validate()
            self.user_config = {**self.user_config, **changes}


def save_stage(run: Run, staging: Path, output_dir: Path, stage: str, model_changed: bool, previous: str | None) -> None:
    """Write ``stage``'s checkpoint into the staging folder (the earlier stages are still in ``output_dir``)."""
    state, tensors = run.state((output_dir / STAGES_DIR, staging / STAGES_DIR))
    model_from = stage if model_changed or previous is None else read_state(output_dir, previous)["model_from"]
    write_checkpoint(stage_dir(staging, stage), stage, state, tensors, run.model if model_changed else None, model_from)


def resume(output_dir: Path, stage: str, run: Run | None) -> Run:
    """The run as ``stage``'s published checkpoint holds it; the graph stays the one in memory when there is one."""
    data = read_state(output_dir, stage)
    tensors = read_tensors(stage_dir(output_dir, stage), stage)
    root = output_dir / STAGES_DIR
    model = run.model if run is not None else load_model(checkpoint_model_file(output_dir, data))
    try:
        if run is not None:
            return Run.restore(data, tensors, root, model, run.layers, run.samples)
        return Run.restore(data, tensors, root, model)
    except (KeyError, TypeError, ValueError) as exc:  # a stage.json edited by hand or cut short
        raise GraphqError(f"{stage_dir(output_dir, stage) / 'stage.json'} is not a complete {stage} checkpoint "
                          f"({type(exc).__name__}: {exc}): run --stage {stage} again") from exc
