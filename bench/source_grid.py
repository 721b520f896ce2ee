"""How much of the default model's "float" weights is already a 4-bit grid (issue 11's test bed).

    .venv/bin/python -m bench.source_grid [--float /work/out/bench/fp32] [--scratch /tmp/source_grid]

The default real model is SmolLM2-135M from a Q4_1 GGUF file: transformers dequantizes it to fp32, so every decoder
linear, per block of 32 input channels, holds at most 16 values m + d q (q = 0..15, d and m float16). This bench
checks that on the exported ONNX (share of blocks of 32 whose values lie on the 16-level grid from their min to
their max, and how many distinct values one output row holds), then measures in onnxruntime, by fake quantization
as bench.lut_roles does, what that structure does to the 4-bit formats issue 11 compares:

- the same grid stored as Q4_1 stores it (float16 step and float16 minimum per 32): should give back fp32;
- graphq's RTN asym g32 (MatMulNBits' integer zero point, so the minimum moves onto a multiple of the step);
- RTN asym g128 and the data-free per-channel LUT (int8 table): a 16-entry table per row has to merge the row's
  K / 32 grids, part of why the per-channel table loses on this model.

A second table gives each format's relative weight error (sum of squared errors over sum of squares, every decoder
linear) on the weights as they are and after an orthogonal rotation of the input channels (block Hadamard of 64,
W' = H^T W, as QuaRot-style rotations do; the error is basis-free since H is orthogonal). It is a weight error
only: bench/results/lut_issue11.md has a rotation's perplexities, which do not follow it on this model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.common import Evaluator, bench_arguments, float_export
from bench.lut_roles import decoder_linears, perplexity_with, relative_weight_error
from graphq.algorithms.codebook import lut_quantize
from graphq.algorithms.rtn import quantize_rtn
from graphq.model_io import MODEL_FILENAME, load_model

BLOCK = 32
LEVELS = 16


def blocks_of(weight_kn: np.ndarray) -> np.ndarray:
    """[K, N] -> [N, K / BLOCK, BLOCK]: the blocks of input channels of each output row."""
    k, n = weight_kn.shape
    return weight_kn.T.reshape(n, k // BLOCK, BLOCK).astype(np.float64)


def on_min_max_grid(weight_kn: np.ndarray) -> np.ndarray:
    """[N, K / BLOCK] bool: the block's values all lie on the LEVELS-level grid from its min to its max."""
    blocks = blocks_of(weight_kn)
    low, high = blocks.min(-1, keepdims=True), blocks.max(-1, keepdims=True)
    step = np.where(high > low, (high - low) / (LEVELS - 1), 1.0)
    off_grid = np.abs(np.round((blocks - low) / step) - (blocks - low) / step).max(-1)
    return off_grid < 1e-3


def q4_1_round_trip(weight_kn: np.ndarray) -> np.ndarray:
    """The weight rounded onto its blocks' min..max grids, step and minimum stored in float16 (Q4_1's layout)."""
    blocks = blocks_of(weight_kn)
    low = blocks.min(-1, keepdims=True).astype(np.float16).astype(np.float64)
    step = ((blocks.max(-1, keepdims=True) - low) / (LEVELS - 1)).astype(np.float16).astype(np.float64)
    codes = np.clip(np.round((blocks - low) / np.where(step > 0, step, 1.0)), 0, LEVELS - 1)
    rebuilt = (codes * step + low).reshape(blocks.shape[0], -1)
    return rebuilt.T.astype(np.float32)


def rotated(weight_kn: np.ndarray, size: int = 64) -> np.ndarray:
    """H^T W for the block-diagonal normalised Hadamard H of ``size`` (K a multiple of it)."""
    k, n = weight_kn.shape
    h = np.ones((1, 1))
    while h.shape[0] < size:  # Sylvester's construction; size is a power of two
        h = np.block([[h, h], [h, -h]])
    h = h / np.sqrt(size)
    return np.einsum("ab,gan->gbn", h, weight_kn.reshape(k // size, size, n)).reshape(k, n).astype(np.float32)


FORMATS = {
    "Q4_1 grid as stored (float16 step + minimum per 32)": q4_1_round_trip,
    "graphq RTN asym g32 (integer zero point)": lambda w: quantize_rtn(w, 4, 32, False).dequantize(),
    "graphq RTN asym g128": lambda w: quantize_rtn(w, 4, 128, False).dequantize(),
    "LUT per-channel int8 table, data-free": lambda w: lut_quantize(w, 4, -1, table_dtype="int8").dequantize(),
}


def main() -> None:
    parser: argparse.ArgumentParser = bench_arguments(__doc__.splitlines()[0])
    parser.add_argument("--float", type=Path, default=None)
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/source_grid"))
    args = parser.parse_args()
    float_dir = args.float or float_export(args.work)
    layers = decoder_linears(load_model(float_dir / MODEL_FILENAME))
    weights = {layer.name: layer.weight_kn() for layer in layers}

    on_grid = [on_min_max_grid(w) for w in weights.values()]
    distinct = np.array([len(np.unique(row)) for w in weights.values() for row in w.T])
    blocks = sum(g.size for g in on_grid)
    print(f"decoder linears: {len(weights)}; blocks of {BLOCK} on a {LEVELS}-level min..max grid: "
          f"{sum(int(g.sum()) for g in on_grid)} / {blocks}")
    print(f"distinct values per output row: min {distinct.min()}, median {np.median(distinct):.0f}, "
          f"max {distinct.max()} (a per-channel table has {LEVELS})\n")

    evaluator = Evaluator(float_dir, args)
    reference = perplexity_with(float_dir, args.scratch, {}, evaluator)
    print("| weights (every decoder linear) | max abs change | perplexity | delta vs fp32 |\n|---|---:|---:|---:|")
    print(f"| fp32 export | 0 | {reference:.3f} | +0.00% |", flush=True)
    errors = {}
    for name, fake_quantize in FORMATS.items():
        replaced = {layer: fake_quantize(w) for layer, w in weights.items()}
        change = max(float(np.abs(replaced[layer] - w).max()) for layer, w in weights.items())
        errors[name] = relative_weight_error(replaced, weights)
        ppl = perplexity_with(float_dir, args.scratch, replaced, evaluator)
        print(f"| {name} | {change:.2e} | {ppl:.3f} | {(ppl / reference - 1) * 100:+.2f}% |", flush=True)

    rotated_weights = {layer: rotated(w) for layer, w in weights.items()}
    print("\n| format | relative weight error | after a Hadamard-64 rotation of the inputs |\n|---|---:|---:|")
    for name, fake_quantize in list(FORMATS.items())[1:]:
        replaced = {layer: fake_quantize(w) for layer, w in rotated_weights.items()}
        after = relative_weight_error(replaced, rotated_weights)
        print(f"| {name} | {errors[name]:.3e} | {after:.3e} |", flush=True)


if __name__ == "__main__":
    main()
