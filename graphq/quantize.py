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

from graphq.algorithms.rtn import QuantizedWeight
from graphq.algorithms.sparsity import keep_pruned_zero
from graphq.activation_quantize import ActivationPrep, activation_quantize, prepare_activations
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
from graphq.calibration_data import load_calibration_samples
from graphq.linear_layers import LinearLayer, find_linear_layers
from graphq.runtimes.layerwise import LayerwiseCalibration
from graphq.model_io import (
    MODEL_FILENAME,
    check_output_dir,
    copy_side_files,
    load_model,
    model_size_bytes,
    quantized_op_count,
    read_model_config,
    remove_stale_staging,
    resolve_model_file,
    save_model,
)
from graphq.layer_plan import (PLAN_FILE, LayerSetting, check_names, embedding_options, plan_from_report, read_plan,
                               setting_for)
from graphq.memory import peak_rss_bytes, return_freed_memory
from graphq.passes.embedding import find_embedding
from graphq.passes.finish import finish_graph
from graphq.passes.fuse_attention import check_fusable
from graphq.passes.weights import set_layer_weight
from graphq.threads import with_configured_threads
from graphq.precision_plan import needs_plan, plan_precision
from graphq.selection import matches, skip_reason
from graphq.sparsify import prune_float_layers, warn_all_zero
from graphq.sparsity_config import check_layers_fit
from graphq.run import FinishLayer, Run, config_for_layer, resume, save_stage
from graphq.stages import (ARTIFACT_SPILL, FINISHED_MARK, PARAMS_SPILL, STAGES, checkpoint_model_file, publishing,
                           read_state, stage_dir, stage_span)
from graphq.version import __version__
from graphq.weight_methods import LayerResult, quantize_region, resolve_methods, rounding_method, statistics_needed
from graphq.weight_methods.lut import codebook_summary
from graphq.kd.engine import KD_STATE_FILE


@dataclass
class QuantizeResult:
    output_dir: Path
    model_file: Path
    report: dict


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
    pool=None,
) -> None:
    """The method sequence (awq, gptq, awq+gptq, ...), decoder layer by decoder layer, on activations captured in
    onnxruntime.

    Each decoder layer is rewritten to its quantized form before the next is calibrated, so the next layer sees
    the real quantized outputs and only one layer's float weights are ever replaced in memory. ``rescaled``
    receives the linears whose output channels a fold rescaled on purpose (for verify). ``on_result`` replaces
    ``finish`` where a later stage continues from the results (kd after awq): the graph then keeps the float
    weights, transformed (folded scales) but not rounded. ``pool`` (graphq.runtimes.workers.WorkerPool) runs the
    calibration samples of each step.
    """
    methods = resolve_methods(config.method)
    samples = samples if samples is not None else load_calibration_samples(model_file, config)
    propagate = config.propagate
    if propagate == "auto":
        propagate = "float" if all(method.float_inputs_suffice for method in methods) else "quantized"
    calibration = LayerwiseCalibration(model, layers, samples, statistics_needed(methods), seed=config.seed,
                                       all_layers=known_layers, pool=pool, propagate=propagate)
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
    tick = time.perf_counter()
    for _, region_layers, stats in bar:
        captured = time.perf_counter()  # since the last region: run it as quantized, capture this one's inputs
        region = quantize_region(model, region_layers, stats, config, methods, known_layers)
        seconds = {"capture": round(captured - tick, 3), "search": round(time.perf_counter() - captured, 3)}
        rescaled.update(region.rescaled)
        for layer in region_layers:
            result = region.layers[layer.name]
            result.entry["layer_seconds"] = seconds  # the decoder layer's, shared by its linears
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
        del region, stats
        return_freed_memory()  # the layer's captured inputs and statistics, before the next layer's arrive
        tick = time.perf_counter()
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


def apply_precision_plan(
    model_path: str | Path, config: QuantConfig, chosen: list[tuple[LinearLayer, dict]], progress: bool, pool=None
) -> tuple[list[tuple[LinearLayer, dict]], dict]:
    """Give the linears the sensitivity plan names their new scheme (or leave them float); returns the linears still
    to quantize and the report's ``precision_plan`` entry."""
    plan = plan_precision(model_path, config, [(layer, entry["scheme"]) for layer, entry in chosen], progress, pool)
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


def start_run(model_file: Path, model_path: str | Path, config: QuantConfig, samples: list[np.ndarray] | None,
              progress: bool, spill_root: Path, pool=None) -> Run:
    """Load the float model and plan the run: which linears, at which scheme and grid, into which target."""
    user_config = dataclasses.asdict(config)
    model = load_model(model_file)
    layers = find_linear_layers(model)
    if not layers:
        quantized = quantized_op_count(model)
        raise GraphqError(
            f"{model_file} is already quantized ({quantized} quantized linear nodes): quantize its float export"
            if quantized else
            f"{model_file} has no quantizable linear layers (MatMul/Gemm with a constant weight): nothing to quantize"
        )
    if config.fuse_attention:
        check_fusable(model, read_model_config(model_file.parent))
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
        chosen, plan_report = apply_precision_plan(model_path, config, chosen, progress, pool)
    schemes = {layer.name: entry["scheme"] for layer, entry in chosen}
    layer_configs = {name: config_for_layer(config, scheme, settings.get(name)) for name, scheme in schemes.items()}
    plan = plan_artifacts(model, model_file, layers, {e["name"]: e["scheme"] for e in layer_reports},
                          {layer.name: layer_configs[layer.name].group_size_for(layer.in_features) for layer, _ in chosen},
                          {layer.name: layer_configs[layer.name].is_symmetric for layer, _ in chosen},
                          config.dtype, config.target)
    collector = ArtifactCollector(config.scheme, config.group_size, config.is_symmetric, config.pack,
                                  spill_root / ARTIFACT_SPILL, target=plan.target, dtype=plan.serving_dtype)
    if config.prunes:
        check_layers_fit([layer for layer, _ in chosen], config)
    if config.compress:  # the export stage compresses: a --tp it cannot split by is refused before the work
        from graphq.artifacts.w8a8sc import check_tp_shapes

        check_tp_shapes({layer.name: (layer.out_features, layer.in_features) for layer, entry in chosen
                         if entry["scheme"] == "w8a8s"}, config.tp_size, read_model_config(model_file.parent))
    params = ParamsRecorder(spill_root / PARAMS_SPILL) if "params" in config.save_format else None
    run = Run(model=model, layers=layers, model_file=model_file, config=config, user_config=user_config,
              settings=settings, layer_reports=layer_reports, schemes=schemes, target=plan.target,
              serving_dtype=plan.serving_dtype, dtype_warning=plan.dtype_warning, collector=collector, params=params,
              plan_report=plan_report, calibration_samples=len(samples) if samples is not None else 0, samples=samples)
    if embedding is not None:
        run.embedding_report = quantize_embedding_step(
            model, embedding, tied, config, plan.target, plan.serving_dtype,
            collector if set(config.save_format) & {"safetensors", "numpy"} else None, run.load_samples)
    run.embedding_name = embedding.name if embedding is not None else getattr(find_embedding(model), "name", None)
    return run


def weights_stage(run: Run, progress: bool, checkpoint_dir: Path, pool=None) -> None:
    """Every weight rewritten: weight-only methods (KD included), W8A8 pruning, smoothing, W4A8's int4 rounding."""
    model, model_file, config, layers = run.model, run.model_file, run.config, run.layers
    finish = run.finish_function()
    layer_configs = run.layer_configs()
    chosen = [layer for layer in layers if layer.name in run.schemes]
    # Weight-only layers first: the activations of W8A8 layers are then calibrated on the partly quantized model.
    for layer_config, config_layers in group_by_config(chosen, layer_configs):
        if layer_config.scheme in ACTIVATION_SCHEMES:
            continue
        trainer = next((m for m in resolve_methods(layer_config.method) if m.trains), None)
        if trainer is not None:
            from graphq.kd.engine import TrainingJob

            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            trainer.train(TrainingJob(model, model_file, config_layers, layer_config, progress, finish, layers,
                                      run.rescaled, run.samples, checkpoint_dir))
        elif layer_config.needs_calibration:
            calibrated_quantize(model, model_file, config_layers, layer_config, progress, finish, layers, run.rescaled,
                                run.samples, pool=pool)
        else:
            data_free_quantize(config_layers, layer_config, progress, finish)
    static_layers = run.layers_of(STATIC_ACTIVATION_SCHEMES)
    dynamic_layers = run.layers_of(DYNAMIC_ACTIVATION_SCHEMES)
    if config.prunes:  # the W8A8 schemes round by RTN in the activation stage: their float weights are pruned first
        prune_float_layers(model, model_file, static_layers + run.layers_of(["w8a8-dynamic"]), config, progress,
                           run.load_samples)

    def weight_stage(stage_layers: list[LinearLayer]) -> dict[str, tuple[QuantizedWeight, dict]]:
        """Round the W4A8 layers' int4 weights by their method (as W4A16 would), and the lowbit levels of W8A8S
        layers by GPTQ, and write the dequantized weights back into the graph, so later layers, the layer-wise
        calibration and the activation ranges see them; the emitter replaces them with the integers later."""
        rounded: dict[str, tuple[QuantizedWeight, dict]] = {}

        def record(layer: LinearLayer, qw: QuantizedWeight, entry: dict) -> None:
            qw, _ = run.target.prepare(qw, {}, run.serving_dtype)  # the stored scales: what the graph will compute
            set_layer_weight(model, layer, qw.dequantize())
            rounded[layer.name] = (qw, entry)

        for sub_config, config_layers in group_by_config(stage_layers, layer_configs):
            if sub_config.scheme == "w8a8s":  # pruned above: GPTQ rounds the kept weights, the mask held fixed
                sub_config = dataclasses.replace(sub_config, method="gptq")
            if sub_config.needs_calibration:
                calibrated_quantize(model, model_file, config_layers, sub_config, progress, record, layers,
                                    run.rescaled, run.samples, pool=pool)
            else:
                data_free_quantize(config_layers, sub_config, progress, record)
        return rounded

    run.prep = prepare_activations(model, static_layers, dynamic_layers, config, progress, run.load_samples,
                                   weight_stage=weight_stage)


def activations_stage(run: Run, progress: bool) -> bool:
    """Calibrate the activation ranges (and the KV cache) and emit the activation-quantized linears; returns
    whether the graph changed."""
    static_layers = run.layers_of(STATIC_ACTIVATION_SCHEMES)
    dynamic_layers = run.layers_of(DYNAMIC_ACTIVATION_SCHEMES)
    if not (static_layers or dynamic_layers or run.config.kv_cache):
        return False
    run.activation_report = activation_quantize(run.model, static_layers, dynamic_layers, run.config, progress,
                                                run.finish_function(), run.load_samples, run.prep)
    run.prep = ActivationPrep()  # used: the weights it held are emitted
    return True


def export_stage(run: Run, staging: Path, checkpoints: Path, progress: bool) -> dict:
    """Write the output folder's deployment files from the finished run (``checkpoints``: the folder holding its
    stages); returns the report, which the caller writes once the stage is timed."""
    config, model, layer_reports = run.config, run.model, run.layer_reports
    warn_all_zero(run.all_zero)
    for entry in layer_reports:
        if entry["name"] in run.rescaled and "skipped" not in entry:
            entry.setdefault("output_rescaled", run.rescaled[entry["name"]])
    out_model_file = staging / MODEL_FILENAME
    fused_layers = 0
    if "onnx" in config.save_format:
        model_config = read_model_config(run.model_file.parent) if config.fuse_attention else {}
        fused_layers = finish_graph(model, model_config, config.accuracy_level, config.fuse_attention)
        save_model(model, out_model_file)
    kd_state = stage_dir(checkpoints, "weights") / KD_STATE_FILE
    if kd_state.is_file():
        shutil.copy2(kd_state, staging / KD_STATE_FILE)
    copy_side_files(run.model_file.parent, staging)
    size_before = model_size_bytes(run.model_file)
    size_after = model_size_bytes(out_model_file) if out_model_file.is_file() else 0
    quantized = [e for e in layer_reports if "skipped" not in e]
    codebook = codebook_summary(config, quantized)
    report = {
        "graphq_version": __version__,
        "source_model": str(run.model_file.resolve()),
        "config": config.to_dict(),
        "layers_quantized": len(quantized),
        "layers_float": len(layer_reports) - len(quantized),
        "model_bytes_before": size_before,
        "model_bytes_after": size_after,
        "linear_weight_bytes_before": sum(e["weight_bytes_before"] for e in quantized),
        "linear_weight_bytes_after": sum(e["weight_bytes_after"] for e in quantized),
        **stage_times(run.seconds),  # the stages so far: the caller adds the export's once it is timed
        "target": run.target.name,
        "serving_dtype": run.serving_dtype,
        **({"attention_fused_layers": fused_layers} if fused_layers else {}),
        **({"dtype_warning": run.dtype_warning} if run.dtype_warning else {}),
        **({"embedding": run.embedding_report} if run.embedding_report else {}),
        **({"codebook": codebook} if codebook else {}),
        "peak_rss_bytes": peak_rss_bytes(),
        "calibration_samples": run.calibration_samples,  # may be fewer than num_samples
        **run.plan_report,
        **run.activation_report,
        **({"seconds_per_decoder_layer": per_layer} if (per_layer := seconds_per_decoder_layer(quantized)) else {}),
        "layers": layer_reports,
    }
    artifact_files = run.collector.write(model, run.layers, staging, config.save_format, config.part_file_size,
                                         __version__, report.get("kv_cache"))
    if run.params is not None:
        artifact_files += run.params.write(staging, __version__)
    report["artifacts"] = {path.name: path.stat().st_size for path in artifact_files}
    if run.collector.target_report:
        report[run.target.name] = run.collector.target_report
    mark_config(staging, run.collector)  # after write: the target's config may name what write saw (float linears)
    (staging / PLAN_FILE).write_text(json.dumps(plan_from_report(layer_reports, run.embedding_report,
                                                                 run.embedding_name), indent=2) + "\n")
    if config.compress:  # W8A8SC beside the W8A8S artifacts it compresses, with a copy of this report
        from graphq.artifacts.w8a8sc import compress_artifacts_dir

        (staging / FINISHED_MARK).write_text(json.dumps(report, indent=2) + "\n")
        report["compression"] = compress_artifacts_dir(staging, staging / "w8a8sc", config.tp_size, progress)
    return report


def stage_times(seconds: dict[str, float]) -> dict:
    """report.json's ``elapsed_seconds`` (their sum) and ``stage_seconds``."""
    return {"elapsed_seconds": round(sum(seconds.values()), 3),
            "stage_seconds": {stage: round(value, 3) for stage, value in seconds.items()}}


def seconds_per_decoder_layer(entries: list[dict]) -> dict[str, dict[str, float]]:
    """{decoder layer: {capture, search}} of the layer-wise calibration, from its linears' entries."""
    per_layer: dict[str, dict[str, float]] = {}
    for entry in entries:
        if "layer_seconds" in entry:
            per_layer.setdefault(str(entry["layer_index"]), entry["layer_seconds"])
    return per_layer


@with_configured_threads
def quantize(
    model_path: str | Path,
    config: QuantConfig,
    output_dir: str | Path,
    overwrite: bool = False,
    progress: bool = True,
    stage: str = "all",
    pool=None,
) -> QuantizeResult:
    """Quantize the linear layers of an exported ONNX LLM and write a new export folder.

    ``model_path`` is an export folder (model.onnx with its tokenizer and config beside it) or a model.onnx file.
    The output folder gets model.onnx, the side files, report.json and the stage checkpoints (graphq.stages).
    ``stage`` runs one stage (weights, activations, export) from the previous one's checkpoint in the output
    folder, or ``all``, which also resumes a run that stopped after a finished stage. Every stage publishes the
    folder whole: it appears (or changes) only when the stage is complete. ``pool``
    (graphq.runtimes.workers.WorkerPool) runs the layer-wise calibration samples on its workers.
    """
    config.validate()
    model_file = resolve_model_file(model_path)
    output_dir = Path(output_dir)
    inputs = [model_file.parent if Path(model_path).is_dir() else model_file]
    inputs += [Path(config.calib)] if config.calib else []  # --overwrite must not delete the calibration file
    inputs += [Path(config.plan)] if config.plan else []
    remove_stale_staging(output_dir)
    check_output_dir(output_dir, inputs, overwrite=True)  # overlaps and permissions; stage_span decides existence
    first, last = stage_span(stage, output_dir, overwrite, config, model_file)
    read_model_config(model_file.parent)  # a damaged config.json is refused now, not after the quantization
    run: Run | None = None
    for index in range(first, last + 1):
        name = STAGES[index]
        started = time.perf_counter()
        if name == "weights":
            # Calibration data is read (and its errors reported) before the work; a layer needs it much later.
            calibrated_weights = set(ACTIVATION_SCHEMES) - set(W4A8_SCHEMES)  # W8A8 weights are RTN whatever the method
            needs_samples = (config.needs_calibration and bool(config.schemes - calibrated_weights)) or bool(
                {"w8a8", "w4a8"} & config.schemes or config.kv_cache or config.smooth
            )
            samples = load_calibration_samples(model_file, config) if needs_samples else None
            with publishing(output_dir, [], inputs) as staging:
                checkpoint = stage_dir(staging, name)
                run = start_run(model_file, model_path, config, samples, progress, checkpoint, pool)
                weights_stage(run, progress, checkpoint, pool)
                run.seconds = {name: time.perf_counter() - started}
                save_stage(run, staging, output_dir, name, True, None)
        elif name == "activations":
            with publishing(output_dir, ["weights"], inputs) as staging:
                run = resume(output_dir, "weights", run)
                run.with_stage_options(config, name)
                run.use_spill_dir(stage_dir(staging, name))
                changed = activations_stage(run, progress)
                run.seconds[name] = time.perf_counter() - started
                save_stage(run, staging, output_dir, name, changed, "weights")
        else:
            with publishing(output_dir, ["weights", "activations"], inputs) as staging:
                run = resume(output_dir, "activations", run)
                run.with_stage_options(config, name)
                report = export_stage(run, staging, output_dir, progress)
                run.seconds[name] = time.perf_counter() - started
                report.update(stage_times(run.seconds))
                if pool is not None and pool.summary() is not None:
                    report["workers"] = pool.summary()
                (staging / FINISHED_MARK).write_text(json.dumps(report, indent=2) + "\n")
            return finished(run, report, output_dir)
        if index == last:
            print(f"graphq: {name} stage finished in {run.seconds[name]:.1f}s; wrote {stage_dir(output_dir, name)} "
                  f"(next: --stage {STAGES[index + 1]})", file=sys.stderr)
            return QuantizeResult(output_dir=output_dir, model_file=checkpoint_model_file(output_dir, read_state(
                output_dir, name)), report={"stage": name, "seconds": round(run.seconds[name], 3)})
    raise AssertionError("unreachable: the export stage returns")


def finished(run: Run, report: dict, output_dir: Path) -> QuantizeResult:
    quantized = report["layers_quantized"]
    codebook = report.get("codebook")
    size_before, size_after = report["model_bytes_before"], report["model_bytes_after"]
    print(
        f"graphq: quantized {quantized} of {len(report['layers'])} linear layers ({describe(run.config)}) in "
        f"{report['elapsed_seconds']:.1f}s; model {size_before / 2**20:.1f} MiB -> {size_after / 2**20:.1f} MiB"
        + (f" ({codebook['bits_per_weight']} bits/weight with {codebook['table_bytes'] / 2**10:.1f} KiB of tables and scales)"
           if codebook else "")
        + f"; wrote {output_dir}",
        file=sys.stderr,
    )
    if run.dtype_warning:
        print(f"graphq: warning: {run.dtype_warning}", file=sys.stderr)
    return QuantizeResult(output_dir=output_dir, model_file=output_dir / MODEL_FILENAME, report=report)
