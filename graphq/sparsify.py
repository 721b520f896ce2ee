"""Prune the float weights in the graph, decoder layer by decoder layer, before another pipeline rounds them.

The W8A8 schemes (w8a8, w8a8-dynamic, w8a8s) round their weights to int8 per channel inside the activation
pipeline, after calibrating activations on the model; pruning must come first, so ``prune_float_layers`` zeroes
(and for SparseGPT OBS-updates) the float weights of those layers in place. Calibrated pruners run on the
layer-wise engine: layer i's inputs are captured on the outputs of the already-pruned layers before it. The same
function backs ``graphq prune`` (a dense-float model with the zeros in place, for measuring pruning alone).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from graphq.config import QuantConfig
from graphq.memory import peak_rss_bytes
from graphq.errors import GraphqError
from graphq.linear_layers import LinearLayer, find_linear_layers
from graphq.model_io import MODEL_FILENAME, atomic_output_dir, copy_side_files, load_model, resolve_model_file, save_model
from graphq.selection import skip_reason
from graphq.sparsity_config import check_layers_fit
from graphq.version import __version__
from graphq.weight_methods import RegionWork, resolve_methods, statistics_needed


def pruning_method(config: QuantConfig):
    """The one pruning method of the config's sequence, or None."""
    return next((m for m in resolve_methods(config.method) if m.prunes), None)


def measured_sparsity(weight_kn: np.ndarray) -> float:
    return float(np.mean(np.asarray(weight_kn) == 0))


def prune_float_layers(
    model: ir.Model, model_file: Path, layers: list[LinearLayer], config: QuantConfig, progress: bool,
    load_samples=None,
) -> dict[str, float]:
    """Prune ``layers`` in place with the config's pruning method; returns layer name -> measured sparsity.

    ``load_samples``: () -> calibration token sequences (only called when the method needs data).
    """
    method = pruning_method(config)
    if method is None or not layers:
        return {}
    check_layers_fit(layers, config)
    measured: dict[str, float] = {}
    if not method.calibrated:
        for layer in tqdm(layers, desc=f"prune {method.name}", unit="layer", disable=not progress, file=sys.stderr):
            work = RegionWork(model, [layer], {}, config, layers)
            method.prune_float(work)
            measured[layer.name] = measured_sparsity(layer.weight_kn())
        return measured
    from graphq.runtimes.layerwise import LayerwiseCalibration

    if load_samples is None:
        from graphq.quantize import load_calibration_samples

        samples = load_calibration_samples(model_file, config)
    else:
        samples = load_samples()
    calibration = LayerwiseCalibration(model, layers, samples, statistics_needed([method]), seed=config.seed)
    bar = tqdm(calibration, total=len(calibration.active_regions), desc=f"prune {method.name} ({len(samples)} samples)",
               unit="layer", disable=not progress, file=sys.stderr)
    for _, region_layers, stats in bar:
        work = RegionWork(model, region_layers, stats, config, layers)
        method.prune_float(work)
        for layer in region_layers:
            measured[layer.name] = measured_sparsity(layer.weight_kn())
    missing = [layer.name for layer in layers if layer.name not in measured]
    if missing:
        raise GraphqError(f"calibration never reached {missing[0]}: its decoder layer could not be run on its own")
    return measured


def warn_all_zero(names: list[str]) -> None:
    """A sparsity so high that a layer lost every weight: say which (the run still completes)."""
    if names:
        print(f"graphq: warning: {len(names)} linear layer(s) became all zero, e.g. {names[0]}: lower --sparsity",
              file=sys.stderr)


def prune(model_path: str | Path, config: QuantConfig, output_dir: str | Path, overwrite: bool = False,
          progress: bool = True) -> dict:
    """``graphq prune``: the float model with the selected linears pruned (weights stay float); returns the report."""
    config.validate()
    if pruning_method(config) is None:
        raise GraphqError("graphq prune needs a pruning --method: magnitude, wanda or sparsegpt")
    others = [m.name for m in resolve_methods(config.method) if not m.prunes and m.name != "rtn"]
    if others:
        raise GraphqError(f"graphq prune runs one pruning method on the float weights; --method {config.method} also "
                          f"names {others[0]}: use graphq quantize for sequences")
    started = time.perf_counter()
    model_file = resolve_model_file(model_path)
    with atomic_output_dir(output_dir, overwrite=overwrite,
                           inputs=[model_file.parent if Path(model_path).is_dir() else model_file]) as staging:
        model = load_model(model_file)
        layers = find_linear_layers(model)
        chosen = [layer for layer in layers if skip_reason(layer, config.exclude, config.quantize_lm_head) is None]
        if not chosen:
            raise GraphqError("every linear layer was excluded: loosen --exclude or pass --quantize-lm-head")
        measured = prune_float_layers(model, model_file, chosen, config, progress)
        warn_all_zero([name for name, fraction in measured.items() if fraction == 1.0])
        save_model(model, staging / MODEL_FILENAME)
        copy_side_files(model_file.parent, staging)
        report = {
            "graphq_version": __version__,
            "source_model": str(model_file.resolve()),
            "config": config.to_dict(),
            "elapsed_seconds": round(time.perf_counter() - started, 3),
            "peak_rss_bytes": peak_rss_bytes(),
            "layers": [{**layer.describe(), "scheme": "float", "sparsity": measured[layer.name]} if layer.name in measured
                       else {**layer.describe(), "scheme": "float", "skipped": "not pruned"} for layer in layers],
        }
        sizes = {layer.name: layer.in_features * layer.out_features for layer in chosen}
        report["sparsity"] = float(sum(measured[n] * sizes[n] for n in measured) / sum(sizes.values()))
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"graphq: pruned {len(measured)} linear layers ({config.method}, sparsity {report['sparsity']:.3f}) "
          f"in {report['elapsed_seconds']:.1f}s; wrote {output_dir}", file=sys.stderr)
    return report
