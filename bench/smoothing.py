"""Does smoothing help W8A8? SmoothQuant / OS+ on SmolLM2-135M under a W8A8 fake-quant probe, in onnxruntime.

    .venv/bin/python -m bench.smoothing [--num-samples 32] [--seq-len 256] [--max-tokens 4096]

Calibrates on Sense and Sensibility (per-channel min/max and a token sample of every linear input, one pass of the
float model), smooths, then fake-quantizes every linear but lm_head the simplest W8A8 static way: weights int8
per output channel, symmetric (stored back as float), activations through a QuantizeLinear/DequantizeLinear pair
(uint8, per-tensor, asymmetric, min/max range of the calibration data, after smoothing where smoothed). With float
weights onnxruntime cannot fuse the pairs into integer kernels, so it computes exactly the fake-quant reference.
This is a probe of the smoothing passes until the W8A8 emitters of issue 3 land, not graphq's W8A8 scheme.
Prints perplexity on Pride and Prejudice, delta against float, and the smoothing time.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from bench.common import DATA, Evaluator, bench_arguments, float_export
from graphq.algorithms.grid import fake_quantize_weight, range_to_qparams
from graphq.algorithms.smoothing import ChannelStatsAccumulator, InputChannelStats
from graphq.calibration_data import calibration_samples
from graphq.tokenizer import load_tokenizer
from graphq.graph_utils import add_initializer
from graphq.linear_layers import LinearLayer, find_linear_layers
from graphq.model_io import load_model
from graphq.passes.smooth import smooth_linear_groups
from graphq.passes.weights import set_layer_weight
from graphq.runtimes.layerwise import graph_input_feeds
from graphq.runtimes.submodel import SubmodelSession


def capture(model: ir.Model, layers: list[LinearLayer], samples: list[np.ndarray]) -> dict[str, InputChannelStats]:
    names = list(dict.fromkeys(l.input.name for l in layers))
    session = SubmodelSession(model, {}, names)
    accumulators = {name: ChannelStatsAccumulator(max_tokens=512, seed=0) for name in names}
    for ids in samples:
        for name, array in session.run(graph_input_feeds(model.graph, ids)).items():
            accumulators[name].add(array)
    return {name: acc.result() for name, acc in accumulators.items()}


def fake_quantize_w8a8(model: ir.Model, layers: list[LinearLayer], stats: dict[str, InputChannelStats]) -> None:
    groups: dict[str, list[LinearLayer]] = {}
    for layer in layers:
        groups.setdefault(layer.input.name, []).append(layer)
        set_layer_weight(model, layer, fake_quantize_weight(layer.weight_kn()))
    for name, group in groups.items():
        entry = stats[name]
        qp = range_to_qparams(entry.channel_min.min(), entry.channel_max.max())
        scale, zero_point = qp.scale, qp.zero_point_u8
        x = group[0].input
        s = add_initializer(model.graph, f"{group[0].name}.input_scale", np.array(scale, dtype=np.float32))
        z = add_initializer(model.graph, f"{group[0].name}.input_zero_point", np.array(zero_point, dtype=np.uint8))
        quant = ir.node("QuantizeLinear", [x, s, z], name=f"{group[0].node.name}_probe_Q")
        dequant = ir.node("DequantizeLinear", [quant.outputs[0], s, z], name=f"{group[0].node.name}_probe_DQ")
        quant.outputs[0].name, dequant.outputs[0].name = f"{x.name}_q", f"{x.name}_dq"
        model.graph.insert_before(group[0].node, [quant, dequant])
        for layer in group:
            layer.node.replace_input_with(0, dequant.outputs[0])


def main() -> None:
    parser = bench_arguments(__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calib-text", type=Path, default=DATA / "sensesensibility.txt")
    parser.set_defaults(decode_tokens=0)
    args = parser.parse_args()
    float_dir = float_export(args.work)
    evaluator = Evaluator(float_dir, args)
    samples = calibration_samples(load_tokenizer(float_dir), args.calib_text, num_samples=args.num_samples, seq_len=args.seq_len)

    model = load_model(float_dir)
    layers = [l for l in find_linear_layers(model) if l.role != "lm_head"]
    started = time.perf_counter()
    stats = capture(model, layers, samples)
    print(f"calibration: {len(samples)} samples x {args.seq_len} tokens in {time.perf_counter() - started:.1f}s", flush=True)
    del model

    rows = [("float", evaluator.measure("float", float_dir, None).ppl, None, "")]
    variants = [(None, None, False), ("smoothquant", 0.5, False), ("smoothquant", "auto", False),
                ("os+", 0.5, False), ("os+", "auto", False), ("smoothquant", "auto", True), ("os+", "auto", True)]
    for method, alpha, all_linears in variants:
        label = "W8A8 probe, no smoothing" if method is None else f"W8A8 probe + {method} alpha={alpha}"
        label += " all-linears" if all_linears else ""
        model = load_model(float_dir)
        layers = [l for l in find_linear_layers(model) if l.role != "lm_head"]
        seconds, note, quant_stats = None, "", dict(stats)
        if method is not None:
            started = time.perf_counter()
            smoothed: dict[str, InputChannelStats] = {}
            report = smooth_linear_groups(model, layers, stats, method, alpha, all_linears, smoothed_stats=smoothed)
            seconds = time.perf_counter() - started
            quant_stats.update(smoothed)
            alphas = [g["alpha"] for g in report["groups"]]
            note = (f"{len(report['groups'])} groups smoothed (alpha median {np.median(alphas):.2f}), "
                    f"{len(report['skipped'])} skipped, {report['ops_added']} ops added")
        fake_quantize_w8a8(model, layers, quant_stats)
        out = args.work / ("probe-" + label.replace(" ", "_").replace("+", "p").replace("=", "").replace(",", ""))
        out.mkdir(parents=True, exist_ok=True)
        ir.save(model, out / "model.onnx", external_data="model.onnx.data")
        for extra in float_dir.iterdir():  # tokenizer and config beside the model
            if extra.suffix in (".json", ".txt") and not (out / extra.name).exists():
                (out / extra.name).write_bytes(extra.read_bytes())
        rows.append((label, evaluator.measure(label, out, seconds).ppl, seconds, note))
        del model
        shutil.rmtree(out)  # ~0.5 GB each: keep the disk for the next variant

    reference = rows[0][1]
    print("\n| model | perplexity | delta | smoothing s | note |\n|---|---:|---:|---:|---|")
    for label, ppl, seconds, note in rows:
        secs = "-" if seconds is None else f"{seconds:.1f}"
        print(f"| {label} | {ppl:.3f} | {(ppl / reference - 1) * 100:+.2f}% | {secs} | {note} |")


if __name__ == "__main__":
    main()
