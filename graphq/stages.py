"""Resumable stages of a quantize run: weights -> activations -> export, each a checkpoint in the output folder.

``stages/<stage>/`` in the output folder holds one finished stage:
- ``stage.json``: the run's configuration and the state the next stage needs (report entries, artifact records);
  ``timing.json``: when the stage finished and how long the stages so far took;
- ``model.onnx`` (+ ``.data``): the graph as the stage left it, or ``"model_from"`` in stage.json naming the earlier
  stage whose graph it still is;
- ``tensors.safetensors``: the arrays of that state (W4A8 weights waiting for their activation ranges, the
  statistics of smoothed inputs);
- ``artifact-layers/``, ``params-layers/``: the deployment tensors of the linears the stage finished (plain .npy).

The weights stage rewrites every weight (weight-only methods, KD, pruning, smoothing, W4A8's int4 rounding); the
activation stage calibrates the activation ranges and the KV cache and emits the activation-quantized linears; the
export stage writes the deployment files (model.onnx, safetensors, report, plan). A later stage may change only
its own options (``STAGE_FIELDS``): the rest must equal what the earlier stages ran with.

Every stage publishes the whole output folder atomically (graphq.model_io.atomic_output_dir), the earlier stages it
started from moved in at the end, so a killed run leaves the folder as the last finished stage wrote it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import onnx_ir as ir

from graphq.algorithms.activation_ranges import ActivationStats
from graphq.algorithms.rtn import QuantizedWeight
from graphq.errors import GraphqError
from graphq.model_io import atomic_output_dir

if TYPE_CHECKING:
    from graphq.config import QuantConfig
from graphq.linear_layers import LinearLayer

STAGES = ("weights", "activations", "export")
STAGE_CHOICES = (*STAGES, "all")
STAGES_DIR = "stages"
STATE_FILE = "stage.json"
TIMING_FILE = "timing.json"  # when each stage finished, how long each took
TENSORS_FILE = "tensors.safetensors"
ARTIFACT_SPILL = "artifact-layers"
PARAMS_SPILL = "params-layers"
CHECKPOINT_FORMAT = 1
#: The options a stage may change over the checkpoint it starts from (everything else must be unchanged).
STAGE_FIELDS = {
    "weights": (),
    "activations": ("act_method", "percentile", "kv_cache", "act_fallback"),
    "export": ("part_file_size", "compress", "tp_size", "accuracy_level", "fuse_attention"),
}
#: A finished export: its report is written last.
FINISHED_MARK = "report.json"


def stage_dir(root: Path, stage: str) -> Path:
    """``root``/stages/``stage`` (``root``: an output folder or its staging folder)."""
    return root / STAGES_DIR / stage


def finished_stages(output_dir: Path) -> list[str]:
    """The stages whose checkpoint the folder holds, in order, up to the first missing one."""
    done = []
    for stage in STAGES[:-1]:
        if not (stage_dir(output_dir, stage) / STATE_FILE).is_file():
            break
        done.append(stage)
    return done


def read_state(output_dir: Path, stage: str) -> dict:
    path = stage_dir(output_dir, stage) / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise GraphqError(f"{path} is not a readable stage checkpoint ({exc}): run --stage {stage} again") from exc
    if data.get("format") != CHECKPOINT_FORMAT or data.get("stage") != stage:
        raise GraphqError(f"{path} is not a graphq {stage} checkpoint of this version: run --stage {stage} again")
    timing = path.with_name(TIMING_FILE)
    data["seconds"] = json.loads(timing.read_text())["seconds"] if timing.is_file() else {}
    return data


def user_options(config_dict: dict, stage: str) -> dict:
    """The options a checkpoint of ``stage`` fixes for the stages after it."""
    later = {name for s in STAGES[STAGES.index(stage) + 1:] for name in STAGE_FIELDS[s]}
    return {key: value for key, value in config_dict.items() if key not in later}


def check_same_run(saved: dict, current: dict, source_model: str, output_dir: Path, stage: str, rerun: str) -> None:
    """A stage may start from ``stage``'s checkpoint only if the model and the options that stage fixed are the
    ones it ran with; ``rerun`` says what to do otherwise."""
    if saved["source_model"] != source_model:
        raise GraphqError(f"{output_dir} holds the {stage} stage of {saved['source_model']}, not of {source_model}: "
                          f"{rerun}")
    before, now = user_options(saved["user_config"], stage), user_options(current, stage)
    for key in sorted(set(before) | set(now)):
        if before.get(key) != now.get(key):
            raise GraphqError(f"{output_dir}'s {stage} stage ran with {key}={before.get(key)!r}, this run has "
                              f"{key}={now.get(key)!r}: {rerun}")


# --- linears: a checkpoint names their graph values; a later stage binds the names to its reloaded graph --------

_VALUE_FIELDS = ("weight", "input", "bias", "norm_weight")
_NODE_FIELDS = ("node", "bias_node", "producer_node")


def describe_layer(layer: LinearLayer) -> dict:
    data = {
        "name": layer.name, "role": layer.role, "layer_index": layer.layer_index,
        "weight_transposed": layer.weight_transposed, "in_features": layer.in_features,
        "out_features": layer.out_features, "producer_kind": layer.producer_kind, "producer_name": layer.producer_name,
        "shares_input_with": list(layer.shares_input_with), "op_type": layer.node.op_type,
        "weight_path": [node.name for node in layer.weight_path],
    }
    for key in _VALUE_FIELDS:
        value = getattr(layer, key)
        data[key] = None if value is None else value.name
    for key in _NODE_FIELDS:
        node = getattr(layer, key)
        data[key] = None if node is None else node.name
    return data


def bind_layers(model: ir.Model, descriptions: list[dict]) -> list[LinearLayer]:
    """The linears of a reloaded checkpoint graph, bound by value and node names. A linear the checkpoint had
    already emitted keeps only names (its float weight and node are gone from the graph): placeholders stand in."""
    graph = model.graph
    values: dict[str, ir.Value] = {value.name: value for value in graph.inputs}
    values.update(graph.initializers)
    nodes: dict[str, ir.Node] = {}
    for node in graph:
        if node.name:
            nodes[node.name] = node
        for output in node.outputs:
            if output.name:
                values[output.name] = output

    def value(name: str | None) -> ir.Value | None:
        return None if name is None else values.get(name) or ir.Value(name=name)

    def node(name: str | None, op_type: str = "Identity") -> ir.Node | None:
        return None if name is None else nodes.get(name) or ir.Node("", op_type, inputs=(), name=name)

    layers = []
    for d in descriptions:
        layers.append(LinearLayer(
            name=d["name"], role=d["role"], layer_index=d["layer_index"], node=node(d["node"], d["op_type"]),
            weight=value(d["weight"]), weight_transposed=d["weight_transposed"], in_features=d["in_features"],
            out_features=d["out_features"], input=value(d["input"]),
            weight_path=[node(name) for name in d["weight_path"]], bias=value(d["bias"]),
            bias_node=node(d["bias_node"], "Add"), producer_kind=d["producer_kind"], producer_name=d["producer_name"],
            producer_node=node(d["producer_node"]), norm_weight=value(d["norm_weight"]),
            shares_input_with=list(d["shares_input_with"]),
        ))
    return layers


# --- arrays of the state -------------------------------------------------------------------------------------------

def encode_weights(rounded: dict[str, tuple[QuantizedWeight, dict]], tensors: dict[str, np.ndarray]) -> dict:
    """W4A8 weights awaiting their ranges: arrays into ``tensors``, the rest as JSON."""
    meta = {}
    for name, (qw, entry) in rounded.items():
        if not isinstance(qw, QuantizedWeight) or type(qw) is not QuantizedWeight:
            raise TypeError(f"{name}: only plain integer weights wait for the activation stage")
        tensors[f"rounded/{name}/q"] = qw.q
        tensors[f"rounded/{name}/scales"] = qw.scales
        if qw.zero_points is not None:
            tensors[f"rounded/{name}/zero_points"] = qw.zero_points
        meta[name] = {"bits": qw.bits, "group_size": qw.group_size, "entry": entry}
    return meta


def decode_weights(meta: dict, tensors: dict[str, np.ndarray]) -> dict[str, tuple[QuantizedWeight, dict]]:
    return {name: (QuantizedWeight(tensors[f"rounded/{name}/q"], tensors[f"rounded/{name}/scales"],
                                   tensors.get(f"rounded/{name}/zero_points"), m["bits"], m["group_size"]), m["entry"])
            for name, m in meta.items()}


def encode_stats(known: dict[str, ActivationStats], tensors: dict[str, np.ndarray]) -> dict:
    """Statistics derived from the smoothing pass (ranges and sampled tokens: ActivationStats.from_channel_ranges)."""
    meta = {}
    for name, stats in known.items():
        tensors[f"known/{name}/channel_min"] = stats.channel_min
        tensors[f"known/{name}/channel_max"] = stats.channel_max
        tensors[f"known/{name}/tokens"] = np.ascontiguousarray(stats.tokens, dtype=np.float32)
        meta[name] = {"rows_seen": stats.rows_seen, "reservoir_rows": stats.reservoir_rows, "seed": stats.seed}
    return meta


def decode_stats(meta: dict, tensors: dict[str, np.ndarray]) -> dict[str, ActivationStats]:
    return {name: ActivationStats.from_channel_ranges(tensors[f"known/{name}/channel_min"],
                                                      tensors[f"known/{name}/channel_max"],
                                                      tensors[f"known/{name}/tokens"], m["rows_seen"],
                                                      reservoir_rows=m["reservoir_rows"], seed=m["seed"])
            for name, m in meta.items()}


def write_checkpoint(directory: Path, stage: str, state: dict, tensors: dict[str, np.ndarray],
                     model: ir.Model | None, model_from: str | None) -> None:
    """Write one stage's checkpoint into ``directory`` (inside a staging folder: it is published whole)."""
    from graphq.artifacts.safetensors_io import save_file

    from graphq.model_io import MODEL_FILENAME, save_model

    directory.mkdir(parents=True, exist_ok=True)
    if model is not None:
        save_model(model, directory / MODEL_FILENAME)
    if tensors:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(directory / TENSORS_FILE))
    seconds = state.pop("seconds")  # apart: stage.json is the same for the same run, to the byte
    (directory / TIMING_FILE).write_text(json.dumps({"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                     "seconds": seconds}, indent=1) + "\n")
    data = {"format": CHECKPOINT_FORMAT, "stage": stage, "model_from": model_from or stage, **state}
    (directory / STATE_FILE).write_text(json.dumps(data, indent=1) + "\n")


def read_tensors(directory: Path, stage: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    path = directory / TENSORS_FILE
    try:
        return load_file(str(path)) if path.is_file() else {}
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GraphqError(f"{path} is not a readable stage checkpoint ({reason}): run --stage {stage} again") from exc


def checkpoint_model_file(output_dir: Path, state: dict) -> Path:
    from graphq.model_io import MODEL_FILENAME

    return stage_dir(output_dir, state["model_from"]) / MODEL_FILENAME


def relative_to_any(path: Path, roots: tuple[Path, ...]) -> str:
    """``path`` relative to the first of ``roots`` holding it (a run's stages folder, published or staging)."""
    for root in roots:
        if Path(path).is_relative_to(root):
            return str(Path(path).relative_to(root))
    raise ValueError(f"{path} lies in none of {', '.join(map(str, roots))}")


def stage_span(stage: str, output_dir: Path, overwrite: bool, config: QuantConfig, model_file: Path) -> tuple[int, int]:
    """The first and last stage (indices into STAGES) this run does, after checking the output folder allows it."""
    if stage not in STAGE_CHOICES:
        raise GraphqError(f"unknown stage '{stage}': choose one of {', '.join(STAGE_CHOICES)}")
    source, current = str(model_file.resolve()), dataclasses.asdict(config)
    exists = output_dir.exists()
    done = finished_stages(output_dir) if output_dir.is_dir() else []
    exported = (output_dir / FINISHED_MARK).is_file()
    if stage == "all":
        if not exists or overwrite:
            return 0, len(STAGES) - 1
        if exported or not done:
            raise GraphqError(f"output folder {output_dir} already exists: choose another or pass --overwrite")
        last = done[-1]
        check_same_run(read_state(output_dir, last), current, source, output_dir, last,
                       "pass --overwrite to start again, or run that stage's options")
        print(f"graphq: {output_dir} holds a run stopped after its {last} stage: resuming from there", file=sys.stderr)
        return STAGES.index(last) + 1, len(STAGES) - 1
    index = STAGES.index(stage)
    if exists and exported and not overwrite:
        raise GraphqError(f"output folder {output_dir} holds a finished export: pass --overwrite to redo its {stage} "
                          "stage (the stages before it are kept)")
    if index == 0:
        if exists and not overwrite and not done:
            raise GraphqError(f"output folder {output_dir} already exists: choose another or pass --overwrite")
        return 0, 0
    previous = STAGES[index - 1]
    if previous not in done:
        raise GraphqError(f"{output_dir} has no finished {previous} stage: run graphq quantize with --stage {previous} "
                          f"(or without --stage) into it first")
    check_same_run(read_state(output_dir, previous), current, source, output_dir, previous,
                   f"run --stage {previous} again with these options")
    return index, index


@contextlib.contextmanager
def publishing(output_dir: Path, carried: list[str], inputs: list[Path]) -> Iterator[Path]:
    """A staging folder that replaces ``output_dir`` when the block succeeds, taking over the finished stages
    ``carried`` from it. They are moved, not linked or copied (onnx refuses hard-linked external data), and only
    after the block: until then the stage reads them where they are."""
    with atomic_output_dir(output_dir, overwrite=True, inputs=inputs) as staging:
        yield staging
        for stage in carried:
            stage_dir(staging, stage).parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage_dir(output_dir, stage), stage_dir(staging, stage))
