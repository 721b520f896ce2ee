"""What quantize settles about the artifacts before any layer is quantized: the target (which refuses what its
runtime cannot serve, up front) and the serving dtype (the graph is rounded to it, so quantization starts from
the served weights and the ONNX computes what the artifacts hold)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphq.artifacts.dtypes import resolve_serving_dtype
from graphq.artifacts.targets import ArtifactTarget, target_for
from graphq.linear_layers import LinearLayer
from graphq.passes.serving_dtype import round_initializers


@dataclass
class ArtifactPlan:
    target: ArtifactTarget
    serving_dtype: str
    dtype_warning: str | None


def source_config(model_file: Path) -> dict:
    config_file = model_file.parent / "config.json"
    return json.loads(config_file.read_text()) if config_file.is_file() else {}


def plan_artifacts(model: ir.Model, model_file: Path, layers: list[LinearLayer], layer_schemes: dict[str, str],
                   group_sizes: dict[str, int], symmetric: dict[str, bool], explicit_dtype: str | None,
                   target_name: str) -> ArtifactPlan:
    """Check the plan against the target, resolve the serving dtype, round a float32 graph to it. A dtype warning
    is returned, not printed: quantize prints it once the output is written (an error would make it moot)."""
    target = target_for(target_name)
    target.check(layer_schemes, group_sizes, symmetric, {l.name: (l.out_features, l.in_features) for l in layers})
    onnx_dtype = np.dtype(layers[0].dtype.numpy())
    serving_dtype, warning = resolve_serving_dtype(explicit_dtype, source_config(model_file), onnx_dtype,
                                                   target.dtypes, target.name)
    if serving_dtype != "fp32" and onnx_dtype == np.float32:
        round_initializers(model, serving_dtype)  # quantize the weights the served checkpoint holds
    return ArtifactPlan(target, serving_dtype, warning)
