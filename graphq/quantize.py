"""The quantize pipeline: load an ONNX LLM, rewrite its linear layers' weights, write the output folder."""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from graphq.algorithms.rtn import QuantizedWeight, quantize_rtn
from graphq.config import QuantConfig
from graphq.errors import GraphqError
from graphq.linear_layers import LinearLayer, find_linear_layers
from graphq.model_io import (
    MODEL_FILENAME,
    atomic_output_dir,
    copy_side_files,
    load_model,
    model_size_bytes,
    resolve_model_file,
    save_model,
)
from graphq.passes.matmulnbits import emit_matmulnbits
from graphq.passes.qdq import emit_dequantize_linear
from graphq.selection import skip_reason
from graphq.version import __version__

log = logging.getLogger(__name__)

EMITTERS = {"matmulnbits": emit_matmulnbits, "qdq": emit_dequantize_linear}


@dataclass
class QuantizeResult:
    output_dir: Path
    model_file: Path
    report: dict


def quantized_weight_bytes(qw: QuantizedWeight) -> int:
    """Storage of the integer weight plus its scales (float32) and zero points (bits each)."""
    k, n = qw.shape
    bits = k * n * qw.bits + qw.scales.size * 32
    if qw.zero_points is not None:
        bits += qw.zero_points.size * qw.bits
    return bits // 8


def quantize_layer_weight(layer: LinearLayer, config: QuantConfig) -> QuantizedWeight:
    weight = layer.weight_kn()
    if config.group_size != -1 and config.group_size > layer.in_features:
        group_size = -1  # one group covers all of K: the same thing, stated as per-channel
    else:
        group_size = config.group_size
    return quantize_rtn(weight, config.bits, group_size, config.is_symmetric)


def quantize(
    model_path: str | Path,
    config: QuantConfig,
    output_dir: str | Path,
    overwrite: bool = False,
    progress: bool = True,
) -> QuantizeResult:
    """Quantize the linear layers of an exported ONNX LLM and write a new export folder.

    ``model_path`` is an export folder (model.onnx with its tokenizer and config beside it) or a model.onnx file.
    The output folder gets model.onnx, the side files, and report.json; it appears only when complete.
    """
    config.validate()
    started = time.perf_counter()
    model_file = resolve_model_file(model_path)
    output_dir = Path(output_dir)
    with atomic_output_dir(output_dir, overwrite=overwrite, inputs=[model_file.parent if Path(model_path).is_dir() else model_file]) as staging:
        model = load_model(model_file)
        layers = find_linear_layers(model)
        if not layers:
            raise GraphqError(
                f"{model_file} has no quantizable linear layers (MatMul/Gemm with a constant weight): nothing to quantize"
            )
        emit = EMITTERS[config.format]
        layer_reports = []
        chosen = []
        for layer in layers:
            reason = skip_reason(layer, config.exclude, config.quantize_lm_head)
            entry = {**layer.describe(), "scheme": "float" if reason else config.scheme}
            if reason:
                entry["skipped"] = reason
            else:
                chosen.append((layer, entry))
            layer_reports.append(entry)
        if not chosen:
            raise GraphqError("every linear layer was excluded: loosen --exclude or pass --quantize-lm-head")
        bar = tqdm(chosen, desc=f"{config.method} {config.scheme}", unit="layer", disable=not progress, file=sys.stderr)
        for layer, entry in bar:
            weight = layer.weight_kn()
            qw = quantize_layer_weight(layer, config)
            error = float(np.mean((qw.dequantize() - weight) ** 2) / max(np.mean(weight**2), 1e-30))
            entry.update(
                bits=config.bits,
                group_size=qw.group_size if qw.group_size < layer.in_features else -1,
                symmetric=qw.symmetric,
                format=config.format,
                weight_bytes_before=int(weight.size * layer.dtype.itemsize),
                weight_bytes_after=quantized_weight_bytes(qw),
                weight_relative_mse=error,
            )
            emit(model, layer, qw)
            bar.set_postfix_str(layer.name)
        out_model_file = staging / MODEL_FILENAME
        save_model(model, out_model_file)
        copy_side_files(model_file.parent, staging)
        size_before = model_size_bytes(model_file)
        size_after = model_size_bytes(out_model_file)
        elapsed = time.perf_counter() - started
        quantized = [e for e in layer_reports if "skipped" not in e]
        report = {
            "graphq_version": __version__,
            "source_model": str(model_file.resolve()),
            "config": config.to_dict(),
            "layers_quantized": len(quantized),
            "layers_float": len(layer_reports) - len(quantized),
            "model_bytes_before": size_before,
            "model_bytes_after": size_after,
            "linear_weight_bytes_before": sum(e["weight_bytes_before"] for e in quantized),
            "linear_weight_bytes_after": sum(e["weight_bytes_after"] for e in quantized),
            "elapsed_seconds": round(elapsed, 3),
            "layers": layer_reports,
        }
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    final_file = output_dir / MODEL_FILENAME
    print(
        f"graphq: quantized {len(quantized)} of {len(layer_reports)} linear layers ({config.scheme}, "
        f"{config.format}, group {config.group_size}, {'sym' if config.is_symmetric else 'asym'}) in {elapsed:.1f}s; "
        f"model {size_before / 2**20:.1f} MiB -> {size_after / 2**20:.1f} MiB; wrote {output_dir}",
        file=sys.stderr,
    )
    return QuantizeResult(output_dir=output_dir, model_file=final_file, report=report)
