"""Data-free LUT with each table's ends pinned at its weights' extremes (a diagnosis for issue 11's goal 1).

    .venv/bin/python -m bench.lut_pinned [--float /work/out/bench/fp32] [--pins 0 1 2] [--bits 4] \
        [--group-size -1] [--table-dtype int8]

The per-channel table's largest errors fall on outlier weights (bench.source_grid: 5.09 coded to 3.29 in a
down_proj row): unweighted k-means merges a row's few largest weights into a cluster of the bulk. Here the
table's first and last p entries are held at the row's (or group's) p smallest and p largest weights while Lloyd
moves the others (``lut_quantize``'s k-means: both initialisations, the lower squared error kept; every iteration
runs, without its early stop). Every decoder linear is fake-quantized with it, and onnxruntime measures perplexity
as bench.lut_roles does. p = 0 is ``lut_quantize`` itself. A diagnosis, not a graphq method.
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import numpy as np

from bench.common import Evaluator, bench_arguments, float_export
from bench.lut_roles import decoder_linears, perplexity_with, relative_weight_error
from graphq.algorithms import codebook
from graphq.model_io import MODEL_FILENAME, load_model


def pinned_lloyd(pins: int):
    """codebook._lloyd with the first and last ``pins`` centres held at the sorted rows' ends."""

    def lloyd(sorted_values, sums, centres, iterations, tol):
        length = sorted_values.shape[1]
        low, high = sorted_values[:, :pins], sorted_values[:, length - pins:]

        def pinned(centres: np.ndarray) -> np.ndarray:
            centres = np.sort(centres, axis=1)
            centres[:, :pins], centres[:, -pins:] = low, high
            return centres

        centres = pinned(centres)
        for _ in range(iterations):
            mass, moment, _ = codebook.cluster_sums(sorted_values, sums, centres)
            centres = pinned(np.where(mass > 0, moment / np.where(mass > 0, mass, 1.0), centres))
        return centres, codebook.cluster_error(sorted_values, sums, centres)

    return lloyd


def fake_quantized(weights: dict, pins: int, bits: int, group_size: int, table_dtype: str) -> dict:
    with mock.patch.object(codebook, "_lloyd", pinned_lloyd(pins)) if pins else nullcontext():
        return {
            name: codebook.lut_quantize(w, bits, group_size, table_dtype=table_dtype).dequantize()
            for name, w in weights.items()
        }


def main() -> None:
    parser: argparse.ArgumentParser = bench_arguments(__doc__.splitlines()[0])
    parser.add_argument("--float", type=Path, default=None)
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/lut_pinned"))
    parser.add_argument("--pins", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=-1)
    parser.add_argument("--table-dtype", choices=codebook.TABLE_DTYPES, default="int8")
    args = parser.parse_args()
    float_dir = args.float or float_export(args.work)
    weights = {layer.name: layer.weight_kn() for layer in decoder_linears(load_model(float_dir / MODEL_FILENAME))}
    evaluator = Evaluator(float_dir, args)
    reference = perplexity_with(float_dir, args.scratch, {}, evaluator)
    group = "per channel" if args.group_size == -1 else f"g{args.group_size}"
    print(f"fp32 {reference:.3f}; {args.bits}-bit LUT {group}, {args.table_dtype} tables, data-free\n")
    print("| pinned per end | relative weight error | perplexity | delta vs fp32 |\n|---:|---:|---:|---:|")
    for pins in args.pins:
        replaced = fake_quantized(weights, pins, args.bits, args.group_size, args.table_dtype)
        error = relative_weight_error(replaced, weights)
        ppl = perplexity_with(float_dir, args.scratch, replaced, evaluator)
        print(f"| {pins} | {error:.3e} | {ppl:.3f} | {(ppl / reference - 1) * 100:+.2f}% |", flush=True)


if __name__ == "__main__":
    main()
