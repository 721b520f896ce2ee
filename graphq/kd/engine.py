"""The KD weight stage: the methods before ``kd`` (awq) on the graph, then decoder-layer-by-layer distillation in
torch, then every learned clip (and norm) written back into the graph through ``finish``, like any other method.

Layer i is trained on the inputs the already-quantized layers 0..i-1 produce, against the float layer i's outputs
on the float model's inputs (the teacher's). Only one layer's activations (teacher inputs, student inputs, targets)
are held, and one decoder layer's weights in torch: the float weights of the model are held once, in the graph
(each torch layer is read from it when reached and dropped when done).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from graphq.algorithms.awq import quantize_with_clip
from graphq.algorithms.rtn import quantize_rtn
from graphq.errors import GraphqError
from graphq.kd.settings import KDSettings
from graphq.linear_layers import LinearLayer
from graphq.memory import return_freed_memory, trace
from graphq.model_io import InitializerSpill
from graphq.passes.weights import set_norm_weight
from graphq.weight_methods.base import LayerResult


@dataclass
class TrainingJob:
    """What quantize hands a training method: the linears of one weight config and how to finish each."""

    model: ir.Model
    model_file: Path
    layers: list[LinearLayer]
    config: Any  # QuantConfig
    progress: bool
    finish: Callable[[LinearLayer, Any, dict], None]
    known_layers: list[LinearLayer]
    rescaled: dict[str, str]
    samples: list[np.ndarray] | None
    output_dir: Path | None = None  # where the stage's trained state is written (the staging output folder)


#: The trained state of a kd run, beside report.json: ``<linear>.quant_alpha`` and the trained ``<norm>.weight``.
KD_STATE_FILE = "kd_state.safetensors"
#: The float weights the methods before kd transformed, on disk while kd runs (deleted at its end).
KD_SPILL_FILE = "kd_float_weights.bin"


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise GraphqError(f"--device {name}: torch sees no CUDA device here; use --device cpu (or auto)")
    return name


def starting_point(job: TrainingJob, before: list[str],
                   on_layer: Callable[[LinearLayer], None] | None = None) -> dict[str, LayerResult]:
    """The results of the methods before kd (awq): their scales folded into the graph, their clips kept;
    ``on_layer`` is called once each linear's result is in."""
    if not before:
        return {}
    from graphq.quantize import calibrated_quantize

    results: dict[str, LayerResult] = {}
    sub = dataclasses.replace(job.config, method="+".join(before))
    def keep(layer: LinearLayer, result: LayerResult) -> None:
        results[layer.name] = result
        if on_layer is not None:
            on_layer(layer)

    calibrated_quantize(job.model, job.model_file, job.layers, sub, job.progress, job.finish, job.known_layers,
                        job.rescaled, job.samples, on_result=keep)
    return results


def training_tokens(job: TrainingJob, settings: KDSettings) -> np.ndarray:
    """[samples, tokens] int64: train_samples windows of cutoff_len tokens of the calibration text."""
    from graphq.quantize import load_calibration_samples

    config = dataclasses.replace(job.config, num_samples=settings.train_samples or job.config.num_samples,
                                 seq_len=settings.cutoff_len or job.config.seq_len)
    samples = load_calibration_samples(job.model_file, config)
    length = min(len(s) for s in samples)
    if length < 2:
        raise GraphqError("the KD calibration samples are shorter than 2 tokens: give a longer --calib text")
    return np.stack([np.asarray(s[:length], dtype=np.int64) for s in samples])


def distill(job: TrainingJob, before: list[str]) -> None:
    """Quantize ``job.layers`` by KD (from RTN, or from the methods ``before``), finishing each linear."""
    import torch

    from graphq.kd.fake_quant import FakeQuantLinear, alpha_from_clip
    from graphq.kd.train import layer_outputs, train_layer
    from graphq.runtimes.torch_model import (build_torch_model, decoder_layer_path, decoder_layers,
                                             first_layer_inputs, load_graph_weights, release_weights, to_device)

    config = job.config
    settings = KDSettings.from_dict(config.kd)
    seed = config.seed if settings.seed is None else settings.seed
    torch.manual_seed(seed)
    device = resolve_device(config.device)
    trace("kd start")
    # The methods before kd (awq) leave every float weight they transform in the graph's memory: each layer's wait
    # on disk, mapped, from the moment it is transformed until it is trained (then its quantized weights replace
    # them), so neither stage holds the whole model's float weights.
    # (The layer-wise loop hands each layer's freed arrays back to the system itself.)
    spill = InitializerSpill(job.output_dir / KD_SPILL_FILE) if before and job.output_dir is not None else None
    spill_weight = (lambda layer: spill.move([layer.weight])) if spill is not None else None
    start_results = starting_point(job, before, spill_weight)
    if spill is not None:
        spill.move(job.model.graph.initializers.values())  # what else they transformed (a linear left float)
        return_freed_memory()
    by_block: dict[int, list[LinearLayer]] = {}
    outside: list[LinearLayer] = []
    for layer in job.layers:
        where = decoder_layer_path(layer.name)
        (by_block.setdefault(where[1], []) if where else outside).append(layer)
    kept = {layer.name for layer in outside}
    for name, result in start_results.items():  # trained layers keep the start's clip and entry, not its integers
        if name not in kept:
            start_results[name] = dataclasses.replace(result, weight=None)
    trace("kd after starting point")
    started = time.perf_counter()
    # The decoder layers' weights are read from the graph one layer at a time, when the layer is reached, and
    # dropped when it is done: torch never holds the whole model beside the graph.
    torch_model = to_device(build_torch_model(job.model_file.parent, job.model, job.known_layers,
                                              decoder_weights=False), device)
    torch_model.requires_grad_(False)
    trace("kd after torch model")
    tokens = torch.from_numpy(training_tokens(job, settings)).to(device)
    _, kwargs = first_layer_inputs(torch_model, tokens[:1])
    batch = settings.micro_batch_size
    teacher_in = torch.cat([first_layer_inputs(torch_model, tokens[s:s + batch])[0] for s in range(0, len(tokens), batch)])
    student_in = teacher_in.clone()
    blocks = decoder_layers(torch_model)
    block_names = {id(module): name for name, module in torch_model.named_modules()}
    for module in [torch_model.get_input_embeddings(), torch_model.get_output_embeddings()]:
        if module is not None:  # the embedding's work is done: only decoder layers run from here on
            release_weights(module)
    trace("kd after first inputs")
    group = lambda layer: config.group_size_for(layer.in_features)  # noqa: E731
    bar = tqdm(total=len(by_block), desc=f"kd {config.scheme} ({len(tokens)}x{tokens.shape[1]} tokens)", unit="layer",
               disable=not job.progress, file=sys.stderr)
    last = max(by_block, default=-1)
    state: dict[str, np.ndarray] = {}
    for index, block in enumerate(blocks):
        if index > last:
            break
        prefix = f"{block_names[id(block)]}."
        load_graph_weights(torch_model, job.model, job.known_layers, lambda name: name.startswith(prefix))
        to_device(block, device).requires_grad_(False)
        # The float layer's outputs replace its inputs in place: the teacher's inputs are not needed again.
        targets = layer_outputs(block, teacher_in, kwargs, batch, out=teacher_in)
        del teacher_in
        trace(f"kd layer {index} targets")
        planned = by_block.get(index, [])
        if planned:
            fake = {}
            for layer in planned:
                module = torch_model.get_submodule(layer.name)
                start = start_results.get(layer.name)
                alpha = None
                if start is not None and start.clip is not None:
                    alpha = alpha_from_clip(start.clip, layer.weight_kn(), config.is_symmetric)
                fake[layer.name] = FakeQuantLinear(module, config.bits, group(layer), config.is_symmetric, alpha,
                                                   settings.min_alpha).to(device)
                parent_name, _, attribute = layer.name.rpartition(".")
                setattr(torch_model.get_submodule(parent_name), attribute, fake[layer.name])
            alphas = [m.quant_alpha for m in fake.values()] if "quant_alpha" in settings.trainable_keys else []
            norm_layers = {layer.producer_name: layer for layer in planned
                           if layer.norm_weight is not None and layer.producer_name and "norm" in settings.trainable_keys}
            norms = [torch_model.get_submodule(name).weight for name in norm_layers]
            for parameter in [*alphas, *norms]:
                parameter.requires_grad_(True)
            steps = tqdm(total=0, desc=f"  layer {index}", unit="step", leave=False, disable=not job.progress,
                         file=sys.stderr)

            def on_step(step: int, total: int, loss: float) -> None:
                steps.total = total
                steps.n = step
                steps.set_postfix(loss=f"{loss:.3e}")

            training = train_layer(block, alphas if settings.enable else [], norms if settings.enable else [],
                                   student_in, targets, kwargs, settings, seed + index, on_step)
            steps.close()
            trace(f"kd layer {index} trained")
            block.requires_grad_(False)
            for name, layer in norm_layers.items():
                state[f"{name}.weight"] = torch_model.get_submodule(name).weight.detach().cpu().numpy().copy()
                set_norm_weight(job.model, layer, state[f"{name}.weight"])
            for layer in planned:
                module = fake[layer.name]
                state[f"{layer.name}.quant_alpha"] = module.quant_alpha.detach().cpu().numpy().copy()
                clip = module.clip_ranges()
                qw = quantize_with_clip(layer.weight_kn(), clip, config.bits, group(layer), config.is_symmetric)
                start = start_results.get(layer.name)
                entry = {**(start.entry if start is not None else {}), "kd_loss_start": training.loss_start,
                         "kd_loss_end": training.loss_end, "kd_steps": training.steps,
                         "quant_alpha_mean": float(np.mean(clip.shrink)),
                         **({"kd_eval_losses": training.eval_losses} if training.eval_losses else {})}
                job.finish(layer, qw, entry)
            bar.update(1)
            bar.set_postfix(loss=f"{training.loss_start:.2e}->{training.loss_end:.2e}")
        student_in = layer_outputs(block, student_in, kwargs, batch, out=student_in)
        teacher_in = targets
        del targets
        release_weights(block)
        return_freed_memory()  # the layer's weights, fake-quant buffers and autograd intermediates
        trace(f"kd layer {index} done")
    bar.close()
    for layer in outside:  # lm_head: no decoder layer to train in; the starting method's (or RTN's) result
        start = start_results.get(layer.name)
        qw = start.weight if start is not None else quantize_rtn(layer.weight_kn(), config.bits, group(layer),
                                                                 config.is_symmetric)
        job.finish(layer, qw, {**(start.entry if start is not None else {}),
                               "kd": f"outside the decoder layers: kept the {'+'.join(before) or 'rtn'} result"})
    if spill is not None:
        spill.restore(job.model)  # what stayed float (an excluded linear AWQ rescaled, ...)
    if job.output_dir is not None and state:
        from graphq.artifacts.safetensors_io import save_file

        save_file(state, str(job.output_dir / KD_STATE_FILE))
    print(f"graphq: kd trained {len(by_block)} decoder layer(s) on {len(tokens)} samples x {tokens.shape[1]} tokens "
          f"in {time.perf_counter() - started:.0f}s ({device})", file=sys.stderr)
