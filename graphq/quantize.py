"""The quantize pipeline: load an ONNX LLM, rewrite its linear layers' weights, write the output folder."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from graphq.algorithms.codebook import CodebookWeight
from graphq.algorithms.rtn import QuantizedWeight
from graphq.algorithms.sparsity import keep_pruned_zero, zero_fraction
from graphq.activation_quantize import activation_quantize
from graphq.artifacts.params import ParamsRecorder
from graphq.artifacts.plan import plan_artifacts
from graphq.artifacts.records import ArtifactCollector
from graphq.config import (
    ACTIVATION_SCHEMES,
    DYNAMIC_ACTIVATION_SCHEMES,
    STATIC_ACTIVATION_SCHEMES,
    W4A8_SCHEMES,
    QuantConfig,
)
from graphq.embedding_quantize import TIED_REASON, plan_embedding, quantize_embedding_step
from graphq.errors import GraphqError
from graphq.calibration_data import calibration_samples
from graphq.tokenizer import load_tokenizer
from graphq.linear_layers import LinearLayer, find_linear_layers
from graphq.runtimes.layerwise import LayerwiseCalibration
from graphq.model_io import (
    MODEL_FILENAME,
    atomic_output_dir,
    check_output_dir,
    copy_side_files,
    load_model,
    model_context_length,
    model_size_bytes,
    quantized_op_count,
    read_model_config,
    resolve_model_file,
    save_model,
)
from graphq.layer_plan import (PLAN_FILE, LayerSetting, check_names, embedding_options, plan_from_report, read_plan,
                               setting_for)
from graphq.memory import peak_rss_bytes
from graphq.passes.embedding import find_embedding
from graphq.passes.emitters import emitter_for
from graphq.passes.weights import set_layer_weight
from graphq.precision_plan import needs_plan, plan_precision
from graphq.selection import matches, skip_reason
from graphq.sparsify import prune_float_layers, warn_all_zero
from graphq.sparsity_config import check_layers_fit
from graphq.version import __version__
from graphq.weight_methods import LayerResult, quantize_region, resolve_methods, rounding_method, statistics_needed
from graphq.weight_methods.lut import codebook_summary


@dataclass
class QuantizeResult:
    output_dir: Path
    model_file: Path
    report: dict


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


def data_free_quantize(layers: list[LinearLayer], config: QuantConfig, progress: bool, finish: FinishLayer) -> None:
    """Methods that need no data (rtn): each linear alone, from its float weight."""
    methods = resolve_methods(config.method)
    rounder = rounding_method(methods)
    warned: list[str] = []
    for layer in tqdm(layers, desc=f"{config.method} {config.scheme}", unit="layer", disable=not progress, file=sys.stderr):
        weight, keep = layer.weight_kn(), None
        for method in methods:  # data-free pruning (magnitude) before rounding
            keep = method.prune_data_free(layer, weight, config) if keep is None else keep
        if keep is not None:
            weight = np.where(keep, weight, 0.0).astype(np.float32)
        result = rounder.round_data_free(layer, weight, config)
        if keep is not None:
            result.weight = keep_pruned_zero(result.weight, keep)
        finish(layer, result.weight, result.entry)
        warned.extend(f"{layer.name}: {w}" for w in result.warnings)
    if warned:
        print(f"graphq: warning: {len(warned)} layer warning(s) (first: {warned[0]}); see 'warnings' in report.json",
              file=sys.stderr)


def calibrated_quantize(
    model: ir.Model, model_file: Path, layers: list[LinearLayer], config: QuantConfig, progress: bool,
    finish: FinishLayer, known_layers: list[LinearLayer], rescaled: dict[str, str],
    samples: list[np.ndarray] | None = None, on_result: Callable[[LinearLayer, LayerResult], None] | None = None,
) -> None:
    """The method sequence (awq, gptq, awq+gptq, ...), decoder layer by decoder layer, on activations captured in
    onnxruntime.

    Each decoder layer is rewritten to its quantized form before the next is calibrated, so the next layer sees
    the real quantized outputs and only one layer's float weights are ever replaced in memory. ``rescaled``
    receives the linears whose output channels a fold rescaled on purpose (for verify). ``on_result`` replaces
    ``finish`` where a later stage continues from the results (kd after awq): the graph then keeps the float
    weights, transformed (folded scales) but not rounded.
    """
    methods = resolve_methods(config.method)
    samples = samples if samples is not None else load_calibration_samples(model_file, config)
    calibration = LayerwiseCalibration(model, layers, samples, statistics_needed(methods), seed=config.seed,
                                       all_layers=known_layers)
    done: set[str] = set()
    warned: list[str] = []
    unscaled: list[str] = []
    bar = tqdm(
        calibration,
        total=len(calibration.active_regions),
        desc=f"{config.method} {config.scheme} ({len(samples)} samples)",
        unit="layer",
        disable=not progress,
        file=sys.stderr,
    )
    for _, region_layers, stats in bar:
        region = quantize_region(model, region_layers, stats, config, methods, known_layers)
        rescaled.update(region.rescaled)
        for layer in region_layers:
            result = region.layers[layer.name]
            if on_result is not None:
                on_result(layer, result)
            else:
                finish(layer, result.weight, result.entry)
            done.add(layer.name)
            warned.extend(f"{layer.name}: {w}" for w in result.warnings)
            if "awq_skipped" in result.entry:
                unscaled.append(f"{layer.name} ({result.entry['awq_skipped']})")
        entries = [result.entry for result in region.layers.values()]
        bar.set_postfix(
            error=f"{np.mean([e['output_error'] for e in entries]):.2e}",
            rtn=f"{np.mean([e['output_error_rtn'] for e in entries]):.2e}",
        )
    if warned:
        print(
            f"graphq: warning: {len(warned)} calibration warning(s) (first: {warned[0]}); "
            "see 'warnings' in report.json, and consider more --num-samples",
            file=sys.stderr,
        )
    if unscaled:
        print(
            f"graphq: warning: AWQ scales could not be folded for {len(unscaled)} linear layer(s), e.g. {unscaled[0]}; "
            "they got the clip search (or GPTQ) without scaling: see 'awq_skipped' in report.json",
            file=sys.stderr,
        )
    missing = [layer.name for layer in layers if layer.name not in done]
    if missing:
        raise GraphqError(f"calibration never reached {missing[0]}: its decoder layer could not be run on its own")


def load_calibration_samples(model_file: Path, config: QuantConfig) -> list[np.ndarray]:
    """The calibration token sequences the config names (the shipped samples/ text when it names none)."""
    return calibration_samples(
        load_tokenizer(model_file.parent),
        path=config.calib,
        texts=config.calib_texts,
        num_samples=config.num_samples,
        seq_len=config.seq_len,
        seed=config.seed,
        text_field=config.calib_field,
        max_context=model_context_length(model_file.parent),
    )


def apply_precision_plan(
    model_path: str | Path, config: QuantConfig, chosen: list[tuple[LinearLayer, dict]], progress: bool
) -> tuple[list[tuple[LinearLayer, dict]], dict]:
    """Give the linears the sensitivity plan names their new scheme (or leave them float); returns the linears still
    to quantize and the report's ``precision_plan`` entry."""
    plan = plan_precision(model_path, config, [(layer, entry["scheme"]) for layer, entry in chosen], progress)
    kept = []
    for layer, entry in chosen:
        scheme = plan.changes.get(layer.name)
        if scheme is not None:
            entry["precision_plan"] = plan.reasons[layer.name]
            entry["scheme"] = scheme
            if scheme == "float":
                entry["skipped"] = plan.reasons[layer.name]
                continue
        kept.append((layer, entry))
    if not kept:
        raise GraphqError("--disable-level leaves every linear float: lower it")
    return kept, {"precision_plan": plan.report()}


def read_layer_plan(model: ir.Model, layers: list[LinearLayer], config: QuantConfig
                    ) -> tuple[dict[str, LayerSetting], QuantConfig]:
    """``--plan``: each planned linear's setting, and the config with the plan applied: the embedding entry, and
    every planned scheme as an exact-name scheme override (so every pass asking ``scheme_for`` sees the plan)."""
    if not config.plan:
        return {}, config
    strategy = read_plan(config.plan)
    embedding = find_embedding(model)
    check_names(strategy, [*([embedding.name] if embedding is not None else []), *(l.name for l in layers)])
    settings = {layer.name: setting_for(layer.name, strategy[layer.name], config, layer.in_features)
                for layer in layers if layer.name in strategy}
    options = embedding_options(strategy[embedding.name], embedding.name) if embedding is not None \
        and embedding.name in strategy else {}
    overrides = {f"^{re.escape(name)}$": setting.scheme for name, setting in settings.items() if setting.scheme != "float"}
    return settings, dataclasses.replace(config, scheme_overrides={**overrides, **config.scheme_overrides},
                                         **options).validate()


def group_by_config(layers: list[LinearLayer], layer_configs: dict[str, QuantConfig]
                    ) -> list[tuple[QuantConfig, list[LinearLayer]]]:
    """The linears by the config they are quantized under (one pass of a weight method per distinct config)."""
    groups: dict[str, tuple[QuantConfig, list[LinearLayer]]] = {}
    for layer in layers:
        layer_config = layer_configs[layer.name]
        key = json.dumps(layer_config.to_dict(), sort_keys=True, default=str)
        groups.setdefault(key, (layer_config, []))[1].append(layer)
    return list(groups.values())


def config_for_layer(config: QuantConfig, scheme: str, setting: LayerSetting | None) -> QuantConfig:
    """The config one linear is quantized under: its scheme's, with the plan's grid and method where it names one
    (a sensitivity plan may have moved the layer to another scheme since)."""
    sub = config.for_scheme(scheme)
    if setting is None or setting.scheme != scheme:
        return sub
    return dataclasses.replace(sub, group_size=setting.group_size, symmetric=setting.symmetric, method=setting.method)


def mark_config(output_dir: Path, collector: ArtifactCollector) -> None:
    """Let the artifact target edit the output's config.json (MindIE reads ``quantize`` and ``torch_dtype``)."""
    config_file = output_dir / "config.json"
    if config_file.is_file():
        data = collector.target.edit_config(json.loads(config_file.read_text()), collector)
        config_file.write_text(json.dumps(data, indent=2) + "\n")


def describe(config: QuantConfig) -> str:
    if config.scheme in W4A8_SCHEMES:
        text = (f"{config.scheme}, {config.method}, group {config.group_size}, {'sym' if config.is_symmetric else 'asym'}, "
                + (f"activations {config.act_method}" if config.scheme in STATIC_ACTIVATION_SCHEMES else "per-token activations"))
    elif config.scheme in STATIC_ACTIVATION_SCHEMES:
        text = f"{config.scheme}, activations {config.act_method}"
    elif config.scheme == "w8a8-dynamic":
        text = "w8a8-dynamic, per-token activations"
    elif config.weight_format != "uniform":
        group = "per channel" if config.group_size == -1 else f"group {config.group_size}"
        data = "weighted by calibration" if config.needs_calibration else "data-free"
        dtype = f" {config.lut_table_dtype}" if config.weight_format == "lut" else ""
        text = (f"{config.scheme}, {config.weight_format} tables of {2 ** config.bits}{dtype} entries, "
                f"{config.method} ({data}), {group}")
    else:
        text = (f"{config.scheme}, {config.format}, {config.method}, group {config.group_size}, "
                f"{'sym' if config.is_symmetric else 'asym'}")
    if config.sparsity or config.sparsity_pattern:
        text += f", pruned {config.sparsity_pattern or config.sparsity}"
    if config.plan:
        text += f", plan {config.plan}"
    elif config.scheme_overrides:
        text += f", overrides {config.scheme_overrides}"
    if config.smooth:
        text += f", smooth {config.smooth}"
    if config.kv_cache:
        text += f", kv-cache {config.kv_cache}"
    return text


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
    inputs = [model_file.parent if Path(model_path).is_dir() else model_file]
    inputs += [Path(config.calib)] if config.calib else []  # --overwrite must not delete the calibration file
    inputs += [Path(config.plan)] if config.plan else []
    check_output_dir(output_dir, inputs, overwrite)
    read_model_config(model_file.parent)  # a damaged config.json is refused now, not after the quantization
    # Calibration data is read (and its errors reported) before the work; quantizing a layer needs it much later.
    calibrated_weights = set(ACTIVATION_SCHEMES) - set(W4A8_SCHEMES)  # W8A8 weights are RTN whatever the method
    needs_samples = (config.needs_calibration and bool(config.schemes - calibrated_weights)) or bool(
        {"w8a8", "w4a8"} & config.schemes or config.kv_cache or config.smooth
    )
    samples = load_calibration_samples(model_file, config) if needs_samples else None
    with atomic_output_dir(output_dir, overwrite=overwrite, inputs=inputs) as staging:
        model = load_model(model_file)
        layers = find_linear_layers(model)
        if not layers:
            quantized = quantized_op_count(model)
            raise GraphqError(
                f"{model_file} is already quantized ({quantized} quantized linear nodes): quantize its float export"
                if quantized else
                f"{model_file} has no quantizable linear layers (MatMul/Gemm with a constant weight): nothing to quantize"
            )
        settings, config = read_layer_plan(model, layers, config)
        embedding, tied = plan_embedding(model, layers, config)
        layer_reports = []
        chosen = []
        for layer in layers:
            reason = TIED_REASON if layer is tied else skip_reason(layer, config.exclude, config.quantize_lm_head)
            if layer.name in settings and layer is not tied:  # the plan's entry decides, --exclude and lm_head rules not
                reason = "float in the plan" if settings[layer.name].scheme == "float" else None
            scheme = settings[layer.name].scheme if layer.name in settings else config.scheme_for(layer.name)
            entry = {**layer.describe(), "scheme": "float" if reason else scheme}
            if reason:
                entry["skipped"] = reason
            else:
                chosen.append((layer, entry))
            layer_reports.append(entry)
        for option, patterns in (("--exclude", config.exclude), ("scheme_overrides", config.scheme_overrides)):
            unused = [p for p in patterns if not any(matches(layer.name, p) for layer in layers)]
            if unused:
                print(f"graphq: warning: {option} pattern(s) {', '.join(repr(p) for p in unused)} match no linear "
                      f"layer (names look like {layers[0].name})", file=sys.stderr)
        if not chosen and quantized_op_count(model):
            raise GraphqError(
                f"{model_file} is already quantized: only {len(layers)} float linear layer(s) are left "
                f"({layers[0].name}, ...) and none is to be quantized; quantize its float export instead"
            )
        if not chosen:
            raise GraphqError("every linear layer was excluded: loosen --exclude or pass --quantize-lm-head")
        plan_report = {}
        if needs_plan(config):
            chosen, plan_report = apply_precision_plan(model_path, config, chosen, progress)
        entries = {layer.name: entry for layer, entry in chosen}
        layer_configs = {layer.name: config_for_layer(config, entry["scheme"], settings.get(layer.name))
                         for layer, entry in chosen}
        plan = plan_artifacts(model, model_file, layers, {e["name"]: e["scheme"] for e in layer_reports},
                              {layer.name: layer_configs[layer.name].group_size_for(layer.in_features) for layer, _ in chosen},
                              {layer.name: layer_configs[layer.name].is_symmetric for layer, _ in chosen},
                              config.dtype, config.target)
        target, serving_dtype, dtype_warning = plan.target, plan.serving_dtype, plan.dtype_warning
        spill_dir = staging / ".artifact-layers"
        collector = ArtifactCollector(config.scheme, config.group_size, config.is_symmetric, config.pack, spill_dir,
                                      target=target, dtype=serving_dtype)
        prunes = config.prunes
        if prunes:
            check_layers_fit([layer for layer, _ in chosen], config)
        all_zero: list[str] = []
        params = ParamsRecorder(staging / ".params-layers") if "params" in config.save_format else None

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
                    all_zero.append(layer.name)
            output_format = "lut" if codebook else layer_config.format
            if "activation_fallback" in details:
                # The quantized weight stays, the activations stay float: W8A16 (W4A16 for W4A8 layers), QDQ.
                scheme, output_format = ("w4a16" if scheme in W4A8_SCHEMES else "w8a16"), "qdq"
                entries[layer.name]["scheme"] = scheme
            if set(config.save_format) & {"safetensors", "numpy"}:
                collector.add(layer, qw, details, scheme=scheme)
            if params is not None:
                params.add(layer, qw, details, scheme, layer_config.method)
            entries[layer.name]["quantized_output"] = emitter_for(scheme, output_format).emit(model, layer, qw, details)

        embedding_report = None
        if embedding is not None:
            embedding_report = quantize_embedding_step(
                model, embedding, tied, config, target, serving_dtype,
                collector if set(config.save_format) & {"safetensors", "numpy"} else None,
                lambda: load_calibration_samples(model_file, config))
        rescaled: dict[str, str] = {}  # linear -> why a fold rescaled its output channels (verify reads it)
        by_scheme: dict[str, list[LinearLayer]] = {}
        for layer, entry in chosen:
            by_scheme.setdefault(entry["scheme"], []).append(layer)
        # Weight-only layers first: the activations of W8A8 layers are then calibrated on the partly quantized model.
        for layer_config, config_layers in group_by_config([layer for layer, _ in chosen], layer_configs):
            if layer_config.scheme in ACTIVATION_SCHEMES:
                continue
            trainer = next((m for m in resolve_methods(layer_config.method) if m.trains), None)
            if trainer is not None:
                from graphq.kd.engine import TrainingJob

                trainer.train(TrainingJob(model, model_file, config_layers, layer_config, progress, finish, layers,
                                          rescaled, samples, staging))
            elif layer_config.needs_calibration:
                calibrated_quantize(model, model_file, config_layers, layer_config, progress, finish, layers, rescaled,
                                    samples)
            else:
                data_free_quantize(config_layers, layer_config, progress, finish)
        static_layers = [layer for scheme in STATIC_ACTIVATION_SCHEMES for layer in by_scheme.get(scheme, [])]
        dynamic_layers = [layer for scheme in DYNAMIC_ACTIVATION_SCHEMES for layer in by_scheme.get(scheme, [])]
        if prunes:  # the W8A8 schemes round by RTN inside activation_quantize: their float weights are pruned first
            prune_float_layers(model, model_file, static_layers + by_scheme.get("w8a8-dynamic", []), config, progress,
                               lambda: load_calibration_samples(model_file, config))

        def w4a8_weight_stage(stage_layers: list[LinearLayer]) -> dict[str, tuple[QuantizedWeight, dict]]:
            """Round the W4A8 layers' int4 weights by their method (as W4A16 would) and write the dequantized
            weights back into the graph, so later layers, the layer-wise calibration and the activation ranges
            see them; the emitter replaces them with the integers later."""
            rounded: dict[str, tuple[QuantizedWeight, dict]] = {}

            def record(layer: LinearLayer, qw: QuantizedWeight, entry: dict) -> None:
                qw, _ = target.prepare(qw, {}, serving_dtype)  # the stored scales: what the graph will compute
                set_layer_weight(model, layer, qw.dequantize())
                rounded[layer.name] = (qw, entry)

            for layer_config, config_layers in group_by_config(stage_layers, layer_configs):
                if layer_config.needs_calibration:
                    calibrated_quantize(model, model_file, config_layers, layer_config, progress, record, layers,
                                        rescaled, samples)
                else:
                    data_free_quantize(config_layers, layer_config, progress, record)
            return rounded

        extra_report = activation_quantize(
            model, model_file, static_layers, dynamic_layers, config, progress,
            finish, lambda: samples if samples is not None else load_calibration_samples(model_file, config),
            weight_stage=w4a8_weight_stage,
        )
        warn_all_zero(all_zero)
        for entry in layer_reports:
            if entry["name"] in rescaled and "skipped" not in entry:
                entry.setdefault("output_rescaled", rescaled[entry["name"]])
        out_model_file = staging / MODEL_FILENAME
        if "onnx" in config.save_format:
            save_model(model, out_model_file)
        copy_side_files(model_file.parent, staging)
        size_before = model_size_bytes(model_file)
        size_after = model_size_bytes(out_model_file) if out_model_file.is_file() else 0
        elapsed = time.perf_counter() - started
        peak_rss = peak_rss_bytes()
        quantized = [e for e in layer_reports if "skipped" not in e]
        codebook = codebook_summary(config, quantized)
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
            "target": target.name,
            "serving_dtype": serving_dtype,
            **({"dtype_warning": dtype_warning} if dtype_warning else {}),
            **({"embedding": embedding_report} if embedding_report else {}),
            **({"codebook": codebook} if codebook else {}),
            "peak_rss_bytes": peak_rss,
            "calibration_samples": len(samples) if samples is not None else 0,  # may be fewer than num_samples
            **plan_report,
            **extra_report,
            "layers": layer_reports,
        }
        artifact_files = collector.write(
            model, layers, staging, config.save_format, config.part_file_size, __version__, report.get("kv_cache")
        )
        if params is not None:
            artifact_files += params.write(staging, __version__)
            shutil.rmtree(params.spill_dir, ignore_errors=True)
        report["artifacts"] = {path.name: path.stat().st_size for path in artifact_files}
        if collector.target_report:
            report[target.name] = collector.target_report
        mark_config(staging, collector)  # after write: the target's config may name what write saw (float linears)
        shutil.rmtree(spill_dir, ignore_errors=True)
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        embedding_name = embedding.name if embedding is not None else getattr(find_embedding(model), "name", None)
        (staging / PLAN_FILE).write_text(json.dumps(plan_from_report(layer_reports, embedding_report, embedding_name),
                                                    indent=2) + "\n")
        if config.compress:  # W8A8SC beside the W8A8S artifacts it compresses
            from graphq.artifacts.w8a8sc import compress_artifacts_dir

            report["compression"] = compress_artifacts_dir(staging, staging / "w8a8sc", config.tp_size, progress)
            (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    final_file = output_dir / MODEL_FILENAME
    print(
        f"graphq: quantized {len(quantized)} of {len(layer_reports)} linear layers ({describe(config)}) in {elapsed:.1f}s; "
        f"model {size_before / 2**20:.1f} MiB -> {size_after / 2**20:.1f} MiB"
        + (f" ({codebook['bits_per_weight']} bits/weight with {codebook['table_bytes'] / 2**10:.1f} KiB of tables and scales)"
           if codebook else "")
        + f"; wrote {output_dir}",
        file=sys.stderr,
    )
    if dtype_warning:
        print(f"graphq: warning: {dtype_warning}", file=sys.stderr)
    return QuantizeResult(output_dir=output_dir, model_file=final_file, report=report)
