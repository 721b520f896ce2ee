"""W8A8 on SmolLM2-135M: graphq static (minmax / percentile / auto, with and without SmoothQuant and OS+) and dynamic
per-token, next to onnxruntime.quantization's quantize_static (MinMax, Percentile; QDQ; const-weight MatMuls only;
with and without reduce_range) and quantize_dynamic, measured in the same run.

    .venv/bin/python -m bench.w8a8 [--num-samples 8] [--seq-len 512] [--only graphq-static-minmax ...]

Both tools calibrate on the same token sequences (graphq's sampler over Sense and Sensibility, same seed); the
table gives perplexity on Pride and Prejudice (first --max-tokens tokens, windows of --ctx), delta against float,
quantization wall time (load, calibrate, quantize, save) and peak RSS of a fresh process per quantization (VmHWM).
lm_head stays float everywhere.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path


from bench.awq_gptq import Row, _child_result, _ListReader, calibration_feeds, delta_percent, markdown_table
from bench.common import DATA, Evaluator, bench_arguments, float_export
from graphq.model_io import model_size_bytes


@dataclass
class Variant:
    key: str
    label: str
    tool: str  # graphq | ort
    options: dict


FALLBACK = 6


def variants() -> list[Variant]:
    """Most telling rows first (a long run can be cut short and still compare the tools)."""
    smooth_options = {None: "", "smoothquant": " + SmoothQuant 0.5", "os+": " + OS+ 0.5"}

    def static(method: str, smooth: str | None, fallback: int = 0, alpha: float | str = 0.5) -> Variant:
        key = f"graphq-static-{method}" + (f"-{smooth.replace('+', 'plus')}" if smooth else "")
        label = f"graphq W8A8 static {method}{smooth_options[smooth]}"
        if alpha == "auto":
            key += "-auto-alpha"
            label = label.replace(" 0.5", " alpha auto")
        if fallback:
            key += f"-fallback{fallback}"
            label += f", {fallback} worst input groups W8A16"
        options = dict(scheme="w8a8", act_method=method, smooth=smooth, act_fallback=fallback)
        if smooth:
            options["smooth_alpha"] = alpha
        return Variant(key, label, "graphq", options)

    def ort(kind: str, method: str = "", reduce_range: bool = False) -> Variant:
        if kind == "dynamic":
            return Variant("ort-dynamic", "onnxruntime quantize_dynamic", "ort", dict(kind="dynamic", reduce_range=False))
        key = f"ort-static-{method.lower()}" + ("-reduce-range" if reduce_range else "")
        label = f"onnxruntime quantize_static {method}" + (" reduce_range" if reduce_range else "")
        return Variant(key, label, "ort", dict(kind="static", method=method, reduce_range=reduce_range))

    return [
        Variant("graphq-dynamic", "graphq W8A8 dynamic per-token", "graphq", dict(scheme="w8a8-dynamic")),
        static("auto", None),
        static("auto", None, FALLBACK),
        static("auto", "smoothquant", FALLBACK),
        ort("static", "MinMax"),
        ort("static", "Percentile"),
        ort("dynamic"),
        ort("static", "MinMax", True),
        ort("static", "Percentile", True),
        static("minmax", None),
        static("percentile", None),
        static("minmax", "smoothquant"),
        static("percentile", "smoothquant"),
        static("auto", "smoothquant"),
        static("minmax", "os+"),
        static("percentile", "os+"),
        static("auto", "os+"),
        Variant("graphq-dynamic-smoothquant", "graphq W8A8 dynamic per-token + SmoothQuant 0.5", "graphq",
                dict(scheme="w8a8-dynamic", smooth="smoothquant")),
        static("minmax", "smoothquant", FALLBACK),
        static("auto", "os+", FALLBACK),
        static("minmax", "smoothquant", alpha="auto"),
        static("minmax", "os+", alpha="auto"),
        Variant("graphq-dynamic-smoothquant-auto-alpha", "graphq W8A8 dynamic per-token + SmoothQuant alpha auto",
                "graphq", dict(scheme="w8a8-dynamic", smooth="smoothquant", smooth_alpha="auto")),
    ]


# ---------------------------------------------------------------------------------------------------------------
# Child processes (one quantization each; bench.awq_gptq.run_isolated spawns them).


def run_graphq(float_dir: str, out_dir: str, options: dict, calib: str, num_samples: int, seq_len: int,
               seed: int) -> dict:
    from graphq import QuantConfig, quantize

    config = QuantConfig(calib=calib, num_samples=num_samples, seq_len=seq_len, seed=seed, **options)
    started = time.perf_counter()
    result = quantize(float_dir, config, out_dir, progress=False)
    seconds = time.perf_counter() - started
    calibration = result.report.get("activation_calibration", {})
    return _child_result(seconds, calibration_seconds=calibration.get("seconds"),
                         methods_chosen=calibration.get("methods_chosen"))


def run_ort(float_dir: str, out_dir: str, options: dict, feeds) -> dict:
    import onnx_ir as ir
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    from graphq.linear_layers import find_linear_layers
    from graphq.model_io import MODEL_FILENAME, copy_side_files

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    model_file = Path(float_dir) / MODEL_FILENAME
    lm_head = [l.node.name for l in find_linear_layers(ir.load(model_file)) if l.role == "lm_head"]
    out = Path(out_dir)
    out.mkdir(parents=True)

    class Reader(_ListReader, CalibrationDataReader):
        pass

    common = dict(op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=options["reduce_range"],
                  weight_type=QuantType.QInt8, nodes_to_exclude=lm_head, extra_options={"MatMulConstBOnly": True})
    started = time.perf_counter()
    if options["kind"] == "static":
        quantize_static(str(model_file), str(out / MODEL_FILENAME), Reader(feeds), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8,
                        calibrate_method=getattr(CalibrationMethod, options["method"]), **common)
    else:
        quantize_dynamic(str(model_file), str(out / MODEL_FILENAME), **common)
    seconds = time.perf_counter() - started
    copy_side_files(Path(float_dir), out)
    return _child_result(seconds)


def _child(kind: str, kwargs: dict) -> dict:
    import traceback

    try:
        return (run_graphq if kind == "graphq" else run_ort)(**kwargs)
    except BaseException as exc:
        text = f"{type(exc).__name__}: {exc}".strip().splitlines()
        return {"error": text[0][:200] if text else type(exc).__name__, "traceback": traceback.format_exc()}


def run_isolated(kind: str, kwargs: dict) -> dict:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(_child, kind, kwargs).result()
    except BrokenProcessPool as exc:
        return {"error": f"the quantizing process died ({exc})"}


# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = bench_arguments(__doc__.splitlines()[0])
    parser.set_defaults(decode_tokens=0)
    parser.add_argument("--calib", type=Path, default=DATA / "sensesensibility.txt")
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=None, help="run only variants whose key contains one of these")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    args.calib = args.calib.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    float_dir = float_export(args.work)
    float_mib = model_size_bytes(float_dir / "model.onnx") / 2**20  # with its external data
    print(f"SmolLM2-135M W8A8, lm_head float; calibration {args.calib.name} {args.num_samples} x {args.seq_len} tokens "
          f"(seed {args.seed}) for both tools; eval {args.eval_text.name}, first {args.max_tokens} tokens, windows of "
          f"{args.ctx}; float model {float_mib:.1f} MiB", flush=True)
    evaluator = Evaluator(float_dir, args)
    reference = evaluator.measure("fp32", float_dir, None).ppl
    rows = [Row("fp32", reference, None, None)]
    runs = args.work / "w8a8"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    chosen = [v for v in variants() if not args.only or any(s in v.key for s in args.only)]
    feeds = calibration_feeds(float_dir, args.calib, args.num_samples, args.seq_len, args.seed) if any(v.tool == "ort" for v in chosen) else None
    records = []
    for variant in chosen:
        out_dir = runs / variant.key
        print(f"{variant.label} ...", flush=True)
        if variant.tool == "graphq":
            kwargs = dict(float_dir=str(float_dir), out_dir=str(out_dir), options=variant.options,
                          calib=str(args.calib), num_samples=args.num_samples, seq_len=args.seq_len, seed=args.seed)
        else:
            kwargs = dict(float_dir=str(float_dir), out_dir=str(out_dir), options=variant.options,
                          feeds=feeds if variant.options["kind"] == "static" else None)
        outcome = run_isolated(variant.tool, kwargs)
        if "error" in outcome:
            print(f"  failed: {outcome['error']}", flush=True)
            row = Row(variant.label, None, None, None, failure=outcome["error"])
        else:
            print(f"  quantized in {outcome['seconds']:.1f}s, peak RSS {outcome['peak_rss_bytes'] / 2**20:.0f} MiB "
                  f"{ {k: v for k, v in outcome.items() if k in ('calibration_seconds', 'methods_chosen')} }", flush=True)
            try:
                ppl = evaluator.measure(variant.label, out_dir, outcome["seconds"]).ppl
                row = Row(variant.label, ppl, outcome["seconds"], outcome["peak_rss_bytes"] / 2**20)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:200]
                print(f"  evaluation failed: {reason}", flush=True)
                row = Row(variant.label, None, None, None, failure=f"evaluation: {reason}")
        rows.append(row)
        records.append({"key": variant.key, **{k: v for k, v in row.__dict__.items()},
                        "outcome": {k: v for k, v in outcome.items() if k != "traceback"}})
        shutil.rmtree(out_dir, ignore_errors=True)  # keep the disk free: models are ~150-550 MB each
        if args.json:
            args.json.write_text(json.dumps({"reference_ppl": reference, "rows": records}, indent=2, default=str))
    print()
    print(f"SmolLM2-135M, W8A8 (int8 weights per output channel; activations per tensor static, or per token "
          f"dynamic), lm_head float. Calibration: {args.calib.name}, {args.num_samples} samples x {args.seq_len} "
          f"tokens (seed {args.seed}), the same sequences for onnxruntime. Evaluation: {args.eval_text.name}, first "
          f"{args.max_tokens} tokens, windows of {args.ctx}. Time: the whole quantize call in a fresh process; peak "
          f"RSS: its VmHWM (float model {float_mib:.1f} MiB). 2 shared, loaded CPU cores.")
    print()
    print(markdown_table(rows, reference))
    ran = [r for r in rows[1:] if r.ppl is not None]
    static = [r for r in ran if "graphq W8A8 static" in r.label]
    dynamic = [r for r in ran if "graphq W8A8 dynamic" in r.label]
    print()
    if static:
        best = min(static, key=lambda r: r.ppl)
        print(f"best graphq static: {best.label} {delta_percent(best.ppl, reference):+.2f}% (goal +5%)")
    if dynamic:
        best = min(dynamic, key=lambda r: r.ppl)
        print(f"best graphq dynamic: {best.label} {delta_percent(best.ppl, reference):+.2f}% (goal +2%)")
    if args.json:
        args.json.write_text(json.dumps({"reference_ppl": reference, "rows": records}, indent=2, default=str))


if __name__ == "__main__":
    main()
