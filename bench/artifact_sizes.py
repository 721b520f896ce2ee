"""Deployment artifact sizes on SmolLM2-135M W4A16 g128 (RTN): serving dtype and quantized embeddings.

    .venv/bin/python -m bench.artifact_sizes [--float-dir /work/out/fp32] [--max-tokens 4096]

For each variant: total bytes of the artifact files (what a runtime downloads: safetensors / gguf plus the
description) and the ONNX's perplexity on Pride and Prejudice, every row measured in this run; the goal
(issue 13) is <= 80 MiB with fp16 float tensors and int4 embeddings, at <= +1 perplexity point over the same
model with a float embedding. Results go to bench/results/artifact_sizes.md.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from bench.common import REPO, Evaluator, bench_arguments, float_export
from graphq import QuantConfig, quantize

BASE = dict(scheme="w4a16", group_size=128)
# (label, config overrides)
VARIANTS = [
    ("fp32 floats (today's default), float embedding", dict(dtype=None)),
    ("fp16 floats, float embedding", dict(dtype="fp16")),
    ("fp16 floats, int8 embedding g32 (tied lm_head follows)", dict(dtype="fp16", quantize_embeddings="int8")),
    ("fp16 floats, int4 embedding g32 asym (tied lm_head follows)", dict(dtype="fp16", quantize_embeddings="int4")),
    ("fp16 floats, int4 embedding g32 asym, GPTQ on the tied lm_head's inputs",
     dict(dtype="fp16", quantize_embeddings="int4", embedding_method="gptq", num_samples=32)),
    # gguf at group 32 (ggml's grid: the file holds graphq's integers, so the ONNX's perplexity is the file's)
    ("gguf Q4_1 (W4A16 g32 asym), fp16 floats, int4 embedding, GPTQ on the tied lm_head's inputs",
     dict(dtype="fp16", quantize_embeddings="int4", embedding_method="gptq", num_samples=32, target="gguf",
          group_size=32)),
]


def main() -> None:
    parser = bench_arguments(__doc__.splitlines()[0])
    parser.add_argument("--float-dir", type=Path, default=None, help="an existing fp32 export (default: export one)")
    parser.add_argument("--calib", type=Path, default=REPO.parent / "shared" / "data" / "austen" / "sensesensibility.txt",
                        help="calibration text for the GPTQ embedding variants")
    args = parser.parse_args()
    args.decode_tokens = 0
    args.work.mkdir(parents=True, exist_ok=True)
    float_dir = args.float_dir or float_export(args.work)
    evaluator = Evaluator(float_dir, args)
    float_ppl = evaluator.measure("float", float_dir, None).ppl
    runs = args.work / "artifact_sizes"
    shutil.rmtree(runs, ignore_errors=True)
    lines = ["| variant | artifact MiB | perplexity | vs float | vs same dtype, float embedding | quant s |",
             "|---|---:|---:|---:|---:|---:|"]
    reference_ppl = {}
    for index, (label, overrides) in enumerate(VARIANTS):
        config = QuantConfig(**{**BASE, "calib": str(args.calib), **overrides})
        started = time.perf_counter()
        result = quantize(float_dir, config, runs / f"v{index}", progress=False)
        seconds = time.perf_counter() - started
        size = sum(result.report["artifacts"].values()) / 2**20
        ppl = evaluator.measure(label, result.output_dir, seconds).ppl
        dtype = result.report["serving_dtype"]
        if "quantize_embeddings" not in overrides:
            reference_ppl[dtype] = ppl
        # the float-embedding reference is the same dtype at group 128; the gguf row (group 32) has none
        delta = f"{ppl - reference_ppl[dtype]:+.3f}" if "group_size" not in overrides else "-"
        lines.append(f"| {label} | {size:.1f} | {ppl:.3f} | {ppl - float_ppl:+.3f} | {delta} | {seconds:.1f} |")
        print(lines[-1], flush=True)
        shutil.rmtree(result.output_dir, ignore_errors=True)  # keep the scratch folder small
    header = (f"SmolLM2-135M W4A16 g128 asym RTN (--target mindie unless said; int4 packed along n), Pride and "
              f"Prejudice, first {args.max_tokens} tokens, windows of {args.ctx}; float perplexity {float_ppl:.3f}.\n"
              "Artifact MiB: safetensors (or gguf) + description. Perplexity: graphq's ONNX of the same run.\n")
    text = header + "\n" + "\n".join(lines) + "\n"
    out = REPO / "bench" / "results" / "artifact_sizes.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
