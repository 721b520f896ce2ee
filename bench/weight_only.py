"""Weight-only RTN on SmolLM2-135M: graphq (MatMulNBits and QDQ) next to onnxruntime's MatMulNBitsQuantizer.

    .venv/bin/python -m bench.weight_only [--max-tokens 4096]

Prints a table of perplexity on Pride and Prejudice, delta against float, model size, quantization time and
onnxruntime decode speed, every row measured in this run.
"""

from __future__ import annotations

import shutil
import time

from bench.anchors import ort_matmulnbits
from bench.common import Evaluator, bench_arguments, float_export, markdown_table
from graphq import QuantConfig, quantize

# (label, bits, group size, symmetric)
SETTINGS = [
    ("W8A16 per-channel sym", 8, -1, True),
    ("W4A16 g32 sym", 4, 32, True),
    ("W4A16 g32 asym", 4, 32, False),
    ("W4A16 g128 sym", 4, 128, True),
    ("W4A16 g128 asym", 4, 128, False),
]


def main() -> None:
    args = bench_arguments(__doc__.splitlines()[0]).parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    float_dir = float_export(args.work)
    evaluator = Evaluator(float_dir, args)
    rows = [evaluator.measure("fp32", float_dir, None)]
    runs = args.work / "weight_only"
    shutil.rmtree(runs, ignore_errors=True)
    for label, bits, group, symmetric in SETTINGS:
        for fmt in ("matmulnbits", "qdq"):
            config = QuantConfig(scheme=f"w{bits}a16", group_size=group, symmetric=symmetric, format=fmt)
            started = time.perf_counter()
            result = quantize(float_dir, config, runs / f"graphq-{bits}-{group}-{symmetric}-{fmt}", progress=False)
            rows.append(evaluator.measure(f"graphq {label} {fmt}", result.output_dir, time.perf_counter() - started))
        # onnxruntime has no per-channel MatMulNBits; its closest is one block of 128.
        ort_group = 128 if group == -1 else group
        ort_dir, seconds = ort_matmulnbits(
            float_dir, runs / f"ort-{bits}-{group}-{symmetric}", bits=bits, block_size=ort_group, symmetric=symmetric
        )
        ort_label = label.replace("per-channel", "g128")
        rows.append(evaluator.measure(f"onnxruntime default {ort_label}", ort_dir, seconds))
    print()
    print(f"SmolLM2-135M, Pride and Prejudice, first {args.max_tokens} tokens, windows of {args.ctx}; lm_head float")
    print(markdown_table(rows, rows[0].ppl))


if __name__ == "__main__":
    main()
