"""Where the data-free per-channel LUT loses: one linear role at a time quantized, the rest float (issue 11).

    .venv/bin/python -m bench.lut_roles [--float /work/out/bench/fp32] [--scratch /tmp/lut_roles] [--equalize 1.0]

Every decoder linear of the chosen role gets the data-free per-output-channel 4-bit LUT (int8 table, float16
scale: ``lut_quantize(w, 4, -1, table_dtype="int8")``) or uniform RTN asym g128, dequantized into the float graph
(fake quantization: the same values the emitted graph computes), and onnxruntime measures perplexity on the first
4096 tokens of Pride and Prejudice. ``--equalize A`` adds a data-free column equalization before the table: the
weight's input channels are scaled by s = rms(column)^-A (shared by the linears reading one input, tied across
the query heads of one KV head for o_proj), quantized, and scaled back, as if s were folded into the norm, v_proj
or up_proj before it (exact in float). Fake quantization: a diagnosis, not an artifact.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir

from bench.common import Evaluator, bench_arguments, float_export
from graphq.algorithms.codebook import lut_quantize
from graphq.algorithms.rtn import quantize_rtn
from graphq.evaluate import perplexity
from graphq.linear_layers import LinearLayer, find_linear_layers, input_groups
from graphq.model_io import MODEL_FILENAME, copy_side_files, load_model, read_model_config, save_model
from graphq.runtimes.ort import OrtCausalLM


def decoder_linears(model: ir.Model) -> list[LinearLayer]:
    return [layer for layer in find_linear_layers(model) if layer.role != "lm_head"]


def column_scales(group: list[LinearLayer], alpha: float, heads: int, kv_heads: int) -> np.ndarray:
    """s = rms(column)^-alpha over the linears reading one input (geometric mean 1); o_proj's tied per KV head."""
    columns = np.concatenate([layer.weight_kn() for layer in group], axis=1).astype(np.float64)
    rms = np.sqrt((columns**2).mean(axis=1))
    if group[0].role == "o" and heads != kv_heads:
        per_head = rms.reshape(kv_heads, heads // kv_heads, -1)  # query head h reads KV head h // (heads / kv)
        rms = np.broadcast_to(np.sqrt((per_head**2).mean(axis=1, keepdims=True)), per_head.shape).reshape(-1)
    scales = np.maximum(rms, 1e-12) ** (-alpha)
    return scales / np.exp(np.log(scales).mean())


def fake_quantized(layers: list[LinearLayer], role: str | None, kind: str, alpha: float, config: dict) -> dict:
    """name -> dequantized [K, N] weight for the linears of ``role`` (all roles if None)."""
    heads = config.get("num_attention_heads", 1)
    kv_heads = config.get("num_key_value_heads", heads)
    result = {}
    for group in input_groups(layers):
        scales = column_scales(group, alpha, heads, kv_heads) if alpha else None
        for layer in group:
            if role is not None and layer.role != role:
                continue
            weight = layer.weight_kn()
            if kind == "rtn":
                result[layer.name] = quantize_rtn(weight, 4, 128, False).dequantize()
            elif scales is None:
                result[layer.name] = lut_quantize(weight, 4, -1, table_dtype="int8").dequantize()
            else:
                scaled = lut_quantize(weight * scales[:, None], 4, -1, table_dtype="int8").dequantize()
                result[layer.name] = scaled / scales[:, None]
    return result


def relative_weight_error(replaced: dict, weights: dict) -> float:
    """Squared error of the replaced weights over the weights' sum of squares, all layers of ``replaced`` together."""
    errors = sum(float(((replaced[name] - weights[name].astype(np.float64)) ** 2).sum()) for name in replaced)
    return errors / sum(float((weights[name].astype(np.float64) ** 2).sum()) for name in replaced)


def perplexity_with(float_dir: Path, scratch: Path, replaced: dict, evaluator: Evaluator) -> float:
    model = load_model(float_dir / MODEL_FILENAME)
    for layer in decoder_linears(model):
        if layer.name in replaced:
            weight = replaced[layer.name].astype(np.float32)
            stored = np.ascontiguousarray(weight.T if layer.weight_transposed else weight)
            layer.weight.const_value = ir.tensor(stored, name=layer.weight.name)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    save_model(model, scratch / MODEL_FILENAME)
    copy_side_files(float_dir, scratch)
    ppl = perplexity(OrtCausalLM(scratch, threads=evaluator.args.threads), evaluator.windows).ppl
    shutil.rmtree(scratch, ignore_errors=True)
    return ppl


def main() -> None:
    parser: argparse.ArgumentParser = bench_arguments(__doc__.splitlines()[0])
    parser.add_argument("--float", type=Path, default=None)
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/lut_roles"))
    parser.add_argument("--equalize", type=float, default=0.0, help="column equalization exponent (0: none)")
    args = parser.parse_args()
    float_dir = args.float or float_export(args.work)
    evaluator = Evaluator(float_dir, args)
    config = read_model_config(float_dir)
    layers = decoder_linears(load_model(float_dir / MODEL_FILENAME))
    reference = perplexity_with(float_dir, args.scratch, {}, evaluator)
    lut_name = "LUT per-channel int8" + (f", equalized ^{args.equalize}" if args.equalize else "")
    print(f"fp32 {reference:.3f}\n\n| role quantized | RTN asym g128 | {lut_name} |\n|---|---:|---:|", flush=True)
    roles = sorted({layer.role for layer in layers})
    for role in [*roles, None]:
        cells = []
        for kind, alpha in (("rtn", 0.0), ("lut", args.equalize)):
            ppl = perplexity_with(float_dir, args.scratch, fake_quantized(layers, role, kind, alpha, config), evaluator)
            cells.append(f"{ppl:.3f} ({(ppl / reference - 1) * 100:+.2f}%)")
        print(f"| {role or 'all'} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
