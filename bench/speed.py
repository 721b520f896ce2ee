"""Prefill and decode speed of SmolLM2-135M in onnxruntime CPU: fp32 against graphq's W4A16 (MatMulNBits, float and
int8 compute), NF4 lookup tables, W8A8 (dynamic and static QDQ) and W4A16 with the tied embedding / lm_head on an
int4 grid too, each also with its attention fused into GroupQueryAttention (--fuse-attention; the fp32 export too,
by the pass alone).

    .venv/bin/python -m bench.speed [--work out/bench] [--prompt 128] [--tokens 64] [--repeats 5] [--threads N]

Batch 1, greedy decode with the KV cache (present -> past), timed by graphq.speed.compare_speed: every model is
warmed up, then the timed runs alternate between the models so all see the same machine load, and the best run
of each counts. Accuracy is not the point here (RTN weights; bench.awq_gptq and bench.w8a8 measure it), but each
row's perplexity on the usual windows is printed so a fast broken model cannot pass. Goal (issue 14): int4 decode
>= 3x fp32 (batch-1 decode is memory-bound: int4 weights allow up to ~8x).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import graphq
from bench.common import DATA, Evaluator, bench_arguments, float_export
from graphq.config import QuantConfig
from graphq.model_io import copy_side_files, load_model, read_model_config, save_model
from graphq.passes.fuse_attention import attention_spec, fuse_attention
from graphq.speed import compare_speed

VARIANTS = {
    "w4a16": ("W4A16 g128 asym RTN, MatMulNBits (lm_head, embedding float)", dict(scheme="w4a16")),
    "w4a16-int4-embedding": ("W4A16 + int4 g32 embedding and tied lm_head (GatherBlockQuantized, MatMulNBits)",
                             dict(scheme="w4a16", quantize_embeddings="int4")),
    "w4a16-level4": ("W4A16 g128 asym RTN, MatMulNBits --accuracy-level 4 (int8 activations per block)",
                     dict(scheme="w4a16", accuracy_level=4)),
    "w4a16-int4-embedding-level4": ("W4A16 + int4 embedding and tied lm_head, --accuracy-level 4",
                                    dict(scheme="w4a16", quantize_embeddings="int4", accuracy_level=4)),
    "nf4": ("NF4 g64 lookup tables, data-free (issue 11: uint8 codes + Gather, then MatMul)",
            dict(scheme="w4a16", method="lut", weight_format="nf4", group_size=64)),
    "w8a8-dynamic": ("W8A8 dynamic per token (QDQ)", dict(scheme="w8a8-dynamic")),
    "w8a8": ("W8A8 static minmax (QDQ)", dict(scheme="w8a8", num_samples=16, calib=str(DATA / "sensesensibility.txt"))),
    "w4a16-fused": ("W4A16 g128 asym RTN, --fuse-attention", dict(scheme="w4a16", fuse_attention=True)),
    "w4a16-level4-fused": ("W4A16, --accuracy-level 4, --fuse-attention",
                           dict(scheme="w4a16", accuracy_level=4, fuse_attention=True)),
    "w4a16-int4-embedding-level4-fused": ("W4A16 + int4 embedding and tied lm_head, --accuracy-level 4, "
                                          "--fuse-attention",
                                          dict(scheme="w4a16", quantize_embeddings="int4", accuracy_level=4,
                                               fuse_attention=True)),
    "awq-int8-embedding-level4-fused": ("W4A16 AWQ (32 x 512, --propagate float) + int8 embedding and tied lm_head, "
                                        "--accuracy-level 4, --fuse-attention",
                                        dict(scheme="w4a16", method="awq", num_samples=32, propagate="float",
                                             calib=str(DATA / "sensesensibility.txt"), quantize_embeddings="int8",
                                             accuracy_level=4, fuse_attention=True)),
    "w8a8-dynamic-fused": ("W8A8 dynamic per token (QDQ), --fuse-attention",
                           dict(scheme="w8a8-dynamic", fuse_attention=True)),
}


def fused_float_copy(float_dir: Path, out: Path) -> Path:
    """The fp32 export with only its attention fused (the pass alone), so the fusion's share of a speed-up shows."""
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(float_dir / "model.onnx")
    fuse_attention(model, attention_spec(read_model_config(float_dir)))
    save_model(model, out / "model.onnx")
    copy_side_files(float_dir, out)
    return out


def main() -> None:
    parser = bench_arguments(__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="*", help="variants: fp32-fused, " + ", ".join(VARIANTS))
    parser.set_defaults(decode_tokens=0)
    args = parser.parse_args()
    float_dir = float_export(args.work)
    evaluator = Evaluator(float_dir, args)
    models = {"fp32": float_dir}
    labels = {"fp32": "fp32 (optimum export)"}
    ppl = {"fp32": evaluator.measure("fp32", float_dir, None).ppl}
    if not args.only or "fp32-fused" in args.only:
        models["fp32-fused"] = fused_float_copy(float_dir, args.work / "speed" / "fp32-fused")
        labels["fp32-fused"] = "fp32, attention fused (the pass alone)"
        ppl["fp32-fused"] = evaluator.measure("fp32-fused", models["fp32-fused"], None).ppl
    for key, (label, options) in VARIANTS.items():
        if args.only and key not in args.only:
            continue
        out = args.work / "speed" / key
        config = QuantConfig(**{"group_size": 128, "seq_len": 512, "save_format": ["onnx"], **options})
        graphq.quantize(float_dir, config, out, overwrite=True, progress=False)
        shutil.rmtree(out / "stages", ignore_errors=True)  # only the model is timed
        models[key], labels[key] = out, label
        ppl[key] = evaluator.measure(key, out, None).ppl
    prompt = [token for window in evaluator.windows for token in window][: args.prompt]
    speeds = compare_speed(models, prompt, args.tokens, threads=args.threads, repeats=args.repeats)
    base = speeds["fp32"]
    print(f"\nSmolLM2-135M, onnxruntime CPU, batch 1, prompt {args.prompt} tokens of Pride and Prejudice, "
          f"{args.tokens} decoded tokens, best of {args.repeats} alternating runs, threads {args.threads or 'all'}.\n")
    print("| model | perplexity | prefill tok/s | decode tok/s | decode vs fp32 |")
    print("|---|---:|---:|---:|---:|")
    for key, speed in speeds.items():
        print(f"| {labels[key]} | {ppl[key]:.3f} | {speed.prefill_tokens_per_s:.0f} | {speed.decode_tokens_per_s:.1f} | "
              f"{speed.decode_tokens_per_s / base.decode_tokens_per_s:.2f}x |")


if __name__ == "__main__":
    main()
