"""W4A8 on SmolLM2-135M: int4 g128 asymmetric weights with int8 activations, static (AWQ scored on both grids, with
or without SmoothQuant alpha auto first) and dynamic per token, next to W4A16 with the same weight method and
calibration samples.

    nice -n 10 .venv/bin/python -m bench.w4a8 [--work out/bench] [--num-samples 16] [--seq-len 512] [--only KEY ...]

Calibration: Sense and Sensibility (graphq's sampler, seed 0); evaluation: Pride and Prejudice, first --max-tokens
(4096) tokens in windows of --ctx (512), as every bench here (bench.common). Each row is one graphq.quantize call
in this process (wall time of the whole call) and one perplexity run of its output; lm_head stays float.
Goals (issue 12): W4A8 static with smoothing within +15% of float; W4A8 dynamic within W4A16 AWQ's delta + 2 points.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass

import graphq
from bench.common import DATA, Evaluator, bench_arguments, float_export
from graphq.config import QuantConfig

WEIGHTS = dict(group_size=128, symmetric=False)


@dataclass
class Variant:
    key: str
    label: str
    options: dict


VARIANTS = [
    Variant("w4a16-awq", "W4A16 AWQ (same samples)", dict(scheme="w4a16", method="awq")),
    Variant("w4a8-dynamic-awq", "W4A8 dynamic per token, AWQ weights", dict(scheme="w4a8-dynamic", method="awq")),
    # Static W4A8's AWQ scores each candidate scale on both grids (int4 g128 weights, the per-tensor int8 range of
    # x / s) and tries SmoothQuant's max-based scales next to AWQ's mean-|x| ratios: no --smooth needed.
    Variant("w4a8-static-awq", "W4A8 static minmax, AWQ scored on int4 x int8 (with SmoothQuant candidates)",
            dict(scheme="w4a8", method="awq")),
    # --smooth first (its alpha search scores the int4 g128 grid), then the same AWQ on the smoothed model.
    Variant("w4a8-static-awq-sq-auto", "W4A8 static minmax + SmoothQuant alpha auto, AWQ weights",
            dict(scheme="w4a8", method="awq", smooth="smoothquant", smooth_alpha="auto")),
    Variant("w4a8-static-awqgptq-sq-auto", "W4A8 static minmax + SmoothQuant alpha auto, AWQ+GPTQ weights",
            dict(scheme="w4a8", method="awq+gptq", smooth="smoothquant", smooth_alpha="auto")),
    Variant("w4a8-static-rtn-sq-auto", "W4A8 static minmax + SmoothQuant alpha auto, RTN weights",
            dict(scheme="w4a8", method="rtn", smooth="smoothquant", smooth_alpha="auto")),
    Variant("w4a8-dynamic-rtn", "W4A8 dynamic per token, RTN weights", dict(scheme="w4a8-dynamic", method="rtn")),
]


def main() -> None:
    parser = bench_arguments(__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calib", default=str(DATA / "sensesensibility.txt"))
    parser.add_argument("--only", nargs="*", help="variant keys to run: " + ", ".join(v.key for v in VARIANTS))
    parser.set_defaults(decode_tokens=0)
    args = parser.parse_args()
    float_dir = float_export(args.work)
    evaluator = Evaluator(float_dir, args)
    reference = evaluator.measure("fp32", float_dir, None).ppl
    rows = [("fp32", reference, None)]
    for variant in VARIANTS:
        if args.only and variant.key not in args.only:
            continue
        out = args.work / "w4a8" / variant.key
        config = QuantConfig(**WEIGHTS, **variant.options, calib=args.calib, num_samples=args.num_samples,
                             seq_len=args.seq_len, save_format=["onnx"])
        started = time.perf_counter()
        graphq.quantize(float_dir, config, out, overwrite=True, progress=False)
        seconds = time.perf_counter() - started
        rows.append((variant.label, evaluator.measure(variant.key, out, seconds).ppl, seconds))
        shutil.rmtree(out / "stages", ignore_errors=True)  # the checkpoints: not measured here
    print(f"\nSmolLM2-135M, int4 g128 asym weights, calibration {args.num_samples} x {args.seq_len} tokens of "
          f"Sense and Sensibility; Pride and Prejudice, first {args.max_tokens} tokens, windows of {args.ctx}.\n")
    print("| model | perplexity | delta vs fp32 | quantization time s |")
    print("|---|---:|---:|---:|")
    for label, ppl, seconds in rows:
        print(f"| {label} | {ppl:.3f} | {(ppl / reference - 1) * 100:+.2f}% | {'-' if seconds is None else f'{seconds:.1f}'} |")


if __name__ == "__main__":
    main()
